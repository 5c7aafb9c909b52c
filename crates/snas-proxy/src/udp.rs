//! The GENEVE socket of one worker: UDP on `underlay:6081` with `SO_REUSEPORT`, batched with
//! `recvmmsg`/`sendmmsg`, plus `poll` and the busy-poll yield.
//!
//! # What it owns
//! The socket file descriptor and the `mmsghdr`/`iovec`/`sockaddr_in` arrays of one batch. The
//! arrays are allocated once per worker and reused: nothing is allocated per datagram.
//!
//! # Invariants
//! - The socket is non-blocking; `recv_batch` returns 0 when nothing is queued.
//! - Receive buffers are 64 KiB so that TCP GSO super-packets that tier 1 encapsulated
//!   unsegmented (up to a 64 KiB inner packet) arrive whole.
//!
//! # Limits
//! IPv4 underlay only. Several workers bound with `SO_REUSEPORT` share datagrams by the kernel's
//! 4-tuple hash, and tier 1 derives the outer source port from the inner flow hash, so one inner
//! flow lands on one worker.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of each receive buffer.
pub const RECV_BUF_LEN: usize = 65536;

/// Socket receive/send buffer size requested (bytes).
const SOCK_BUF: libc::c_int = 8 << 20;

/// Longest wait for room in a full send buffer before a datagram is given up.
pub const SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

fn set_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `v` lives across the call and the length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// A non-blocking UDP socket bound with `SO_REUSEPORT`.
#[derive(Debug)]
pub struct GeneveSocket {
    fd: OwnedFd,
}

impl GeneveSocket {
    /// Binds `addr` (non-blocking, `SO_REUSEPORT`, large buffers).
    pub fn bind(addr: SocketAddrV4) -> io::Result<GeneveSocket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(last_err());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        set_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        // Buffer sizes are best effort (capped by net.core.*mem_max).
        let _ = set_opt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCK_BUF);
        let _ = set_opt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCK_BUF);
        let sa = sockaddr(addr);
        // SAFETY: `sa` is a valid sockaddr_in and the length is its size.
        let r = unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(last_err());
        }
        Ok(GeneveSocket { fd })
    }

    /// The descriptor (for `poll`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Where a received datagram came from and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// Outer source.
    pub src: SocketAddrV4,
    /// Bytes.
    pub len: usize,
}

/// Reusable `recvmmsg` state: buffers and headers for `n` datagrams.
#[derive(Debug)]
pub struct RecvBatch {
    /// The datagram buffers (each [`RECV_BUF_LEN`] long).
    pub bufs: Vec<Vec<u8>>,
    /// Metadata of the last receive (valid for the first `n` entries).
    pub meta: Vec<RecvMeta>,
    iov: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// Buffers for `n` datagrams.
    pub fn new(n: usize) -> RecvBatch {
        let zero_addr = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; RECV_BUF_LEN]).collect(),
            meta: vec![
                RecvMeta {
                    src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                    len: 0
                };
                n
            ],
            iov: (0..n)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            addrs: vec![zero_addr; n],
            // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
            hdrs: (0..n).map(|_| unsafe { mem::zeroed() }).collect(),
        }
    }

    /// Receives up to a batch; returns how many datagrams (0 if none were queued).
    pub fn recv(&mut self, sock: &GeneveSocket) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at live buffers/addresses owned by `self` for the call,
        // and `n` headers are initialised.
        let r = unsafe {
            libc::recvmmsg(
                sock.raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = last_err();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        let got = r as usize;
        for i in 0..got {
            self.meta[i] = RecvMeta {
                src: from_sockaddr(&self.addrs[i]),
                len: self.hdrs[i].msg_len as usize,
            };
        }
        Ok(got)
    }
}

/// Reusable `sendmmsg` state.
#[derive(Debug, Default)]
pub struct SendBatch {
    iov: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Room for `n` datagrams without reallocation.
    pub fn with_capacity(n: usize) -> SendBatch {
        SendBatch {
            iov: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
            hdrs: Vec::with_capacity(n),
        }
    }

    /// Sends every `(destination, payload)`; returns how many the kernel took and how many it
    /// refused. A full socket buffer is waited out for up to [`SEND_WAIT`] once per datagram;
    /// a datagram the kernel still refuses (full buffer, no route) is skipped and counted as
    /// refused, so the caller can count the drop.
    pub fn send<'a, I>(&mut self, sock: &GeneveSocket, msgs: I) -> (usize, usize)
    where
        I: IntoIterator<Item = (SocketAddrV4, &'a [u8])>,
    {
        self.iov.clear();
        self.addrs.clear();
        self.hdrs.clear();
        for (dst, data) in msgs {
            self.addrs.push(sockaddr(dst));
            self.iov.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
        }
        let n = self.iov.len();
        for i in 0..n {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
        let mut sent = 0;
        let mut off = 0;
        let mut waited = false;
        while off < n {
            // SAFETY: headers `off..n` point at the caller's payloads (borrowed for 'a, alive
            // during the call) and at `self.addrs`/`self.iov`, which are not resized here.
            let r = unsafe {
                libc::sendmmsg(
                    sock.raw_fd(),
                    self.hdrs.as_mut_ptr().add(off),
                    (n - off) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = last_err();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == io::ErrorKind::WouldBlock && !waited {
                    // The buffer drains as the kernel forwards; wait for room once.
                    waited = true;
                    let mut pfd = [libc::pollfd {
                        fd: sock.raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    }];
                    if poll(&mut pfd, SEND_WAIT).is_ok_and(|n| n > 0) {
                        continue;
                    }
                }
                // Skip the datagram that failed.
                waited = false;
                off += 1;
                continue;
            }
            let r = r as usize;
            waited = false;
            sent += r;
            off += r.max(1);
        }
        (sent, n - sent)
    }
}

/// Waits for readiness on `fds` for at most `timeout` (`ppoll`, nanosecond resolution, so
/// that paced packets can be released on time). Interrupts count as a timeout.
pub fn poll(fds: &mut [libc::pollfd], timeout: std::time::Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length; `ts`
    // lives across the call; a null signal mask leaves the mask unchanged.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = last_err();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Gives the CPU to another runnable thread, if any (`sched_yield`); returns at once when none
/// is waiting. For a busy-polling worker on a shared core.
pub fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments and touches no memory of ours; on Linux it always
    // succeeds.
    unsafe {
        libc::sched_yield();
    }
}
