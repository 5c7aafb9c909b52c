//! Internet checksum (RFC 1071) and incremental updates (RFC 1624).
//!
//! Owns the one's-complement arithmetic every view and builder uses. Full sums are for building
//! and verifying; the hot path (NAT rewrites) uses the `update_*` functions, which touch only the
//! changed words and so cost the same for a 64-byte and a 64-KiB packet.
//!
//! # Invariants
//! - `update_*` implement RFC 1624 equation 3, `HC' = ~(~HC + ~m + m')`, which never produces the
//!   "negative zero" pitfall of equation 2. Given a correct `HC`, the result equals a full
//!   recomputation whenever the covered data is not all zeros (always true for IP, TCP, UDP and
//!   ICMP, whose pseudo-header or type fields are non-zero), as property tests check.
//! - UDP over IPv4 uses checksum 0 for "none": callers must not update a zero UDP checksum and must
//!   map a computed 0 to 0xFFFF ([`udp_field`]); the views in this crate do both.

use std::net::IpAddr;

/// Adds `data` to a running one's-complement sum as big-endian 16-bit words; an odd last byte is
/// padded with a zero byte on the right. The sum is kept unfolded in a `u64`, which cannot
/// overflow for any packet this crate handles.
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Two 32-bit big-endian halves: adding 32-bit words is equivalent modulo 0xFFFF once folded.
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        sum += u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for w in &mut rest {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a running sum to 16 bits with end-around carry.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    // The loop leaves at most 0xFFFF, so the cast is lossless.
    sum as u16
}

/// The checksum field value for a running sum: the one's complement of the folded sum.
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Checksum of `data` alone (IPv4 header, ICMPv4).
pub fn checksum(data: &[u8]) -> u16 {
    finish(add(0, data))
}

/// Running sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 793/768 for IPv4, RFC 8200 §8.1 for
/// IPv6). `src` and `dst` must be of the same family; a mixed pair sums both as given, which no
/// caller in this crate does.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, l4_len: u32) -> u64 {
    let mut sum = 0;
    sum = add_addr(sum, src);
    sum = add_addr(sum, dst);
    sum += u64::from(protocol);
    sum + u64::from(l4_len >> 16) + u64::from(l4_len & 0xFFFF)
}

fn add_addr(sum: u64, addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => add(sum, &a.octets()),
        IpAddr::V6(a) => add(sum, &a.octets()),
    }
}

/// Full transport checksum (TCP, UDP, ICMPv6) over pseudo-header and `segment`, with the
/// segment's own checksum field taken as it is (zero it first when computing).
pub fn transport(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    // Segments are at most 64 KiB (IPv6 jumbograms are not supported), so the length fits.
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    finish(add(pseudo_header(src, dst, protocol, len), segment))
}

/// Maps a computed UDP checksum to its field value: 0 is sent as 0xFFFF (RFC 768), because 0 in
/// the field means "no checksum" for IPv4.
pub fn udp_field(computed: u16) -> u16 {
    if computed == 0 {
        0xFFFF
    } else {
        computed
    }
}

/// RFC 1624 eq. 3: the checksum after one 16-bit word of the covered data changed `old → new`.
pub fn update_u16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!csum) + u64::from(!old) + u64::from(new);
    !fold(sum)
}

/// Like [`update_u16`] for a 32-bit field (two adjacent words, e.g. an IPv4 address or TCP seq).
pub fn update_u32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = u64::from(!csum)
        + u64::from(!(old >> 16) & 0xFFFF)
        + u64::from(!old & 0xFFFF)
        + u64::from(new >> 16)
        + u64::from(new & 0xFFFF);
    !fold(sum)
}

/// Like [`update_u16`] for an even-length byte field aligned on a 16-bit boundary of the covered
/// data (e.g. an IPv6 address). `old` and `new` must have the same even length; extra bytes of the
/// longer one are ignored.
pub fn update_bytes(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u64::from(!csum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    !fold(sum)
}

/// The checksum after an address covered by it (IPv4 header, or a pseudo-header) changed. Both
/// addresses must be of the same family; a family change is not an incremental update and leaves
/// `csum` unchanged (callers reject it before).
pub fn update_addr(csum: u16, old: IpAddr, new: IpAddr) -> u16 {
    match (old, new) {
        (IpAddr::V4(o), IpAddr::V4(n)) => update_u32(csum, o.to_bits(), n.to_bits()),
        (IpAddr::V6(o), IpAddr::V6(n)) => update_bytes(csum, &o.octets(), &n.octets()),
        _ => csum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for w in data.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).map_or(0, |b| u32::from(*b));
            sum += hi | lo;
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn rfc1071_example_sums_to_known_value() {
        // RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (folded), checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), 0x220d);
    }

    #[test]
    fn udp_zero_is_sent_as_all_ones() {
        assert_eq!(udp_field(0), 0xFFFF);
        assert_eq!(udp_field(0x1234), 0x1234);
    }

    proptest! {
        #[test]
        fn wide_sum_matches_word_by_word_sum(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(checksum(&data), naive(&data));
        }

        #[test]
        fn update_u16_equals_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 2..200),
            idx in any::<prop::sample::Index>(),
            new in any::<u16>(),
        ) {
            // Keep the data non-zero, as real headers are (see module invariants).
            data[0] |= 1;
            let words = data.len() / 2;
            let i = 2 * idx.index(words);
            prop_assume!(i != 0);
            let before = checksum(&data);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            prop_assert_eq!(update_u16(before, old, new), checksum(&data));
        }

        #[test]
        fn update_u32_and_bytes_equal_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 20..64),
            new4 in any::<u32>(),
            new16 in any::<[u8; 16]>(),
        ) {
            data[0] |= 1;
            let before = checksum(&data);
            let old4 = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
            data[4..8].copy_from_slice(&new4.to_be_bytes());
            let mid = update_u32(before, old4, new4);
            prop_assert_eq!(mid, checksum(&data));
            let old16: Vec<u8> = data[2..18].to_vec();
            data[2..18].copy_from_slice(&new16);
            prop_assert_eq!(update_bytes(mid, &old16, &new16), checksum(&data));
        }
    }
}
