//! The sandbox side of the job's network, as runsc expects to find it.
//!
//! runsc (`--network=sandbox`) copies the namespace's interfaces, addresses and routes into
//! gVisor's netstack at start and *removes* the addresses from the interface — IPv4 and IPv6
//! alike (their routes go with them). A namespace is therefore good for one run only unless
//! the addresses and default routes are put back: [`NetConfig::ensure`] reads the namespace's
//! routing tables and IPv6 addresses (`/proc`, no process spawned) and re-adds what is missing
//! with `ip` (a fresh job namespace from the agent already has everything). For a dual-stack
//! job ([`NetConfig::ipv6`]) that is the job's IPv6 /128 (`nodad`, as the agent adds it) and
//! its IPv6 default route via the host veth's link-local gateway; without them the second run
//! in the namespace would have no IPv6 at all.

use std::net::{Ipv4Addr, Ipv6Addr};
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
    /// The job's IPv6 set-up, for a dual-stack job (`None`: IPv4 only).
    pub ipv6: Option<NetConfig6>,
}

/// The IPv6 half of a dual-stack job's namespace (see docs/agent.md, "Addressing plan").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig6 {
    /// The sandbox's address, a /128 (the agent: `job_pool6` + the sandbox's IPv4 address).
    pub addr: Ipv6Addr,
    /// Default gateway: the host veth's link-local address (the agent uses `fe80::1`).
    pub gateway: Ipv6Addr,
}

/// Parses the 32 hex digits `/proc/net/if_inet6` and `/proc/net/ipv6_route` print for an
/// IPv6 address (network order, no separators).
fn hex6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
}

/// What `/proc/net/if_inet6` and `/proc/net/ipv6_route` (as seen inside the namespace) say
/// about `v6` on `iface`: (the /128 present on the interface, default route via the gateway
/// present).
pub fn parse_proc_ipv6(
    if_inet6: &str,
    ipv6_route: &str,
    iface: &str,
    v6: &NetConfig6,
) -> (bool, bool) {
    let address = if_inet6.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 6 && f[5] == iface && hex6(f[0]) == Some(v6.addr)
    });
    let default = ipv6_route.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 10
            && f[9] == iface
            && hex6(f[0]) == Some(Ipv6Addr::UNSPECIFIED)
            && f[1] == "00"
            && hex6(f[4]) == Some(v6.gateway)
    });
    (address, default)
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

    /// Reads `/proc/thread-self/net/<file>` inside the namespace.
    fn read_proc(&self, file: &str) -> Result<String, NetError> {
        let path = format!("/proc/thread-self/net/{file}");
        process::in_netns(&self.netns, || std::fs::read_to_string(&path))
            .and_then(|r| r)
            .map_err(|e| NetError::Ip {
                args: format!("(reading {path})"),
                netns: self.netns.clone(),
                detail: e.to_string(),
            })
    }

    /// Makes sure the addresses and the default routes exist (IPv4; IPv6 too for a dual-stack
    /// job); returns true when any had to be re-added.
    pub fn ensure(&self) -> Result<bool, NetError> {
        let routes = self.read_proc("route")?;
        let (connected, default) = parse_proc_route(&routes, self);
        let v6_missing = match &self.ipv6 {
            Some(v6) => {
                let (addr6, default6) = parse_proc_ipv6(
                    &self.read_proc("if_inet6")?,
                    &self.read_proc("ipv6_route")?,
                    &self.iface,
                    v6,
                );
                !(addr6 && default6)
            }
            None => false,
        };
        if connected && default && !v6_missing {
            return Ok(false);
        }
        self.ip(&["link", "set", &self.iface, "up"])?;
        if !(connected && default) {
            let cidr = format!("{}/{}", self.addr, self.prefix_len);
            let gw = self.gateway.to_string();
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
        }
        if let (Some(v6), true) = (&self.ipv6, v6_missing) {
            // As the agent adds them: no duplicate address detection (the /128 is the job's
            // alone, and DAD would hold it "tentative" — unusable — for a second).
            let cidr = format!("{}/128", v6.addr);
            let gw = v6.gateway.to_string();
            self.ip(&["-6", "addr", "replace", &cidr, "dev", &self.iface, "nodad"])?;
            self.ip(&[
                "-6",
                "route",
                "replace",
                "default",
                "via",
                &gw,
                "dev",
                &self.iface,
            ])?;
        }
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
            ipv6: Some(v6()),
        }
    }

    fn v6() -> NetConfig6 {
        NetConfig6 {
            addr: "2001:db8:7300::c000:202".parse().unwrap(),
            gateway: "fe80::1".parse().unwrap(),
        }
    }

    /// `/proc/net/if_inet6` and `/proc/net/ipv6_route` of a fresh dual-stack job namespace,
    /// as the kernel prints them.
    const IF_INET6: &str = "\
20010db87300000000000000c0000202 02 80 00 80     eth0
fe800000000000004c7f11fffe2a3b4c 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
";
    const IPV6_ROUTE: &str = "\
20010db87300000000000000c0000202 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
";

    #[test]
    fn a_fresh_dual_stack_namespace_needs_nothing_for_ipv6() {
        assert_eq!(
            parse_proc_ipv6(IF_INET6, IPV6_ROUTE, "eth0", &v6()),
            (true, true)
        );
    }

    #[test]
    fn ipv6_after_runsc_took_the_address_is_incomplete() {
        // runsc removed the /128 (and the link-local address); the routes through them went.
        let if_inet6 = "00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(parse_proc_ipv6(if_inet6, "", "eth0", &v6()), (false, false));
        // The address is back but the default route names another gateway or interface.
        let other_gw = IPV6_ROUTE.replace(
            "fe800000000000000000000000000001",
            "fe800000000000000000000000000002",
        );
        assert_eq!(
            parse_proc_ipv6(IF_INET6, &other_gw, "eth0", &v6()),
            (true, false)
        );
        let other_if = IF_INET6.replace("eth0", "eth1");
        assert_eq!(
            parse_proc_ipv6(&other_if, IPV6_ROUTE, "eth0", &v6()),
            (false, true)
        );
    }

    #[test]
    fn a_route_to_a_prefix_is_not_the_default_route() {
        // ::/0 is the default; a route to ::/1 via the gateway is not.
        let half = IPV6_ROUTE.replace(
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe80",
            "00000000000000000000000000000000 01 00000000000000000000000000000000 00 fe80",
        );
        assert_eq!(
            parse_proc_ipv6(IF_INET6, &half, "eth0", &v6()),
            (true, false)
        );
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
