//! Software segmentation of TCP super-packets before they go out the TUN device.
//!
//! # What it owns
//! Splitting one IPv4/IPv6 TCP packet whose length exceeds the internet MTU into MSS-sized
//! segments with correct headers: IPv4 total length, identification (+1 per segment) and
//! header checksum; IPv6 payload length; TCP sequence number, FIN/PSH only on the last segment,
//! CWR only on the first, and a full TCP checksum. Pure: no I/O.
//!
//! # Why
//! Tier 1 encapsulates the TCP GSO super-packets gVisor emits unsegmented (docs/tier1.md), so a
//! GENEVE datagram may carry a 64 KiB TCP packet. The TUN device has no virtio header, so the
//! kernel cannot segment it for us.
//!
//! # Limits
//! IPv6 extension headers are not walked (the TCP header must follow the fixed header). Packets
//! that are not TCP are returned as they are (the kernel fragments UDP without DF).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use snas_wire::checksum;

const TCP: u8 = 6;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

/// Why a packet cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// the headers are truncated or inconsistent
    #[error("malformed TCP packet")]
    Malformed,
    /// the MTU leaves no room for payload
    #[error("MTU too small for the headers")]
    MtuTooSmall,
}

struct Layout {
    v6: bool,
    l3: usize,
    l4: usize,
    total: usize,
}

fn layout(p: &[u8]) -> Option<Layout> {
    let v = p.first()? >> 4;
    let (v6, l3, total, proto) = match v {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            (false, ihl, total, *p.get(9)?)
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            (true, 40, 40 + plen, *p.get(6)?)
        }
        _ => return None,
    };
    if proto != TCP || total > p.len() || l3 < 20 {
        return None;
    }
    let doff = usize::from(p.get(l3 + 12)? >> 4) * 4;
    if doff < 20 || l3 + doff > total {
        return None;
    }
    Some(Layout {
        v6,
        l3,
        l4: doff,
        total,
    })
}

fn addrs(p: &[u8], v6: bool) -> Option<(IpAddr, IpAddr)> {
    if v6 {
        let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
        let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
        Some((Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into()))
    } else {
        let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
        let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
        Some((Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into()))
    }
}

/// Whether `packet` needs segmenting for `mtu` (a TCP packet longer than the MTU).
pub fn needs_segmenting(packet: &[u8], mtu: usize) -> bool {
    packet.len() > mtu && layout(packet).is_some()
}

/// The bytes `packet` occupies once segmented for `mtu`: its own length, plus the headers
/// every further segment repeats when it is a TCP packet longer than `mtu`. Pacers charge
/// this, so that a super-packet costs what its segments cost on the wire.
pub fn wire_len(packet: &[u8], mtu: usize) -> usize {
    match layout(packet) {
        Some(l) if packet.len() > mtu && mtu > l.l3 + l.l4 => {
            let hdr = l.l3 + l.l4;
            let payload = l.total - hdr;
            let segments = payload.div_ceil(mtu - hdr).max(1);
            packet.len() + (segments - 1) * hdr
        }
        _ => packet.len(),
    }
}

/// The lengths of the segments [`segment_tcp`] makes of `packet` for `mtu` (one length, the
/// packet's own, when it needs no segmenting), in order.
pub fn segment_lens(packet: &[u8], mtu: usize) -> impl Iterator<Item = usize> {
    let (hdr, payload, mss) = match layout(packet) {
        Some(l) if packet.len() > mtu && mtu > l.l3 + l.l4 => {
            let hdr = l.l3 + l.l4;
            (hdr, l.total - hdr, mtu - hdr)
        }
        _ => (0, packet.len(), packet.len().max(1)),
    };
    let n = payload.div_ceil(mss).max(1);
    (0..n).map(move |i| hdr + mss.min(payload - (i * mss).min(payload)))
}

