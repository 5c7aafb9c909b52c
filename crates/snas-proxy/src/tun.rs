//! The internet-side TUN device: one queue per worker, the egress pool routed to it.
//!
//! # What it owns
//! Opening `/dev/net/tun` (`IFF_TUN | IFF_NO_PI`, plus `IFF_MULTI_QUEUE` when there is more
//! than one worker), non-blocking `read`/`write` of single IP packets, and the one-time set-up
//! with `ip` (MTU, link up, a route for each egress prefix) and `net.ipv4.ip_forward=1` in the
//! proxy's namespace (written only when it is not already 1, so a read-only `/proc/sys` whose
//! value an init container set is fine). The device is not persistent: it and its routes disappear when the last
//! queue closes.
//!
//! # Choices
//! `IFF_VNET_HDR` with checksum and TCP segmentation offloads (`TUNSETOFFLOAD`
//! `CSUM | TSO4 | TSO6 | TSO_ECN`): every packet crosses with a virtio-net header
//! ([`crate::vnet`]). The proxy writes a job's TCP super-packet once and the kernel segments it
//! to the device MTU (the internet MTU, 1500 by default); the kernel hands the proxy up to
//! 64 KiB of a server's TCP stream in one read. Without it every 1,444-byte segment cost a
//! system call each way (issue 15). [`TunQueue::write`] and [`TunQueue::read`] take the
//! header apart from the packet so that no packet is copied to make room for it.
//!
//! Also reads the underlay's on-link prefixes ([`onlink_prefixes`]) for the infrastructure set.
//!
//! # Limits
//! The `ip` binary must be on `PATH` (start-up only).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::vnet::{VnetHdr, VNET_HDR_LEN, VNET_TNL_HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;
const TUN_F_UDP_TUNNEL_GSO: libc::c_ulong = 0x80;

/// `struct ifreq` as TUNSETIFF reads it (name + flags, padded to 40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN set-up failure.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// opening or attaching a queue failed
    #[error("TUN {name}: {op}: {source}")]
    Open {
        /// Device name.
        name: String,
        /// The failing step.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// an `ip` command or the sysctl failed
    #[error("TUN {name}: `{command}` failed: {detail}")]
    Setup {
        /// Device name.
        name: String,
        /// The command.
        command: String,
        /// Its stderr or the I/O error.
        detail: String,
    },
}

/// One queue of the TUN device.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
}

impl TunQueue {
    /// Opens one queue of the internet-side TUN device `name` (created by the first queue).
    pub fn open(name: &str, multi_queue: bool) -> Result<TunQueue, TunError> {
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        Self::open_with(name, IFF_TUN, multi_queue, VNET_HDR_LEN, offloads)
    }

    /// Opens one queue of the underlay-side TAP device `name` (see [`UnderlayTap`]).
    fn open_tap(name: &str, multi_queue: bool) -> Result<TunQueue, TunError> {
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UDP_TUNNEL_GSO;
        Self::open_with(name, IFF_TAP, multi_queue, VNET_TNL_HDR_LEN, offloads)
    }

