//! Builds the testbed's namespaces, links, addresses and routes (idempotently) and tears them
//! down.
//!
//! Owns the wiring described in `docs/testbed.md`. Every step first looks at what exists:
//! namespaces are added only when missing (stale unmounted files are replaced), veth pairs
//! only when their namespace-side end is missing, addresses and routes use `replace`. So `up`
//! after `up` changes nothing, and `up` after a crash completes what is missing.
//!
//! Invariant: nothing is configured in the caller's (root) namespace except the namespace
//! files under `/run/netns`; no route leads outside the documentation ranges.

use crate::netns::{self, ip, NetnsError};
use crate::topology::{
    Member, Topology, BRIDGE, DNS_SERVER, HOSTS, HOSTS_IF, HOST_V6, NODES, PROXIES, TRANSIT_IF,
    UNDERLAY_IF, UNDERLAY_MTU, UNDERLAY_NET,
};

fn link_exists(ns: &str, dev: &str) -> bool {
    ip(&["-n", ns, "link", "show", "dev", dev]).is_ok()
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| NetnsError::Io {
            what: "running `ip netns exec sysctl`".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: format!("netns exec {ns} sysctl -w {key}={value}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Creates whatever part of the topology is missing.
pub fn build(t: &Topology) -> Result<(), NetnsError> {
    for ns in t.namespaces() {
        netns::add_netns(&ns)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    let ul = t.underlay_ns();
    if !link_exists(&ul, BRIDGE) {
        ip(&["-n", &ul, "link", "add", BRIDGE, "type", "bridge"])?;
    }
    ip(&["-n", &ul, "link", "set", BRIDGE, "up"])?;

    let mtu = UNDERLAY_MTU.to_string();
    for m in Member::all() {
        let ns = t.member_ns(m);
        let tag = m.tag();
        if !link_exists(&ns, UNDERLAY_IF) {
            if link_exists(&ul, &tag) {
                ip(&["-n", &ul, "link", "del", &tag])?;
            }
            ip(&[
                "-n",
                &ul,
                "link",
                "add",
                &tag,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                UNDERLAY_IF,
                "mtu",
                &mtu,
                "netns",
                &ns,
            ])?;
        }
        ip(&["-n", &ul, "link", "set", &tag, "master", BRIDGE, "up"])?;
        let addr = format!("{}/{}", m.underlay_addr(), UNDERLAY_NET.1);
        ip(&["-n", &ns, "addr", "replace", &addr, "dev", UNDERLAY_IF])?;
        ip(&["-n", &ns, "link", "set", UNDERLAY_IF, "up"])?;
    }

    let inet = t.inet_ns();
    for (_, a) in HOSTS {
        ip(&[
            "-n",
            &inet,
            "addr",
            "replace",
            &format!("{a}/32"),
            "dev",
            HOSTS_IF,
        ])?;
    }
    ip(&[
        "-n",
        &inet,
        "addr",
        "replace",
        &format!("{DNS_SERVER}/32"),
        "dev",
        HOSTS_IF,
    ])?;
    ip(&[
        "-n",
        &inet,
        "-6",
        "addr",
        "replace",
        &format!("{HOST_V6}/128"),
        "dev",
        HOSTS_IF,
        "nodad",
    ])?;

    for n in 1..=PROXIES {
        let pns = t.proxy_ns(n);
        let inet_if = Member::Proxy(n).tag();
        let (inet_side, proxy_side) = t.transit(n);
        if !link_exists(&pns, TRANSIT_IF) {
            if link_exists(&inet, &inet_if) {
                ip(&["-n", &inet, "link", "del", &inet_if])?;
            }
            ip(&[
                "-n", &pns, "link", "add", TRANSIT_IF, "type", "veth", "peer", "name", &inet_if,
                "netns", &inet,
            ])?;
        }
        ip(&[
            "-n",
            &pns,
            "addr",
            "replace",
            &format!("{proxy_side}/30"),
            "dev",
            TRANSIT_IF,
        ])?;
        ip(&["-n", &pns, "link", "set", TRANSIT_IF, "up"])?;
        ip(&[
            "-n",
            &inet,
            "addr",
            "replace",
            &format!("{inet_side}/30"),
            "dev",
            &inet_if,
        ])?;
        ip(&["-n", &inet, "link", "set", &inet_if, "up"])?;
        ip(&[
            "-n",
            &pns,
            "route",
            "replace",
            "default",
            "via",
            &inet_side.to_string(),
        ])?;
        let (pool, len) = t.egress_pool(n);
        ip(&[
            "-n",
            &inet,
            "route",
            "replace",
            &format!("{pool}/{len}"),
            "via",
            &proxy_side.to_string(),
        ])?;
        sysctl(&pns, "net.ipv4.ip_forward", "1")?;
    }
    for n in 1..=NODES {
        sysctl(&t.node_ns(n), "net.ipv4.ip_forward", "1")?;
    }
    build_ipv6(t)
}

/// The IPv6 side of the internet: each proxy's transit link gets a /64 (both ends without
/// duplicate address detection, so they are usable at once), the proxy's IPv6 default route
/// goes to the internet end, and the internet routes each proxy's IPv6 egress pool to it.
/// The underlay stays IPv4.
fn build_ipv6(t: &Topology) -> Result<(), NetnsError> {
    let inet = t.inet_ns();
    for n in 1..=PROXIES {
        let pns = t.proxy_ns(n);
        let inet_if = Member::Proxy(n).tag();
        let (inet_side, proxy_side) = t.transit6(n);
        for (ns, dev, addr) in [
            (&pns, TRANSIT_IF, proxy_side),
            (&inet, inet_if.as_str(), inet_side),
        ] {
            sysctl(ns, &format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
            sysctl(ns, &format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "replace",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
        }
        ip(&[
            "-n",
            &pns,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            &inet_side.to_string(),
            "dev",
            TRANSIT_IF,
        ])?;
        let (pool6, len6) = t.egress_pool6(n);
        ip(&[
            "-n",
            &inet,
            "-6",
            "route",
            "replace",
            &format!("{pool6}/{len6}"),
            "via",
            &proxy_side.to_string(),
            "dev",
            &inet_if,
        ])?;
        sysctl(&pns, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// Names of this testbed's namespaces that exist now (fixed and job namespaces).
pub fn existing_netns(t: &Topology) -> Vec<String> {
    let mut v: Vec<String> = netns::list_netns()
        .into_iter()
        .filter(|n| t.owns_netns(n))
        .collect();
    v.sort();
    v
}
