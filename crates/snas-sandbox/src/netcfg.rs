//! The sandbox side of the job's network, as runsc expects to find it.
//!
//! runsc (`--network=sandbox`) copies the namespace's interfaces, addresses and routes into
//! gVisor's netstack at start and *removes* the IPv4 address from the interface (its routes go
//! with it). A namespace is therefore good for one run only unless the address and default
//! route are put back: [`NetConfig::ensure`] reads the namespace's routing table (no process
//! spawned) and re-adds them with `ip` only when missing (a fresh job namespace from the
//! agent already has them).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use crate::process;

/// Errors configuring the namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `ip` could not be run or failed.
    #[error("`ip {args}` in {netns}: {detail}")]
    Ip {
        args: String,
        netns: PathBuf,
        detail: String,
    },
}

/// The address set-up runsc must find in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Network namespace file.
    pub netns: PathBuf,
    /// Interface inside the namespace (the agent names it `eth0`).
    pub iface: String,
    /// The sandbox's address.
    pub addr: Ipv4Addr,
    /// Its prefix length (the agent uses /30 per job).
    pub prefix_len: u8,
    /// Default gateway (the host side of the veth).
    pub gateway: Ipv4Addr,
}

/// What `/proc/net/route` (as seen inside the namespace) says about `cfg`: (connected route
/// of the sandbox's prefix present, default route via the gateway present). The kernel
/// prints addresses as the hex of a native-endian `u32` holding the network-order bytes.
pub fn parse_proc_route(text: &str, cfg: &NetConfig) -> (bool, bool) {
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    let mask = u32::MAX
        .checked_shl(32 - u32::from(cfg.prefix_len.min(32)))
        .unwrap_or(0);
    let net = Ipv4Addr::from(u32::from(cfg.addr) & mask);
    let mut connected = false;
    let mut default = false;
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 || f[0] != cfg.iface {
            continue;
        }
        let (Some(dst), Some(gw), Some(m)) = (addr(f[1]), addr(f[2]), addr(f[7])) else {
            continue;
        };
        if dst.is_unspecified() && m.is_unspecified() && gw == cfg.gateway {
            default = true;
        }
        if dst == net && u32::from(m) == mask && gw.is_unspecified() {
            connected = true;
        }
    }
    (connected, default)
}

impl NetConfig {
    fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        let err = |detail: String| NetError::Ip {
            args: args.join(" "),
            netns: self.netns.clone(),
            detail,
        };
        let mut cmd = Command::new("ip");
        cmd.args(args);
        process::enter_netns(&mut cmd, &self.netns).map_err(|e| err(e.to_string()))?;
        let out = cmd.output().map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes sure the address and the default route exist; returns true when they had to be
    /// re-added.
    pub fn ensure(&self) -> Result<bool, NetError> {
        let routes = process::in_netns(&self.netns, || {
            std::fs::read_to_string("/proc/thread-self/net/route")
        })
        .and_then(|r| r)
        .map_err(|e| NetError::Ip {
            args: "(reading /proc/thread-self/net/route)".into(),
            netns: self.netns.clone(),
            detail: e.to_string(),
        })?;
        let (connected, default) = parse_proc_route(&routes, self);
        if connected && default {
            return Ok(false);
        }
        let cidr = format!("{}/{}", self.addr, self.prefix_len);
        let gw = self.gateway.to_string();
        self.ip(&["link", "set", &self.iface, "up"])?;
        self.ip(&["addr", "replace", &cidr, "dev", &self.iface])?;
        self.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &gw,
            "dev",
            &self.iface,
        ])?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig {
            netns: "/run/netns/x".into(),
            iface: "eth0".into(),
            addr: Ipv4Addr::new(192, 0, 2, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
        }
    }

    const HEAD: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn hex(a: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(a.octets()))
    }

    fn line(dst: Ipv4Addr, gw: Ipv4Addr, mask: Ipv4Addr) -> String {
        format!(
            "eth0\t{}\t{}\t0003\t0\t0\t0\t{}\t0\t0\t0\n",
            hex(dst),
            hex(gw),
            hex(mask)
        )
    }

    #[test]
    fn complete_routes_need_nothing() {
        let z = Ipv4Addr::UNSPECIFIED;
        let t = format!(
            "{HEAD}{}{}",
            line(z, Ipv4Addr::new(192, 0, 2, 1), z),
            line(
                Ipv4Addr::new(192, 0, 2, 0),
                z,
                Ipv4Addr::new(255, 255, 255, 252)
            )
        );
        assert_eq!(parse_proc_route(&t, &cfg()), (true, true));
    }

    #[test]
    fn routes_after_runsc_took_the_address_are_incomplete() {
        assert_eq!(parse_proc_route(HEAD, &cfg()), (false, false));
        let z = Ipv4Addr::UNSPECIFIED;
        let other_gw = format!(
            "{HEAD}{}{}",
            line(z, Ipv4Addr::new(192, 0, 2, 9), z),
            line(
                Ipv4Addr::new(192, 0, 2, 0),
                z,
                Ipv4Addr::new(255, 255, 255, 252)
            )
        );
        assert_eq!(parse_proc_route(&other_gw, &cfg()), (true, false));
    }
}