    fn open_with(
        name: &str,
        kind: libc::c_short,
        multi_queue: bool,
        hdr_len: usize,
        offloads: libc::c_ulong,
    ) -> Result<TunQueue, TunError> {
        let err = |op, source| TunError::Open {
            name: name.to_owned(),
            op,
            source,
        };
        if name.is_empty() || name.len() > 15 {
            return Err(err(
                "name",
                io::Error::new(io::ErrorKind::InvalidInput, "name must be 1..=15 bytes"),
            ));
        }
        // SAFETY: the path is a NUL-terminated literal; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(err("open /dev/net/tun", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; 16],
            flags: kind | IFF_NO_PI | IFF_VNET_HDR | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its layout and size and
        // lives across the call.
        let r = unsafe { libc::ioctl(raw, TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(err("TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr_len = hdr_len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which lives across the call.
        let r = unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if r < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe { libc::ioctl(raw, TUNSETOFFLOAD, offloads) };
        if r < 0 {
            return Err(err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(TunQueue { fd })
    }

    /// The descriptor (for `poll`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet: its virtio-net header into `hdr`, the packet into `buf`;
    /// `Ok(None)` when nothing is queued, else the packet's length.
    pub fn read(&self, hdr: &mut [u8; VNET_HDR_LEN], buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // SAFETY: both iovecs point at live, writable buffers of the lengths given.
        let r = unsafe { libc::readv(self.raw_fd(), iov.as_mut_ptr(), 2) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some((r as usize).saturating_sub(VNET_HDR_LEN)))
    }

    /// Writes one packet behind its virtio-net header. A full device queue (`EAGAIN`) or a
    /// refused packet is an error the caller counts as a drop.
    pub fn write(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        let h = hdr.encode();
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the lengths given; writev only reads.
        let r = unsafe { libc::writev(self.raw_fd(), iov.as_ptr(), 2) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The underlay-side TAP device through which a proxy hands the kernel whole UDP-tunnelled
/// TCP super-packets for nodes (one queue per worker).
///
/// A UDP socket cannot send a GENEVE datagram that the kernel is to split into GENEVE
/// datagrams (`UDP_SEGMENT` splits the payload blindly). A TAP device with a
/// `virtio_net_hdr_v1_hash_tunnel` header and `TUN_F_UDP_TUNNEL_GSO` (Linux 6.17+) can take
/// one: the frame enters this namespace as if received on the TAP, is routed to the node like
/// any forwarded packet, and stays one skb of up to 64 KiB to the node, whose tier 1
/// decapsulates it whole (a veth, a bridge and the node's tc program carry it unsegmented; a
/// NIC segments it in hardware or the kernel does before the wire). The frame's source is the
/// proxy's own underlay address, so the TAP has `accept_local` and no reverse-path filter;
/// it has no address and no route leads to it: nothing is ever sent into it by the kernel.
#[derive(Debug)]
pub struct UnderlayTap {
    queue: TunQueue,
    mac: [u8; 6],
}

impl UnderlayTap {
    /// Opens one queue of TAP device `name` (created by the first queue).
    pub fn open(name: &str, multi_queue: bool) -> Result<UnderlayTap, TunError> {
        let queue = TunQueue::open_tap(name, multi_queue)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: SIOCGIFHWADDR on a TUN/TAP descriptor writes the device's address (a struct
        // sockaddr: family, then the 6 bytes) into the struct ifreq, which `req` lays out and
        // which lives across the call.
        let r = unsafe { libc::ioctl(queue.raw_fd(), SIOCGIFHWADDR, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TunError::Open {
                name: name.to_owned(),
                op: "SIOCGIFHWADDR",
                source: io::Error::last_os_error(),
            });
        }
        // ifr_hwaddr: sa_family (2 bytes, the `flags` field here), then sa_data.
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req._pad[..6]);
        Ok(UnderlayTap { queue, mac })
    }

    /// The device's MAC address: the destination of every frame written to it.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Writes one frame: `hdr` ([`crate::vnet::tunnel_header`]), then `parts` in order.
    pub fn write(&self, hdr: &[u8; VNET_TNL_HDR_LEN], parts: [&[u8]; 2]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: parts[0].as_ptr() as *mut libc::c_void,
                iov_len: parts[0].len(),
            },
            libc::iovec {
                iov_base: parts[1].as_ptr() as *mut libc::c_void,
                iov_len: parts[1].len(),
            },
        ];
        // SAFETY: every iovec points at a live buffer of the length given; writev only reads.
        let r = unsafe { libc::writev(self.queue.raw_fd(), iov.as_ptr(), 3) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Brings the device up with no address and no IPv6, and lets frames with this
    /// namespace's own source addresses in (`accept_local`, `rp_filter` 0 on the device). Fails
    /// when the namespace filters reverse paths strictly (`net.ipv4.conf.all.rp_filter` = 1),
    /// under which the frames would be dropped as martians.
    pub fn configure(name: &str) -> Result<(), TunError> {
        let sysctl = |key: String, value: &str| ensure_sysctl(name, &key, value);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        sysctl(format!("/proc/sys/net/ipv4/conf/{name}/accept_local"), "1")?;
        sysctl(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0")?;
        let all =
            std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
        if all.trim() == "1" {
            return Err(TunError::Setup {
                name: name.to_owned(),
                command: "read net.ipv4.conf.all.rp_filter".into(),
                detail: "strict reverse-path filtering (1) would drop the frames; use 0 or 2"
                    .into(),
            });
        }
        run_ip(name, &["link", "set", "dev", name, "up"])
    }
}

fn run_ip(name: &str, args: &[&str]) -> Result<(), TunError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunError::Setup {
            name: name.to_owned(),
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TunError::Setup {
            name: name.to_owned(),
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The on-link prefixes of the interface(s) holding `addr` (`ip -j -4 addr show`): the underlay
/// network as this namespace sees it (part of the infrastructure set by default).
pub fn onlink_prefixes(addr: Ipv4Addr) -> Result<Vec<Ipv4Net>, TunError> {
    let command = "ip -j -4 addr show".to_owned();
    let fail = |detail: String| TunError::Setup {
        name: String::new(),
        command: command.clone(),
        detail,
    };
    let out = Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    parse_onlink(&String::from_utf8_lossy(&out.stdout), addr).map_err(fail)
}

/// The prefixes of `addr` in `ip -j -4 addr show` output.
pub fn parse_onlink(json: &str, addr: Ipv4Addr) -> Result<Vec<Ipv4Net>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let links = v.as_array().ok_or("not a JSON array")?;
    let mut out = Vec::new();
    for info in links
        .iter()
        .filter_map(|l| l.get("addr_info").and_then(|a| a.as_array()))
        .flatten()
    {
        let local = info.get("local").and_then(|l| l.as_str());
        let len = info.get("prefixlen").and_then(|p| p.as_u64());
        if let (Some(local), Some(len)) = (local, len) {
            if local.parse::<Ipv4Addr>().ok() == Some(addr) {
                let len = u8::try_from(len).map_err(|_| "bad prefixlen")?;
                let net = Ipv4Net::new(addr, len).map_err(|e| e.to_string())?;
                out.push(net.trunc());
            }
        }
    }
    Ok(out)
}

/// Packets the kernel may queue toward the proxy on the TUN device (its default, 500, is about
/// eleven 64 KiB bursts of 1,444-byte segments).
pub const TUN_TXQUEUELEN: u32 = 4096;

/// Disables IPv6 on the device, sets the MTU and the queue length, brings it up, routes every
/// egress prefix to it and enables IPv4 forwarding in this namespace.
pub fn configure(name: &str, mtu: u32, pool: &[Ipv4Net]) -> Result<(), TunError> {
    // The egress pool is IPv4: without IPv6 on the device the kernel sends no router
    // solicitations or MLD reports into it (they would be counted as tier-2 drops). Best effort:
    // the file is absent when IPv6 is disabled in the kernel.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mtu = mtu.to_string();
    // The kernel queues internet-side packets for the proxy on the TUN device's qdisc. A
    // sender's TSO burst (one 64 KiB skb becomes ~45 segments here) overflowed the default 500
    // packets whenever the worker was busy: the device's tx_dropped equalled the server's
    // retransmissions (1.9-6.4k per 3.5 s download from gVisor); with TUN_TXQUEUELEN, none.
    let qlen = TUN_TXQUEUELEN.to_string();
    run_ip(
        name,
        &[
            "link",
            "set",
            "dev",
            name,
            "mtu",
            &mtu,
            "txqueuelen",
            &qlen,
            "up",
        ],
    )?;
    for net in pool {
        let net = net.trunc().to_string();
        run_ip(name, &["route", "replace", &net, "dev", name])?;
    }
    ensure_sysctl(name, "/proc/sys/net/ipv4/ip_forward", "1")
}

/// Carries the IPv6 egress pool on the device (after [`configure`]): IPv6 on the device with no
/// address of its own (`addr_gen_mode` 1: no link-local, so the kernel has no source for router
/// solicitations), no router advertisements or autoconfiguration, a route for every prefix of
/// `pool6`, and IPv6 forwarding in this namespace. Nothing changes for an empty pool: the
/// device stays IPv4-only.
pub fn configure6(name: &str, pool6: &[Ipv6Net]) -> Result<(), TunError> {
    if pool6.is_empty() {
        return Ok(());
    }
    let conf = |key: &str| format!("/proc/sys/net/ipv6/conf/{name}/{key}");
    for (key, value) in [
        ("addr_gen_mode", "1"),
        ("accept_ra", "0"),
        ("autoconf", "0"),
        ("router_solicitations", "0"),
        ("disable_ipv6", "0"),
    ] {
        ensure_sysctl(name, &conf(key), value)?;
    }
    for net in pool6 {
        let net = net.trunc().to_string();
        run_ip(name, &["-6", "route", "replace", &net, "dev", name])?;
    }
    ensure_sysctl(name, "/proc/sys/net/ipv6/conf/all/forwarding", "1")
}

/// Sets the sysctl file `key` to `value` unless it already holds it: an unprivileged container
/// (Kubernetes mounts `/proc/sys` read-only) can run the proxy when an init container or the
/// operator has set the value, and only a value that differs makes start-up fail.
fn ensure_sysctl(name: &str, key: &str, value: &str) -> Result<(), TunError> {
    if std::fs::read_to_string(key).is_ok_and(|now| now.trim() == value) {
        return Ok(());
    }
    std::fs::write(key, value).map_err(|e| TunError::Setup {
        name: name.to_owned(),
        command: format!("write {value} to {key}"),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_underlay_prefix_is_found_by_its_address() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":7,"ifname":"ul0","addr_info":[{"family":"inet","local":"192.0.2.21","prefixlen":24},
                                                    {"family":"inet","local":"198.51.100.9","prefixlen":32}]}]"#;
        let got = parse_onlink(json, Ipv4Addr::new(192, 0, 2, 21)).unwrap();
        assert_eq!(got, vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]);
        assert!(parse_onlink(json, Ipv4Addr::new(203, 0, 113, 1))
            .unwrap()
            .is_empty());
        assert!(parse_onlink("{}", Ipv4Addr::LOCALHOST).is_err());
    }
}
