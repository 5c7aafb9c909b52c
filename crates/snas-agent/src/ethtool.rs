//! Restricting a sandbox interface's transmit offloads to what tier 1 can carry (the
//! `SIOCETHTOOL` ioctl).
//!
//! Owns the ethtool feature calls. Kept on: tx checksum offload and TCP segmentation (TSO for
//! IPv4 and IPv6, with ECN and mangled IDs, and generic GSO). Tier 1 encapsulates a job's TCP
//! super-packets whole and the proxy hands them to its TUN device whole, so a 64 KiB burst
//! costs one trip through each tier instead of ~45 (issue 15); the proxy finishes the
//! unfinished checksums that checksum offload leaves (`snas_proxy::vnet`). Turned off: every
//! other segmentation offload — UDP GSO makes `bpf_skb_adjust_room` fail (-524), and tunnel,
//! GSO-partial and GSO-list packets cannot be encapsulated again (see
//! /work/shared/notes/ebpf-on-this-kernel.md "Gotchas"); the job's kernel segments those before
//! the veth.
//!
//! Uses `ETHTOOL_SFEATURES` with bit positions looked up by name in the kernel's feature string
//! table (`ETH_SS_FEATURES`), which is what `ethtool -K` does; the legacy per-feature commands
//! cannot reach `tx-udp-segmentation`. The string table is global to the kernel, so it is read
//! once per process.
//!
//! # Invariants
//! - [`Ethtool::restrict_tx_offloads`] returns `Ok` only after reading back that no refused
//!   offload is still active on the device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// Errors from the ethtool ioctl.
#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    /// The control socket could not be opened.
    #[error("ethtool socket: {0}")]
    Socket(#[source] io::Error),
    /// An ioctl failed.
    #[error("ethtool {op} on {ifname}: {source}")]
    Ioctl {
        op: &'static str,
        ifname: String,
        #[source]
        source: io::Error,
    },
    /// Offloads are still on after the request (the driver refused to change them).
    #[error("{ifname}: offloads still active after turning them off: {features:?}")]
    StillActive {
        ifname: String,
        features: Vec<String>,
    },
    /// The interface name does not fit IFNAMSIZ.
    #[error("interface name {0:?} is too long")]
    Name(String),
}

/// Transmit offloads a sandbox interface keeps: checksum offload and TCP segmentation.
pub fn is_kept_tx_offload(name: &str) -> bool {
    name.starts_with("tx-checksum")
        || matches!(
            name,
            "tx-tcp-segmentation"
                | "tx-tcp6-segmentation"
                | "tx-tcp-ecn-segmentation"
                | "tx-tcp-mangleid-segmentation"
                | "tx-generic-segmentation"
        )
}

/// Transmit offloads a sandbox interface must not have: every segmentation offload that is
/// not TCP (UDP, tunnels, SCTP, ESP, …), GSO partial and GSO list.
pub fn is_refused_tx_offload(name: &str) -> bool {
    !is_kept_tx_offload(name)
        && (name.ends_with("-segmentation") || name == "tx-gso-partial" || name == "tx-gso-list")
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// An ioctl socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Ethtool {
    fd: OwnedFd,
}

