//! Deny rules and audit mode in tier 1 (BPF_PROG_TEST_RUN, root; fails otherwise): a deny CIDR
//! beats every allow entry (CIDR and DNS-learned) on its ports, nested deny prefixes keep the
//! rules of the prefixes around them, replacing the set leaves no rule out; a job in audit mode
//! reaches public destinations no rule allows, audited `would_deny` once per flow, while
//! infrastructure, always-denied ranges and deny rules stay refused.

mod common;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;

use common::*;
use ipnet::IpNet;
use snas_bpf::testing::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{AuditEvent, AuditKind, PortRule, RuleProtocol};
use snas_wire::Reason;

/// Where a frame went: 1 = answered into the sandbox, 2 = to a proxy, 0 = dropped.
fn fate(n: &Node, p: &Pkt) -> u32 {
    n.t1().clear_debug().expect("clear");
    match n.run_sandbox(&p.frame()).retval {
        TC_ACT_REDIRECT => n.t1().last_redirect().expect("debug").map_or(0, |d| d.kind),
        TC_ACT_SHOT => 0,
        other => panic!("verdict {other}"),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn syn(dst: Ipv4Addr, dport: u16, sport: u16) -> Pkt {
    Pkt {
        sport,
        ..Pkt::tcp_syn(dst, dport)
    }
}

fn udp(dst: Ipv4Addr, dport: u16, sport: u16) -> Pkt {
    Pkt {
        sport,
        ..Pkt::udp(dst, dport, b"x")
    }
}

fn collect(n: &Node) -> (snas_bpf::AuditReader, Rc<RefCell<Vec<AuditEvent>>>) {
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    let reader = n
        .t1()
        .audit_reader(move |e| sink.borrow_mut().push(e))
        .expect("reader");
    (reader, events)
}

const INSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 70);

#[test]
fn a_deny_cidr_beats_allow_cidrs_and_dns_bindings_on_its_ports_only() {
    let n = node_with_job("deny", |_| {}, |_| {}, &proxies(1));
    let (reader, events) = collect(&n);
    n.t1()
        .allow_cidr(
            JOB_KEY,
            "203.0.113.0/24".parse().expect("net"),
            &[PortRule::all(RuleProtocol::Any)],
            false,
        )
        .expect("cidr");
    n.t1()
        .allow_ip(JOB_KEY, INSIDE, &[PortRule::all(RuleProtocol::Any)], None)
        .expect("binding");
    assert_eq!(fate(&n, &syn(INSIDE, 443, 40_000)), 2, "allowed before");
    n.t1()
        .set_deny(
            JOB_KEY,
            &[
                (net("203.0.113.64/26"), PortRule::all(RuleProtocol::Tcp)),
                (net("203.0.113.0/24"), PortRule::port(RuleProtocol::Any, 22)),
            ],
        )
        .expect("deny");
    // The /26 denies every TCP port, over the binding and the /24 allow entry.
    assert_eq!(fate(&n, &syn(INSIDE, 443, 40_001)), 1, "RST");
    // Its UDP is open, except port 22, which the enclosing /24 denies.
    assert_eq!(fate(&n, &udp(INSIDE, 5353, 40_002)), 2);
    assert_eq!(fate(&n, &udp(INSIDE, 22, 40_003)), 1, "ICMP");
    // Outside the /26, only port 22.
    assert_eq!(fate(&n, &syn(ALLOWED_IP, 22, 40_004)), 1);
    assert_eq!(fate(&n, &syn(ALLOWED_IP, 443, 40_005)), 2);
    // An established flow is cut too: a deny rule is not an expiry.
    assert_eq!(fate(&n, &syn(INSIDE, 443, 40_000).with_flags(0x10)), 0);
    assert_eq!(sandbox_drops(&n, Reason::DenyRule), 4);

    // Replaced by a set without the /26: its TCP opens again, port 22 stays denied.
    n.t1()
        .set_deny(
            JOB_KEY,
            &[(net("203.0.113.0/24"), PortRule::port(RuleProtocol::Any, 22))],
        )
        .expect("deny");
    assert_eq!(fate(&n, &syn(INSIDE, 443, 40_006)), 2);
    assert_eq!(fate(&n, &syn(INSIDE, 22, 40_007)), 1);
    // The empty set opens everything the allow entries allow.
    n.t1().set_deny(JOB_KEY, &[]).expect("deny");
    assert_eq!(fate(&n, &syn(INSIDE, 22, 40_008)), 2);

    reader.consume().expect("consume");
    let denied = events
        .borrow()
        .iter()
        .filter(|e| e.kind == AuditKind::Deny(Reason::DenyRule))
        .count();
    assert_eq!(denied, 5, "every refusal audited: {:?}", events.borrow());
    // Detaching the job removes its deny entries with everything else.
    n.t1()
        .set_deny(
            JOB_KEY,
            &[(net("2001:db8::/32"), PortRule::all(RuleProtocol::Any))],
        )
        .expect("deny6");
    assert!(n.t1().detach_job(VETH).expect("detach"));
}

#[test]
fn audit_mode_passes_public_destinations_as_would_deny_and_nothing_private_or_denied() {
    let n = node_with_job("denyaudit", |_| {}, |j| j.audit_mode = true, &proxies(1));
    let (reader, events) = collect(&n);
    n.t1()
        .set_infrastructure(&[net("198.51.100.128/25")])
        .expect("infra");
    n.t1()
        .set_deny(
            JOB_KEY,
            &[(net("203.0.113.64/26"), PortRule::all(RuleProtocol::Any))],
        )
        .expect("deny");
    // No allow rule at all: a public address on any port passes.
    assert_eq!(fate(&n, &syn(OTHER_IP, 8080, 41_000)), 2);
    assert_eq!(fate(&n, &udp(ALLOWED_IP, 9999, 41_001)), 2);
    // The same flow again (a retransmitted SYN, the next datagram): no second event.
    assert_eq!(fate(&n, &syn(OTHER_IP, 8080, 41_000)), 2);
    assert_eq!(fate(&n, &udp(ALLOWED_IP, 9999, 41_001)), 2);
    // Infrastructure, private ranges, metadata and deny rules: refused as in enforce mode.
    for (dst, why) in [
        (
            Ipv4Addr::new(198, 51, 100, 200),
            Reason::InfrastructureDenied,
        ),
        (Ipv4Addr::new(10, 1, 2, 3), Reason::AlwaysDenied),
        (Ipv4Addr::new(169, 254, 169, 254), Reason::AlwaysDenied),
        (Ipv4Addr::new(127, 0, 0, 1), Reason::AlwaysDenied),
        (INSIDE, Reason::DenyRule),
    ] {
        let before = sandbox_drops(&n, why);
        assert_eq!(fate(&n, &syn(dst, 443, 41_100)), 1, "{dst}: RST");
        assert_eq!(sandbox_drops(&n, why), before + 1, "{dst}: {why:?}");
    }
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 0);
    reader.consume().expect("consume");
    let would: Vec<_> = events
        .borrow()
        .iter()
        .filter_map(|e| match e.kind {
            AuditKind::WouldDeny(r) => Some((r, e.dst)),
            _ => None,
        })
        .collect();
    assert_eq!(
        would,
        vec![
            (
                Reason::DestinationDenied,
                "198.51.100.9:8080".parse().expect("addr")
            ),
            (
                Reason::DestinationDenied,
                "203.0.113.7:9999".parse().expect("addr")
            ),
        ]
    );

    // The same job in enforce mode refuses the public address.
    n.t1()
        .configure_job(&snas_bpf::JobConfig {
            audit_mode: false,
            ..job()
        })
        .expect("reconfigure");
    assert_eq!(fate(&n, &syn(OTHER_IP, 8081, 41_200)), 1);
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
}

#[test]
fn audit_mode_reports_port_denied_for_an_allowed_address_on_another_port() {
    let n = node_with_job(
        "denyauditport",
        |_| {},
        |j| j.audit_mode = true,
        &proxies(1),
    );
    let (reader, events) = collect(&n);
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    assert_eq!(fate(&n, &syn(ALLOWED_IP, 443, 42_000)), 2);
    assert_eq!(fate(&n, &syn(ALLOWED_IP, 8443, 42_001)), 2);
    reader.consume().expect("consume");
    let kinds: Vec<AuditKind> = events.borrow().iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&AuditKind::WouldDeny(Reason::PortDenied)),
        "{kinds:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| matches!(k, AuditKind::WouldDeny(_)))
            .count(),
        1
    );
}
