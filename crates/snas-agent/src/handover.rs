//! Passing the agent's listening sockets to the next agent, so that DNS never stops.
//!
//! Owns the two ways a starting agent can get its sockets from the one before it, and the
//! checks that what it gets is what its configuration asks for:
//! - **hand-over** (any supervisor, or none): a running agent listens on
//!   `<state_dir>/handover.sock` (mode 0600; only callers with its own uid are served). A new
//!   agent started with the same configuration speaks this protocol, one line per message,
//!   strictly alternating:
//!   1. new → old `SNAS-HANDOVER/1 PREPARE` — old stops accepting API connections (they wait in
//!      the socket's backlog) and finishes the requests in progress, so no job is created or
//!      deleted behind the new agent's back; DNS, the policy endpoint and metrics go on;
//!      old → new `READY`.
//!   2. The new agent adopts the jobs (`Agent::start`) and installs tier 1's infrastructure set.
//!   3. new → old `TAKE` — old stops reading every listening socket (queries and connections
//!      wait in the kernel) and sends them all: old → new `FDS <name> <name> ...` with the
//!      descriptors in one `SCM_RIGHTS` message, in the order named.
//!   4. The new agent serves on them; new → old `DONE`. The old agent then waits for its
//!      forwards in progress to answer (they still hold the UDP socket) and exits.
//!
//!   If the new agent goes away (or is silent for [`PREPARE_TIMEOUT`] / [`DONE_TIMEOUT`])
//!   before `DONE`, the old agent resumes serving everything and keeps running.
//! - **systemd**: sockets passed as `LISTEN_FDS`/`LISTEN_FDNAMES` (socket activation, or the
//!   service's file descriptor store, which the agent fills with `FDSTORE=1` over
//!   `NOTIFY_SOCKET`, one message per socket with `FDNAME=<name>`), see [`listen_fds_from_env`]
//!   and [`notify`].
//!
//! Socket names: [`DNS_UDP`], [`DNS_TCP`], [`POLICY`], [`METRICS`], [`API`]. A socket whose
//! type or address does not match the configuration is closed and a fresh one bound.
//!
//! # Limits
//! - Established DNS-over-TCP connections are not passed: the old agent closes each after the
//!   query it is in (RFC 7766 clients reconnect); queued connections are passed.
//! - API keep-alive connections of the old agent are closed when it stops accepting; requests
//!   already sent on them are finished first.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The DNS stub's UDP socket.
pub const DNS_UDP: &str = "dns-udp";
/// The DNS stub's TCP listener.
pub const DNS_TCP: &str = "dns-tcp";
/// The policy endpoint's listener.
pub const POLICY: &str = "policy";
/// The metrics listener (`metrics_listen`).
pub const METRICS: &str = "metrics";
/// The local API's Unix listener.
pub const API: &str = "api";
/// Every name, in the order sockets are passed.
pub const NAMES: [&str; 5] = [DNS_UDP, DNS_TCP, POLICY, API, METRICS];

/// First line of the protocol.
pub const HELLO: &str = "SNAS-HANDOVER/1 PREPARE";
/// Time the old agent gives the new one between `READY` and `TAKE` (its job adoption).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Time each side waits for the other's next line otherwise.
pub const DONE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest protocol line.
const MAX_LINE: usize = 256;

/// The hand-over socket of an agent with `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// Errors of the hand-over, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Reading or writing the hand-over socket failed.
    #[error("{path}: {step}: {source}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The other side said something unexpected.
    #[error("{path}: {step}: unexpected answer {line:?}")]
    Protocol {
        path: PathBuf,
        step: &'static str,
        line: String,
    },
}

// ---------------------------------------------------------------------------------------------
// SCM_RIGHTS

/// Sends `data` with `fds` attached (`sendmsg`, `SCM_RIGHTS`). Non-blocking sockets may return
/// `WouldBlock`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let fd_bytes_u32 = u32::try_from(fd_bytes).map_err(|_| io::Error::other("too many fds"))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes_u32) } as usize;
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes, enough for one header with `fd_bytes`
        // of data (CMSG_SPACE); CMSG_FIRSTHDR is therefore non-null and CMSG_DATA has room
        // for `fd_bytes`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes_u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: msg points to live buffers (iov → data, control → cbuf) for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives into `buf` with up to `max_fds` descriptors attached (close-on-exec). More than
/// `max_fds` is an error (all are closed).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let fd_bytes = u32::try_from(max_fds * std::mem::size_of::<RawFd>())
        .map_err(|_| io::Error::other("too many fds"))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points to live buffers for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsg
    // headers; CMSG_FIRSTHDR/NXTHDR walk within them, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours to close.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // The control buffer is rounded up and may hold more than `max_fds`: those are closed too.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        return Err(io::Error::other(
            "more descriptors than expected; they were closed",
        ));
    }
    Ok((n as usize, fds))
}

/// The uid of the process at the other end of a Unix socket.
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

// ---------------------------------------------------------------------------------------------
// Checking what we are given

fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd and a c_int out-buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// What a socket is, as far as adoption cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A UDP socket.
    Udp,
    /// A listening TCP socket.
    TcpListener,
    /// A listening Unix stream socket.
    UnixListener,
}

/// The kind of the socket `fd`, if it is one of [`Kind`].
pub fn kind(fd: BorrowedFd<'_>) -> Option<Kind> {
    let domain = sockopt_int(fd, libc::SO_DOMAIN).ok()?;
    let ty = sockopt_int(fd, libc::SO_TYPE).ok()?;
    let listening = sockopt_int(fd, libc::SO_ACCEPTCONN).ok()? != 0;
    match (domain, ty, listening) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, _) => Some(Kind::Udp),
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, true) => Some(Kind::TcpListener),
        (libc::AF_UNIX, libc::SOCK_STREAM, true) => Some(Kind::UnixListener),
        _ => None,
    }
}

/// Whether a socket bound to `actual` serves `wanted` (port 0 in the configuration: any port).
pub fn addr_matches(actual: SocketAddr, wanted: SocketAddr) -> bool {
    let canon = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    canon(actual.ip()) == canon(wanted.ip())
        && (wanted.port() == 0 || actual.port() == wanted.port())
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The first descriptor systemd passes.
const LISTEN_FDS_START: RawFd = 3;

/// Parses systemd's `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` for process `pid`: the passed
/// descriptors with their names (`unknown` where systemd gave none). Empty when the variables
/// are for another process or absent.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> Result<Vec<(RawFd, String)>, String> {
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    if p.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(Vec::new());
    }
    let n: RawFd = n
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS: {n:?} is not a number"))?;
    if !(0..=1024).contains(&n) {
        return Err(format!("LISTEN_FDS: {n} is out of range"));
    }
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    Ok((0..n)
        .map(|i| {
            let name = names
                .get(i as usize)
                .filter(|s| names.len() == n as usize && !s.is_empty())
                .map_or("unknown", |s| s);
            (LISTEN_FDS_START + i, name.to_owned())
        })
        .collect())
}

/// The sockets systemd passed to this process (socket activation or the fd store), by name.
pub fn listen_fds_from_env() -> Result<Vec<(String, OwnedFd)>, String> {
    let var = |k: &str| std::env::var(k).ok();
    let parsed = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    Ok(parsed
        .into_iter()
        .map(|(fd, name)| {
            // SAFETY: systemd passed descriptor `fd` to this process (LISTEN_PID is ours) and
            // nothing else in the agent takes it: it is owned from here on.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a valid fd; FD_CLOEXEC is the only flag set.
            unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            (name, owned)
        })
        .collect())
}

/// Sends `state` (e.g. `READY=1`, `FDSTORE=1\nFDNAME=dns-udp`) to systemd's notification socket
/// `socket` (a path, or `@name` for the abstract namespace), with `fds` attached.
pub fn notify(socket: &str, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let addr = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            UnixAddr::from_abstract_name(name.as_bytes())?
        }
        None => UnixAddr::from_pathname(socket)?,
    };
    let s = UnixDatagram::unbound()?;
    s.connect_addr(&addr)?;
    send_with_fds(s.as_fd(), state.as_bytes(), fds)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The protocol