impl Ethtool {
    /// Opens the control socket in the calling thread's current network namespace.
    pub fn open() -> Result<Ethtool, EthtoolError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(EthtoolError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ethtool { fd })
    }

    fn ioctl(&self, op: &'static str, ifname: &str, data: &mut [u32]) -> Result<(), EthtoolError> {
        let bytes = ifname.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(EthtoolError::Name(ifname.to_owned()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: data.as_mut_ptr().cast(),
            _pad: [0; 16],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: req is a valid ifreq whose data pointer refers to `data`, a live buffer laid out
        // as the command in its first word expects and large enough for the kernel's answer
        // (callers size it from the counts they pass in).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCETHTOOL, &mut req) };
        if rc < 0 {
            return Err(EthtoolError::Ioctl {
                op,
                ifname: ifname.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The kernel's feature names, indexed by feature bit.
    fn feature_names(&self, ifname: &str) -> Result<&'static [String], EthtoolError> {
        static NAMES: OnceLock<Vec<String>> = OnceLock::new();
        if let Some(n) = NAMES.get() {
            return Ok(n);
        }
        // struct ethtool_sset_info { cmd, reserved, sset_mask: u64, data[1] }
        let mut info = [0u32; 5];
        info[0] = ETHTOOL_GSSET_INFO;
        info[2] = 1 << ETH_SS_FEATURES;
        self.ioctl("GSSET_INFO", ifname, &mut info)?;
        let count = info[4] as usize;
        // struct ethtool_gstrings { cmd, string_set, len, data[len * 32] }
        let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
        strings[0] = ETHTOOL_GSTRINGS;
        strings[1] = ETH_SS_FEATURES;
        strings[2] = count as u32;
        self.ioctl("GSTRINGS", ifname, &mut strings)?;
        let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let names = bytes
            .chunks(ETH_GSTRING_LEN)
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .collect();
        Ok(NAMES.get_or_init(|| names))
    }

    /// (available, active) bitmaps of `ifname`, one `u32` per 32 features.
    fn get_features(
        &self,
        ifname: &str,
        blocks: usize,
    ) -> Result<(Vec<u32>, Vec<u32>), EthtoolError> {
        // struct ethtool_gfeatures { cmd, size, features[size] { available, requested, active, never_changed } }
        let mut buf = vec![0u32; 2 + 4 * blocks];
        buf[0] = ETHTOOL_GFEATURES;
        buf[1] = blocks as u32;
        self.ioctl("GFEATURES", ifname, &mut buf)?;
        let available = (0..blocks).map(|i| buf[2 + 4 * i]).collect();
        let active = (0..blocks).map(|i| buf[2 + 4 * i + 2]).collect();
        Ok((available, active))
    }

    /// Every feature of `ifname` with whether it is active (what `ethtool -k` shows).
    pub fn features(&self, ifname: &str) -> Result<Vec<(String, bool)>, EthtoolError> {
        let names = self.feature_names(ifname)?;
        let blocks = names.len().div_ceil(32);
        let (_, active) = self.get_features(ifname, blocks)?;
        Ok(names
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
            .map(|(i, n)| (n.clone(), active[i / 32] & (1 << (i % 32)) != 0))
            .collect())
    }

    /// Turns the refused offloads of `ifname` off ([`is_refused_tx_offload`]) and checks the
    /// result; the kept ones stay as the driver has them.
    pub fn restrict_tx_offloads(&self, ifname: &str) -> Result<(), EthtoolError> {
        let names = self.feature_names(ifname)?;
        let blocks = names.len().div_ceil(32);
        let (available, _) = self.get_features(ifname, blocks)?;
        let mut off = vec![0u32; blocks];
        for (i, n) in names.iter().enumerate() {
            if is_refused_tx_offload(n) {
                off[i / 32] |= 1 << (i % 32);
            }
        }
        // struct ethtool_sfeatures { cmd, size, features[size] { valid, requested } }
        let mut set = vec![0u32; 2 + 2 * blocks];
        set[0] = ETHTOOL_SFEATURES;
        set[1] = blocks as u32;
        for b in 0..blocks {
            set[2 + 2 * b] = off[b] & available[b];
            set[2 + 2 * b + 1] = 0;
        }
        self.ioctl("SFEATURES", ifname, &mut set)?;
        let (_, active) = self.get_features(ifname, blocks)?;
        let still: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| off[i / 32] & active[i / 32] & (1 << (i % 32)) != 0)
            .map(|(_, n)| n.clone())
            .collect();
        if !still.is_empty() {
            return Err(EthtoolError::StillActive {
                ifname: ifname.to_owned(),
                features: still,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_offloads_are_kept_and_other_segmentation_is_refused() {
        for n in [
            "tx-checksum-ip-generic",
            "tx-checksum-ipv4",
            "tx-tcp-segmentation",
            "tx-tcp6-segmentation",
            "tx-generic-segmentation",
        ] {
            assert!(is_kept_tx_offload(n) && !is_refused_tx_offload(n), "{n}");
        }
        for n in [
            "tx-udp-segmentation",
            "tx-udp_tnl-segmentation",
            "tx-gre-segmentation",
            "tx-gso-partial",
            "tx-gso-list",
        ] {
            assert!(is_refused_tx_offload(n), "{n}");
        }
        for n in [
            "rx-gro",
            "tx-scatter-gather",
            "rx-checksum",
            "tx-vlan-hw-insert",
        ] {
            assert!(!is_refused_tx_offload(n), "{n}");
        }
    }
}
