//! Privileged (root, no runsc needed): `NetConfig::ensure` puts back what runsc takes from a
//! dual-stack job namespace — the IPv4 address and default route, and the job's IPv6 /128 and
//! IPv6 default route — so that a second sandbox in the namespace has IPv6 too. runsc's
//! removal is reproduced with `ip addr flush` (it deletes every address of the interface; the
//! routes through them go with them). Run as root:
//! `cargo nextest run --release -p snas-sandbox --test privileged_netcfg`.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use snas_sandbox::netcfg::{NetConfig, NetConfig6};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A job-like namespace: `eth0` (veth, peer `gw0` in a second namespace) with 192.0.2.2/30,
/// 2001:db8:7300::c000:202/128 and both default routes, as the agent sets one up. Both
/// namespaces are removed on drop, even when the test fails.
struct JobNs {
    sb: String,
    peer: String,
}

impl JobNs {
    fn new() -> JobNs {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(root, "privileged test: needs root (network namespaces)");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let tag = format!(
            "{:x}{:04x}",
            std::process::id() & 0xffff,
            t.subsec_nanos() & 0xffff
        );
        let ns = JobNs {
            sb: format!("snsbnc{tag}"),
            peer: format!("snsbnp{tag}"),
        };
        ip(&["netns", "add", &ns.sb]);
        ip(&["netns", "add", &ns.peer]);
        ip(&[
            "-n", &ns.peer, "link", "add", "gw0", "type", "veth", "peer", "name", "eth0", "netns",
            &ns.sb,
        ]);
        ip(&["-n", &ns.peer, "addr", "add", "192.0.2.1/30", "dev", "gw0"]);
        ip(&[
            "-n",
            &ns.peer,
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            "gw0",
            "nodad",
        ]);
        ip(&["-n", &ns.peer, "link", "set", "gw0", "up"]);
        ns.cfg().ensure().unwrap();
        ns
    }

    fn cfg(&self) -> NetConfig {
        NetConfig {
            netns: PathBuf::from("/run/netns").join(&self.sb),
            iface: "eth0".into(),
            addr: Ipv4Addr::new(192, 0, 2, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            ipv6: Some(NetConfig6 {
                addr: "2001:db8:7300::c000:202".parse().unwrap(),
                gateway: "fe80::1".parse().unwrap(),
            }),
        }
    }

    fn show(&self, what: &[&str]) -> String {
        let mut a = vec!["-n", &self.sb];
        a.extend_from_slice(what);
        ip(&a)
    }

    fn assert_dual_stack(&self) {
        let a6 = self.show(&["-6", "addr", "show", "dev", "eth0"]);
        let line = a6
            .lines()
            .find(|l| l.contains("inet6 2001:db8:7300::c000:202/128"));
        let Some(line) = line else {
            panic!("the job's IPv6 /128 is missing: {a6}");
        };
        assert!(
            !line.contains("tentative"),
            "the /128 must be usable at once (nodad): {a6}"
        );
        let r6 = self.show(&["-6", "route", "show", "default"]);
        assert!(
            r6.contains("default via fe80::1 dev eth0"),
            "the IPv6 default route is missing: {r6}"
        );
        let a4 = self.show(&["-4", "addr", "show", "dev", "eth0"]);
        assert!(a4.contains("inet 192.0.2.2/30"), "IPv4 address: {a4}");
        let r4 = self.show(&["-4", "route", "show", "default"]);
        assert!(
            r4.contains("default via 192.0.2.1 dev eth0"),
            "IPv4 default: {r4}"
        );
    }
}

impl Drop for JobNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.sb]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
    }
}

#[test]
fn a_complete_dual_stack_namespace_is_left_alone() {
    let ns = JobNs::new();
    ns.assert_dual_stack();
    assert!(!ns.cfg().ensure().unwrap(), "nothing was missing");
    ns.assert_dual_stack();
}

#[test]
fn after_runsc_took_every_address_ipv4_and_ipv6_are_put_back() {
    let ns = JobNs::new();
    for run in 1..=3 {
        // What runsc does to the namespace at every sandbox start.
        ns.show(&["addr", "flush", "dev", "eth0"]);
        assert!(
            ns.cfg().ensure().unwrap(),
            "run {run}: ensure saw nothing missing"
        );
        ns.assert_dual_stack();
    }
}

#[test]
fn a_namespace_that_lost_only_its_ipv6_gets_it_back() {
    let ns = JobNs::new();
    ns.show(&["-6", "addr", "flush", "dev", "eth0", "scope", "global"]);
    ns.show(&["-6", "route", "flush", "default"]);
    assert!(ns.cfg().ensure().unwrap(), "the IPv6 half was missing");
    ns.assert_dual_stack();
}