/// Reads one line (without the newline) within `timeout`; `None` at end of stream.
pub async fn read_line(s: &mut UnixStream, timeout: Duration) -> io::Result<Option<String>> {
    let read = async {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).await? == 0 {
                return Ok(None);
            }
            if b[0] == b'\n' {
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            line.push(b[0]);
            if line.len() > MAX_LINE {
                return Err(io::Error::other("line too long"));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Writes one line.
pub async fn write_line(s: &mut UnixStream, line: &str) -> io::Result<()> {
    s.write_all(format!("{line}\n").as_bytes()).await
}

/// Sends `FDS <names>` with the descriptors.
pub async fn send_sockets(s: &UnixStream, socks: &[(&str, BorrowedFd<'_>)]) -> io::Result<()> {
    let names: Vec<&str> = socks.iter().map(|(n, _)| *n).collect();
    let line = format!("FDS {}\n", names.join(" "));
    let fds: Vec<BorrowedFd<'_>> = socks.iter().map(|(_, f)| *f).collect();
    let n = s
        .async_io(Interest::WRITABLE, || {
            send_with_fds(s.as_fd(), line.as_bytes(), &fds)
        })
        .await?;
    if n != line.len() {
        return Err(io::Error::other("short write of the FDS line"));
    }
    Ok(())
}

/// The new agent's side of a hand-over.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: UnixStream,
}

impl Client {
    /// Connects to the running agent's hand-over socket; `None` if no agent listens there (no
    /// file, or a stale one).
    pub async fn connect(path: &Path) -> Result<Option<Client>, HandoverError> {
        match UnixStream::connect(path).await {
            Ok(stream) => Ok(Some(Client {
                path: path.to_owned(),
                stream,
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(HandoverError::Io {
                path: path.to_owned(),
                step: "connect",
                source,
            }),
        }
    }

    fn io(&self, step: &'static str) -> impl FnOnce(io::Error) -> HandoverError + '_ {
        move |source| HandoverError::Io {
            path: self.path.clone(),
            step,
            source,
        }
    }

    async fn expect(
        &mut self,
        step: &'static str,
        want: &str,
        timeout: Duration,
    ) -> Result<(), HandoverError> {
        let line = read_line(&mut self.stream, timeout)
            .await
            .map_err(self.io(step))?
            .unwrap_or_default();
        if line != want {
            return Err(HandoverError::Protocol {
                path: self.path.clone(),
                step,
                line,
            });
        }
        Ok(())
    }

    /// Step 1: asks the running agent to stop changing jobs; returns once it has.
    pub async fn prepare(&mut self) -> Result<(), HandoverError> {
        write_line(&mut self.stream, HELLO)
            .await
            .map_err(self.io("PREPARE"))?;
        self.expect("PREPARE", "READY", DONE_TIMEOUT).await
    }

    /// Step 3: asks for the sockets; returns them by name.
    pub async fn take(&mut self) -> Result<Vec<(String, OwnedFd)>, HandoverError> {
        write_line(&mut self.stream, "TAKE")
            .await
            .map_err(self.io("TAKE"))?;
        let mut buf = [0u8; MAX_LINE];
        let stream = &self.stream;
        let recv = stream.async_io(Interest::READABLE, || {
            recv_with_fds(stream.as_fd(), &mut buf, NAMES.len())
        });
        let (n, fds) = tokio::time::timeout(DONE_TIMEOUT, recv)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))
            .and_then(|r| r)
            .map_err(self.io("TAKE"))?;
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        let names: Vec<String> = match line.strip_suffix('\n').and_then(|l| l.strip_prefix("FDS")) {
            Some(rest) => rest.split_whitespace().map(str::to_owned).collect(),
            None => {
                return Err(HandoverError::Protocol {
                    path: self.path.clone(),
                    step: "TAKE",
                    line,
                })
            }
        };
        if names.len() != fds.len() {
            return Err(HandoverError::Protocol {
                path: self.path.clone(),
                step: "TAKE",
                line: format!("{line} with {} descriptors", fds.len()),
            });
        }
        Ok(names.into_iter().zip(fds).collect())
    }

    /// Step 4: tells the old agent it may go.
    pub async fn done(mut self) -> Result<(), HandoverError> {
        write_line(&mut self.stream, "DONE")
            .await
            .map_err(self.io("DONE"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_is_read_only_for_this_process() {
        assert_eq!(parse_listen_env(None, None, None, 7), Ok(vec![]));
        assert_eq!(parse_listen_env(Some("8"), Some("2"), None, 7), Ok(vec![]));
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("dns-udp:dns-tcp"), 7),
            Ok(vec![(3, "dns-udp".to_owned()), (4, "dns-tcp".to_owned())])
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("dns-udp"), 7),
            Ok(vec![(3, "unknown".to_owned()), (4, "unknown".to_owned())]),
            "names that do not match the count are not trusted"
        );
        assert!(parse_listen_env(Some("7"), Some("x"), None, 7).is_err());
    }

    #[test]
    fn a_port_0_address_matches_any_port_of_its_ip() {
        let a: SocketAddr = "192.0.2.7:7070".parse().unwrap();
        assert!(addr_matches(a, "192.0.2.7:0".parse().unwrap()));
        assert!(addr_matches(a, "192.0.2.7:7070".parse().unwrap()));
        assert!(!addr_matches(a, "192.0.2.7:7071".parse().unwrap()));
        assert!(!addr_matches(a, "192.0.2.8:7070".parse().unwrap()));
        assert!(addr_matches(
            "[::ffff:192.0.2.7]:53".parse().unwrap(),
            "192.0.2.7:53".parse().unwrap()
        ));
    }

    #[test]
    fn descriptors_cross_a_socket_pair_and_keep_their_socket() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let n = send_with_fds(a.as_fd(), b"FDS dns-udp\n", &[udp.as_fd()]).unwrap();
        assert_eq!(n, 12);
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"FDS dns-udp\n");
        assert_eq!(fds.len(), 1);
        assert_eq!(kind(fds[0].as_fd()), Some(Kind::Udp));
        let got = std::net::UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr, "the same socket");
        assert_eq!(peer_uid(a.as_fd()).unwrap(), euid());
    }

    #[test]
    fn more_descriptors_than_expected_are_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s1 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send_with_fds(a.as_fd(), b"x", &[s1.as_fd(), s2.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        assert!(recv_with_fds(b.as_fd(), &mut buf, 1).is_err());
    }

    #[test]
    fn kinds_are_told_apart() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let conn = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        assert_eq!(kind(udp.as_fd()), Some(Kind::Udp));
        assert_eq!(kind(tcp.as_fd()), Some(Kind::TcpListener));
        assert_eq!(kind(unix.as_fd()), Some(Kind::UnixListener));
        assert_eq!(kind(conn.as_fd()), None, "a connection is not a listener");
    }
}
