//! PRIVILEGED (root): job network set-up and teardown against the real kernel.
//! Every test uses names unique to the run and a `Scope` guard that removes what is left, even
//! when the test panics.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use common::{ethtool_k, ping_from_netns, Scope};
use snas_agent::ethtool::{is_refused_tx_offload, Ethtool};
use snas_agent::jobnet::{self, is_netns_mount, run_in_netns, JobNetInfo, JobNetwork};
use snas_agent::netlink::Rtnl;
use snas_agent::pool::SubnetPool;

fn info(scope: &Scope, key: u64, pool: &str, slot: u32, mtu: u32) -> JobNetInfo {
    let pool = SubnetPool::new(pool.parse().unwrap(), 30);
    JobNetInfo::new(
        &scope.names(key),
        pool.addrs(slot).unwrap(),
        mtu,
        &scope.netns_dir,
    )
}

fn host_link(name: &str) -> Option<u32> {
    Rtnl::open().unwrap().link_index(name).unwrap()
}

#[test]
fn privileged_job_network_is_configured_reachable_and_torn_down() {
    let scope = Scope::new("cfg");
    let mut info = info(&scope, 0x1111, "10.254.1.0/24", 3, 1444);
    // What a 10 Mbit/s job gets: super-packets that fit its EDT horizon.
    info.gso_max_size = 12_500;
    let net = JobNetwork::create(info.clone()).unwrap();
    let info = net.info().clone();
    assert_eq!(info.gateway, Ipv4Addr::new(10, 254, 1, 13));
    assert_eq!(info.sandbox, Ipv4Addr::new(10, 254, 1, 14));

    // Namespace exists, visible to iproute2.
    assert!(is_netns_mount(&info.netns_path));
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(list.contains(&info.netns), "{list}");

    // Host side: veth with the gateway address, right MTU, up.
    let hidx = host_link(&info.host_veth).expect("host veth exists");
    assert_eq!(hidx, info.host_ifindex);
    let (_, host_mac) = Rtnl::open()
        .unwrap()
        .link_index_mac(&info.host_veth)
        .unwrap()
        .unwrap();
    assert_eq!(host_mac, info.host_mac);
    assert_ne!(info.sandbox_mac, [0; 6]);
    assert_ne!(info.sandbox_mac, info.host_mac);
    let mut host = Rtnl::open().unwrap();
    assert_eq!(host.link_info(hidx).unwrap(), Some((1444, true)));
    assert!(host
        .addresses_v4(hidx)
        .unwrap()
        .contains(&(info.gateway, 30)));

    // Sandbox side: eth0 at the right MTU, address, default route, lo up, offloads off.
    let (sandbox, gateway, sandbox_mac) = (info.sandbox, info.gateway, info.sandbox_mac);
    let inside = run_in_netns(&info.netns_path, move || {
        let mut r = Rtnl::open().unwrap();
        let (idx, mac) = r.link_index_mac("eth0").unwrap().expect("eth0 in netns");
        assert_eq!(mac, sandbox_mac);
        let link = r.link_info(idx).unwrap();
        let lo = r.link_info(1).unwrap();
        let addrs = r.addresses_v4(idx).unwrap();
        let route = r.default_gateway_v4().unwrap();
        let feats = Ethtool::open().unwrap().features("eth0").unwrap();
        (idx, link, lo, addrs, route, feats)
    })
    .unwrap();
    let (idx, link, lo, addrs, route, feats) = inside;
    assert_eq!(link, Some((1444, true)));
    assert_eq!(lo.map(|l| l.1), Some(true));
    assert!(addrs.contains(&(sandbox, 30)), "{addrs:?}");
    assert_eq!(route, Some((gateway, idx)));
    let still_on: Vec<_> = feats
        .iter()
        .filter(|(n, on)| *on && is_refused_tx_offload(n))
        .collect();
    assert!(still_on.is_empty(), "{still_on:?}");
    assert!(feats.iter().any(|(n, _)| n == "tx-udp-segmentation"));
    // Cross-check with ethtool(8) itself.
    let k = ethtool_k(&info.netns);
    for line in [
        "tx-checksumming: on",
        "tcp-segmentation-offload: on",
        "generic-segmentation-offload: on",
        "tx-udp-segmentation: off",
        "tx-udp_tnl-segmentation: off",
    ] {
        assert!(k.contains(line), "{line} missing in:\n{k}");
    }
    let link = std::process::Command::new("ip")
        .args(["-n", &info.netns, "-d", "link", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("gso_max_size 12500 "), "{link}");

    // The sandbox reaches its gateway (and only that: nothing else is addressed).
    assert!(
        ping_from_netns(&info.netns_path, gateway).unwrap(),
        "no echo reply from gateway"
    );

    net.teardown().unwrap();
    assert!(!info.netns_path.exists());
    assert_eq!(host_link(&info.host_veth), None);
    assert!(scope.leftover_netns().is_empty());
}

#[test]
fn privileged_failed_create_leaves_nothing_and_spares_foreign_interfaces() {
    let mut scope = Scope::new("fail");
    let info = info(&scope, 0x2222, "10.254.2.0/24", 0, 1444);
    // A foreign interface already holds the host veth name.
    scope.extra_links.push(info.host_veth.clone());
    let st = std::process::Command::new("ip")
        .args([
            "link",
            "add",
            &info.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{}p", info.host_veth),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let err = JobNetwork::create(info.clone()).unwrap_err();
    assert!(err.to_string().contains(&info.host_veth), "{err}");
    assert!(!info.netns_path.exists(), "netns file left behind");
    assert!(scope.leftover_netns().is_empty());
    assert!(
        host_link(&info.host_veth).is_some(),
        "foreign interface was deleted"
    );
}

#[test]
fn privileged_existing_netns_name_is_refused_without_touching_it() {
    let scope = Scope::new("dup");
    let info = info(&scope, 0x3333, "10.254.3.0/24", 0, 1444);
    let first = JobNetwork::create(info.clone()).unwrap();
    let err = JobNetwork::create(info.clone()).unwrap_err();
    assert!(matches!(err, jobnet::JobNetError::NetnsExists(_)), "{err}");
    assert!(
        is_netns_mount(&info.netns_path),
        "first job's namespace was disturbed"
    );
    assert!(host_link(&info.host_veth).is_some());
    first.teardown().unwrap();
}

#[test]
fn privileged_guard_tears_down_when_the_owner_panics() {
    let scope = Scope::new("panic");
    let info = info(&scope, 0x4444, "10.254.4.0/24", 1, 1400);
    let path = info.netns_path.clone();
    let veth = info.host_veth.clone();
    let r = std::panic::catch_unwind(move || {
        let _net = JobNetwork::create(info).unwrap();
        assert!(is_netns_mount(&path));
        panic!("test body fails after set-up");
    });
    assert!(r.is_err());
    assert!(!Path::new(&scope.netns_dir)
        .join(scope.names(0x4444).netns)
        .exists());
    assert_eq!(host_link(&veth), None);
}

#[test]
fn privileged_teardown_is_idempotent() {
    let scope = Scope::new("idem");
    let info = info(&scope, 0x5555, "10.254.5.0/24", 0, 1444);
    let net = JobNetwork::create(info).unwrap();
    let info = net.into_info();
    jobnet::teardown_network(&info).unwrap();
    jobnet::teardown_network(&info).unwrap();
    assert!(scope.leftover_netns().is_empty());
}

/// `nsenter --net=<netns> <args>`: stdout, panicking unless it succeeds.
fn in_netns(netns: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn privileged_dual_stack_job_has_its_ipv6_address_and_route_at_once() {
    let scope = Scope::new("v6");
    let mut info = info(&scope, 0x6666, "10.254.6.0/24", 1, 1444);
    let a6: std::net::Ipv6Addr = "fd73:6e61:7300::afe:606".parse().unwrap();
    info.sandbox6 = Some(a6);
    let net = JobNetwork::create(info).unwrap();
    let info = net.info().clone();
    assert!(info.has_ipv6_route());

    // The /128 is there and usable now: neither tentative nor waiting for DAD.
    let addrs = in_netns(
        &info.netns_path,
        &["ip", "-6", "-o", "addr", "show", "dev", "eth0"],
    );
    let line = addrs
        .lines()
        .find(|l| l.contains(&format!("{a6}/128")))
        .unwrap_or_else(|| panic!("no {a6}/128 on eth0: {addrs}"));
    assert!(!line.contains("tentative"), "{line}");
    let routes = in_netns(&info.netns_path, &["ip", "-6", "route", "show", "default"]);
    assert!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    // The host answers neighbour discovery for the gateway: one datagram to it from the
    // sandbox and the gateway's link-layer address is known (no tier 1 attached here).
    in_netns(
        &info.netns_path,
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.sendto(b'x',('fe80::1%eth0',9))\ntime.sleep(0.3)",
        ],
    );
    let neigh = in_netns(
        &info.netns_path,
        &["ip", "-6", "neigh", "show", "dev", "eth0"],
    );
    assert!(
        neigh.lines().any(|l| l.starts_with("fe80::1 lladdr")),
        "the gateway did not answer neighbour discovery: {neigh}"
    );
    // No router solicitations or autoconfiguration: the job's only global address is its own.
    for (key, want) in [("accept_ra", "0"), ("autoconf", "0")] {
        let v = in_netns(
            &info.netns_path,
            &["cat", &format!("/proc/sys/net/ipv6/conf/eth0/{key}")],
        );
        assert_eq!(v.trim(), want, "{key}");
    }
    net.teardown().unwrap();
}