/// Splits the TCP packet `packet` into segments of at most `mtu` bytes, building each in
/// `scratch` (at least `mtu` bytes) and handing it to `emit`. Returns the number of segments.
pub fn segment_tcp(
    packet: &[u8],
    mtu: usize,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, GsoError> {
    let l = layout(packet).ok_or(GsoError::Malformed)?;
    let hdr = l.l3 + l.l4;
    if mtu <= hdr || scratch.len() < mtu {
        return Err(GsoError::MtuTooSmall);
    }
    let (src, dst) = addrs(packet, l.v6).ok_or(GsoError::Malformed)?;
    let mss = mtu - hdr;
    let payload = &packet[hdr..l.total];
    let seq0 = u32::from_be_bytes([
        packet[l.l3 + 4],
        packet[l.l3 + 5],
        packet[l.l3 + 6],
        packet[l.l3 + 7],
    ]);
    let id0 = if l.v6 {
        0
    } else {
        u16::from_be_bytes([packet[4], packet[5]])
    };
    let flags0 = packet[l.l3 + 13];
    let chunks = payload.len().div_ceil(mss).max(1);
    let mut off = 0usize;
    for i in 0..chunks {
        let n = mss.min(payload.len() - off);
        let len = hdr + n;
        let seg = &mut scratch[..len];
        seg[..hdr].copy_from_slice(&packet[..hdr]);
        seg[hdr..].copy_from_slice(&payload[off..off + n]);
        if l.v6 {
            let plen = u16::try_from(len - 40).map_err(|_| GsoError::Malformed)?;
            seg[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tl = u16::try_from(len).map_err(|_| GsoError::Malformed)?;
            seg[2..4].copy_from_slice(&tl.to_be_bytes());
            let id = id0.wrapping_add(u16::try_from(i).unwrap_or(u16::MAX));
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&seg[..l.l3]);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = l.l3;
        let seq = seq0.wrapping_add(u32::try_from(off).unwrap_or(u32::MAX));
        seg[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < chunks {
            flags &= !(FIN | PSH);
        }
        if i > 0 {
            flags &= !CWR;
        }
        seg[t + 13] = flags;
        seg[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let c = checksum::transport(src, dst, TCP, &seg[t..]);
        seg[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
        off += n;
    }
    Ok(chunks)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use snas_wire::build::{tcp, TcpSpec};
    use snas_wire::TcpFlags;

    /// A TCP packet 192.0.2.1:40000 → 203.0.113.10:443 with `len` bytes of patterned payload.
    pub(crate) fn big(len: usize, flags: TcpFlags) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        tcp(&TcpSpec {
            src: "192.0.2.1:40000".parse().unwrap(),
            dst: "203.0.113.10:443".parse().unwrap(),
            seq: 1000,
            ack: 5,
            flags,
            window: 100,
            payload: &payload,
        })
        .unwrap()
    }

    #[test]
    fn segments_carry_the_payload_in_order_with_valid_checksums() {
        let p = big(4000, TcpFlags(TcpFlags::ACK.0 | FIN | PSH));
        let mut scratch = vec![0u8; 1500];
        let mut segs = Vec::new();
        let n = segment_tcp(&p, 1500, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() <= 1500);
            assert_eq!(checksum::checksum(&s[..20]), 0, "IPv4 header checksum");
            let (src, dst) = addrs(s, false).unwrap();
            assert_eq!(checksum::transport(src, dst, TCP, &s[20..]), 0);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq as usize, 1000 + joined.len());
            let last = i + 1 == segs.len();
            assert_eq!(s[33] & FIN != 0, last);
            joined.extend_from_slice(&s[40..]);
        }
        assert_eq!(joined, p[40..].to_vec());
    }

    #[test]
    fn a_super_packet_is_charged_its_segments_headers() {
        let p = big(4000, TcpFlags::ACK);
        // 4000 bytes of payload in 1460-byte segments: three segments, two extra headers.
        assert_eq!(wire_len(&p, 1500), p.len() + 2 * 40);
        let mut scratch = vec![0u8; 1500];
        let mut total = 0;
        segment_tcp(&p, 1500, &mut scratch, |s| total += s.len()).unwrap();
        assert_eq!(wire_len(&p, 1500), total);
        assert_eq!(wire_len(&big(100, TcpFlags::ACK), 1500), 140);
        let mut lens = Vec::new();
        segment_tcp(&p, 1444, &mut scratch, |s| lens.push(s.len())).unwrap();
        assert_eq!(segment_lens(&p, 1444).collect::<Vec<_>>(), lens);
        assert_eq!(
            segment_lens(&big(100, TcpFlags::ACK), 1500).collect::<Vec<_>>(),
            [140]
        );
        assert_eq!(wire_len(&[0x45; 3000], 1500), 3000);
    }

    #[test]
    fn small_or_non_tcp_packets_need_no_segmenting() {
        assert!(!needs_segmenting(&big(100, TcpFlags::ACK), 1500));
        assert!(needs_segmenting(&big(3000, TcpFlags::ACK), 1500));
        assert!(!needs_segmenting(&[0x45; 3000], 1500));
    }
}
