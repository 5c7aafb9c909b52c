//! A packet recorder for one namespace of the testbed: what crossed its interfaces while a test
//! ran, as IP header summaries. The adversarial tests use it to prove that nothing a job sent
//! toward infrastructure arrived on the underlay or in the internet.
//!
//! # How
//! A thread enters the namespace and reads an `AF_PACKET` socket bound to every interface
//! (`ETH_P_ALL`, so frames in both directions are seen, on every port of a bridge once per
//! port), with a short receive timeout so that [`Capture::stop`] returns within ~50 ms.
//!
//! # Limits
//! Summaries only (addresses, protocol, ports of the outer IP header); frames the kernel drops
//! before the packet socket taps them are not seen. Records at most [`MAX_RECORDS`] packets
//! (the rest are counted in [`Recording::missed`]).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::{netns_path, NetnsError};

/// Most packets kept by one capture.
pub const MAX_RECORDS: usize = 1_000_000;

/// One captured IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Interface index (in the captured namespace).
    pub ifindex: i32,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// TCP/UDP source port (0 for other protocols).
    pub sport: u16,
    /// TCP/UDP destination port (0 for other protocols).
    pub dport: u16,
}

/// What a capture saw.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// IP packets, in arrival order.
    pub packets: Vec<Seen>,
    /// Packets not kept because [`MAX_RECORDS`] was reached.
    pub missed: u64,
}

/// A running capture; [`Capture::stop`] ends it. Dropping it stops the thread too.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Recording>>>,
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> NetnsError {
    move |source| NetnsError::Io { what, source }
}

/// Opens an `AF_PACKET` socket for every protocol on every interface, with a receive timeout.
fn packet_socket(timeout: Duration) -> io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: libc::suseconds_t::try_from(timeout.as_micros()).unwrap_or(50_000),
    };
    // SAFETY: the option value points to a live timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Summarises an Ethernet frame's IP header (IPv4 or IPv6 behind Ethernet, VLAN tags skipped).
pub fn summarise(frame: &[u8], ifindex: i32) -> Option<Seen> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        off += 4;
        ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    let l3 = frame.get(off + 2..)?;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match ethertype {
        0x0800 => {
            let ihl = usize::from(l3.first()? & 0x0f) * 4;
            let s: [u8; 4] = l3.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = l3.get(16..20)?.try_into().ok()?;
            (
                s.into(),
                d.into(),
                *l3.get(9)?,
                l3.get(ihl..).unwrap_or(&[]),
            )
        }
        0x86dd => {
            let s: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = l3.get(24..40)?.try_into().ok()?;
            (s.into(), d.into(), *l3.get(6)?, l3.get(40..).unwrap_or(&[]))
        }
        _ => return None,
    };
    let (sport, dport) = match (proto, l4.get(0..4)) {
        (6 | 17, Some(p)) => (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        _ => (0, 0),
    };
    Some(Seen {
        ifindex,
        src,
        dst,
        proto,
        sport,
        dport,
    })
}

fn record(sock: &OwnedFd, stop: &AtomicBool) -> io::Result<Recording> {
    let mut rec = Recording::default();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and from are live and writable for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let n = usize::try_from(n).unwrap_or(0);
        if let Some(seen) = summarise(&buf[..n], from.sll_ifindex) {
            if rec.packets.len() < MAX_RECORDS {
                rec.packets.push(seen);
            } else {
                rec.missed += 1;
            }
        }
    }
    Ok(rec)
}

impl Capture {
    /// Starts recording every IP packet on every interface of the named namespace. Returns once
    /// the socket is open, so nothing sent after the call is missed.
    pub fn start(netns: &str) -> Result<Capture, NetnsError> {
        let path = netns_path(netns);
        let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> io::Result<Recording> {
            // SAFETY: file is an open namespace file; setns does not retain the descriptor.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
            drop(file);
            let sock = match packet_socket(Duration::from_millis(50)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            record(&sock, &flag)
        });
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("capture thread ended")));
        ready.map_err(io_err(format!("packet socket in {netns}")))?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops recording and returns what was seen.
    pub fn stop(mut self) -> Result<Recording, NetnsError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map_err(io_err("capturing".into())),
            Some(Err(_)) => Err(NetnsError::Panicked("capture".into())),
            None => Ok(Recording::default()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_ipv4_udp_and_skip_vlan_tags() {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&[198, 51, 100, 65, 192, 0, 2, 21]);
        ip.extend_from_slice(&[0x9c, 0x40, 0x23, 0x82, 0, 8, 0, 0]);
        f.extend_from_slice(&ip);
        let s = summarise(&f, 3).unwrap();
        assert_eq!(s.src.to_string(), "198.51.100.65");
        assert_eq!(s.dst.to_string(), "192.0.2.21");
        assert_eq!((s.proto, s.sport, s.dport), (17, 40000, 9090));
        assert!(summarise(&f[..20], 3).is_none());
    }
}
