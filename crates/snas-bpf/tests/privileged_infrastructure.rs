//! The node-wide infrastructure set (BPF_PROG_TEST_RUN, root; fails otherwise): refused for
//! every job whatever its rules say, answered and audited like other denials, replaced
//! without a window, pinned.

mod common;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use ipnet::IpNet;
use snas_bpf::testing::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{AuditKind, PortRule, RuleProtocol, Tier1Error};
use snas_wire::Reason;

/// A proxy's underlay network and the cloud metadata address, as an agent would configure.
const PROXY_NET: &str = "198.51.100.0/24";
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// A job with the widest policy there is: every IPv4 address, every port, both protocols,
/// private ranges included.
fn setup(name: &str) -> Node {
    let n = node_with_job(name, |_| {}, |_| {}, &proxies(1));
    n.t1()
        .allow_cidr(
            JOB_KEY,
            "0.0.0.0/0".parse().expect("net"),
            &[PortRule::all(RuleProtocol::Any)],
            true,
        )
        .expect("cidr");
    n
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("net")).collect()
}

/// Where a frame went: 1 = answered into the sandbox, 2 = to a proxy, 0 = dropped.
fn fate(n: &Node, p: &Pkt) -> u32 {
    n.t1().clear_debug().expect("clear");
    match n.run_sandbox(&p.frame()).retval {
        TC_ACT_REDIRECT => n.t1().last_redirect().expect("debug").map_or(0, |d| d.kind),
        TC_ACT_SHOT => 0,
        other => panic!("verdict {other}"),
    }
}

#[test]
fn infrastructure_is_refused_even_to_an_all_ports_allow_private_rule() {
    let n = setup("infra");
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    let reader = n
        .t1()
        .audit_reader(move |e| sink.borrow_mut().push(e))
        .expect("reader");
    let proxy_host = Ipv4Addr::new(198, 51, 100, 9);
    let outside = Ipv4Addr::new(203, 0, 113, 7);
    let private = Ipv4Addr::new(10, 1, 2, 3);
    // Before: the wide rule reaches all of them.
    for ip in [proxy_host, METADATA, outside, private] {
        assert_eq!(fate(&n, &Pkt::tcp_syn(ip, 9090)), 2, "{ip} before");
    }
    n.t1()
        .set_infrastructure(&nets(&[PROXY_NET, "169.254.169.254/32"]))
        .expect("infra");
    // A DNS answer naming an infrastructure address opens nothing either.
    n.t1()
        .allow_ip(
            JOB_KEY,
            proxy_host,
            &[PortRule::all(RuleProtocol::Any)],
            None,
        )
        .expect("ip");

    // TCP SYN: RST back into the sandbox; UDP: ICMP prohibited; other segments: dropped.
    for (i, ip) in [proxy_host, METADATA].into_iter().enumerate() {
        let syn = Pkt {
            sport: 50_000 + i as u16,
            ..Pkt::tcp_syn(ip, 9090)
        };
        assert_eq!(fate(&n, &syn), 1, "{ip}: RST");
        assert_eq!(fate(&n, &syn.with_flags(0x10)), 0, "{ip}: ACK dropped");
        let udp = Pkt::udp(ip, 53_000, b"x");
        assert_eq!(fate(&n, &udp), 1, "{ip}: ICMP");
    }
    let out = n.run_sandbox(&Pkt::udp(proxy_host, 7, b"x").frame());
    assert_eq!(
        (out.data[ETH + 9], out.data[ETH + 20], out.data[ETH + 21]),
        (1, 3, 13),
        "ICMP destination unreachable, administratively prohibited"
    );
    assert_eq!(sandbox_drops(&n, Reason::InfrastructureDenied), 7);
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 0);

    // Outside the set the wide rule still applies.
    assert_eq!(fate(&n, &Pkt::tcp_syn(outside, 443)), 2);
    assert_eq!(fate(&n, &Pkt::tcp_syn(private, 443)), 2);

    reader.consume().expect("consume");
    let ev = events.borrow();
    let denied: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == AuditKind::Deny(Reason::InfrastructureDenied))
        .collect();
    assert_eq!(denied.len(), 7, "{ev:?}");
    assert_eq!(denied[0].dst, "198.51.100.9:9090".parse().expect("addr"));
}

