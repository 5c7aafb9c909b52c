//! The sandbox side of the job's network, as runsc expects to find it.
//!
//! runsc (`--network=sandbox`) copies the namespace's interfaces, addresses and routes into
//! gVisor's netstack at start and *removes* the IPv4 address from the interface (its routes go
//! with it). A namespace is therefore good for one run only unless the address and default
//! route are put back: [`NetConfig::ensure`] checks with one `ip route` call and re-adds them
//! only when missing (a fresh job namespace from the agent already has them).

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

/// What `ip -4 -o route show` says about `cfg`: (connected route with our source present,
/// default route via the gateway present).
pub fn parse_routes(text: &str, cfg: &NetConfig) -> (bool, bool) {
    let src = format!("src {}", cfg.addr);
    let default = format!("default via {}", cfg.gateway);
    let connected = text.lines().any(|l| l.contains(&src));
    let has_default = text.lines().any(|l| l.starts_with(&default));
    (connected, has_default)
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
        let routes = self.ip(&["-4", "-o", "route", "show"])?;
        let (connected, default) = parse_routes(&routes, self);
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

    #[test]
    fn complete_routes_need_nothing() {
        let t = "default via 192.0.2.1 dev eth0 \n192.0.2.0/30 dev eth0 proto kernel scope link src 192.0.2.2 \n";
        assert_eq!(parse_routes(t, &cfg()), (true, true));
    }

    #[test]
    fn routes_after_runsc_took_the_address_are_incomplete() {
        assert_eq!(parse_routes("", &cfg()), (false, false));
        let other_gw = "default via 192.0.2.9 dev eth0 \n192.0.2.0/30 dev eth0 proto kernel scope link src 192.0.2.2 \n";
        assert_eq!(parse_routes(other_gw, &cfg()), (true, false));
    }
}