#[test]
fn replacing_the_set_opens_what_left_and_closes_what_came() {
    let n = setup("inforeplace");
    let a = Ipv4Addr::new(198, 51, 100, 9);
    let b = Ipv4Addr::new(203, 0, 113, 9);
    n.t1()
        .set_infrastructure(&nets(&["198.51.100.0/24"]))
        .expect("infra");
    assert_eq!(fate(&n, &Pkt::tcp_syn(a, 1)), 1);
    assert_eq!(fate(&n, &Pkt::tcp_syn(b, 2)), 2);
    n.t1()
        .set_infrastructure(&nets(&["203.0.113.0/25", "192.0.2.128/25"]))
        .expect("infra");
    assert_eq!(fate(&n, &Pkt::tcp_syn(a, 3)), 2, "no longer infrastructure");
    assert_eq!(fate(&n, &Pkt::tcp_syn(b, 4)), 1, "now infrastructure");
    assert_eq!(
        n.t1().infrastructure(),
        nets(&["192.0.2.128/25", "203.0.113.0/25"])
    );
    // Host bits are dropped; the empty set opens everything again.
    n.t1()
        .set_infrastructure(&nets(&["203.0.113.77/24"]))
        .expect("infra");
    assert_eq!(n.t1().infrastructure(), nets(&["203.0.113.0/24"]));
    n.t1().set_infrastructure(&[]).expect("infra");
    assert!(n.t1().infrastructure().is_empty());
    assert_eq!(fate(&n, &Pkt::tcp_syn(b, 5)), 2);
}

#[test]
fn no_window_opens_while_the_set_is_replaced() {
    let n = setup("infrawindow");
    let kept = Ipv4Addr::new(198, 51, 100, 9);
    let with = nets(&[PROXY_NET, "203.0.113.0/24"]);
    let without = nets(&[PROXY_NET]);
    n.t1().set_infrastructure(&with).expect("infra");
    let done = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..400 {
                let set = if i % 2 == 0 { &without } else { &with };
                n.t1().set_infrastructure(set).expect("infra");
            }
            done.store(true, Ordering::Relaxed);
        });
        let mut sent = 0u64;
        while !done.load(Ordering::Relaxed) || sent < 1000 {
            let p = Pkt {
                sport: (sent % 60_000) as u16 + 1,
                ..Pkt::udp(kept, 7, b"x")
            };
            let out = n.run_sandbox(&p.frame());
            // Answered with ICMP (until the job's ICMP budget runs out) or dropped.
            assert!(
                out.retval == TC_ACT_SHOT || out.data[ETH + 9] == 1,
                "packet {sent} reached a proxy while the set was replaced"
            );
            sent += 1;
        }
        sent
    });
    let c = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    assert_eq!(c.forwarded.packets, 0, "nothing forwarded to {kept}");
    assert_eq!(c.dropped(Reason::InfrastructureDenied).packets, sent);
}

#[test]
fn the_set_is_pinned_and_survives_reopening() {
    let n = setup("infrapin");
    n.t1()
        .set_infrastructure(&nets(&[PROXY_NET, "2001:db8:53::/48"]))
        .expect("infra");
    let again = snas_bpf::Tier1::open_pinned(&n.dir).expect("reopen");
    assert_eq!(
        again.infrastructure(),
        nets(&[PROXY_NET, "2001:db8:53::/48"])
    );
}

#[test]
fn more_prefixes_than_the_map_holds_are_refused_before_any_change() {
    let n = setup("infratoomany");
    n.t1()
        .set_infrastructure(&nets(&[PROXY_NET]))
        .expect("infra");
    let many: Vec<IpNet> = (0..=snas_bpf::tier1::MAX_INFRA as u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + (i << 8))), 24).expect("net"))
        .collect();
    match n.t1().set_infrastructure(&many) {
        Err(Tier1Error::TooManyInfrastructurePrefixes { family: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(n.t1().infrastructure(), nets(&[PROXY_NET]), "unchanged");
}
