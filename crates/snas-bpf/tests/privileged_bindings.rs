//! DNS-learned bindings per (job, address) (BPF_PROG_TEST_RUN, root; fails otherwise): the
//! union of every allowed name's port rules, each with its own expiry, bounded with the
//! earliest expiry displaced first.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use snas_bpf::config::MAX_PORT_RULES;
use snas_bpf::testing::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{PortRule, RuleProtocol};
use snas_wire::Reason;

/// A CDN address two names resolve to.
const SHARED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 80);

fn setup(name: &str) -> Node {
    node_with_job(name, |_| {}, |_| {}, &proxies(1))
}

fn tcp(port: u16) -> PortRule {
    PortRule::port(RuleProtocol::Tcp, port)
}

/// A new connection to SHARED:port from a fresh source port: 2 = to a proxy, 1 = refused
/// with a RST; the reason it was refused with, if any.
fn connect(n: &Node, sport: u16, port: u16) -> (u32, Option<Reason>) {
    let before = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    let p = Pkt {
        sport,
        ..Pkt::tcp_syn(SHARED, port)
    };
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    let kind = n
        .t1()
        .last_redirect()
        .expect("debug")
        .expect("recorded")
        .kind;
    let after = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    let reason = after
        .drops
        .iter()
        .find(|(r, c)| before.dropped(**r).packets != c.packets)
        .map(|(r, _)| *r);
    (kind, reason)
}

#[test]
fn two_names_on_one_address_with_different_ports_both_work() {
    let n = setup("twonames");
    let ttl = Some(Duration::from_secs(90));
    // api.example.com:80, then www.example.org:7, both answered with SHARED.
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], ttl)
        .expect("api");
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(7)], ttl)
        .expect("www");
    assert_eq!(connect(&n, 1, 80), (2, None), "the first name's port stays");
    assert_eq!(connect(&n, 2, 7), (2, None));
    assert_eq!(connect(&n, 3, 8), (1, Some(Reason::PortDenied)));
    // Resolving the names again, in any order, loses nothing either.
    for round in 0..50u16 {
        n.t1()
            .allow_ip(JOB_KEY, SHARED, &[tcp(7)], ttl)
            .expect("www");
        n.t1()
            .allow_ip(JOB_KEY, SHARED, &[tcp(80)], ttl)
            .expect("api");
        assert_eq!(connect(&n, 100 + 2 * round, 80), (2, None));
        assert_eq!(connect(&n, 101 + 2 * round, 7), (2, None));
    }
    assert_eq!(n.t1().displaced_port_rules(), 0);
}

#[test]
fn one_names_rules_expire_while_the_others_stay() {
    let n = setup("oneexpires");
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], Some(Duration::from_secs(1)))
        .expect("short");
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(7)], Some(Duration::from_secs(120)))
        .expect("long");
    assert_eq!(connect(&n, 1, 80), (2, None));
    // Whole seconds, rounded up: a 1 s rule has ended 2 s later.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(connect(&n, 2, 80), (1, Some(Reason::PortDenied)));
    assert_eq!(connect(&n, 3, 7), (2, None), "the other name's rule stays");
    // Resolving the first name again brings its port back.
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], Some(Duration::from_secs(60)))
        .expect("again");
    assert_eq!(connect(&n, 4, 80), (2, None));
}

#[test]
fn an_address_whose_rules_have_all_expired_counts_as_absent() {
    let n = setup("allexpired");
    for port in [80, 443] {
        n.t1()
            .allow_ip(JOB_KEY, SHARED, &[tcp(port)], Some(Duration::from_secs(1)))
            .expect("ip");
    }
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(connect(&n, 1, 80), (1, Some(Reason::DestinationDenied)));
    // A CIDR rule covering the address applies as if no binding were there.
    n.t1()
        .allow_cidr(
            JOB_KEY,
            "198.51.100.0/24".parse().expect("net"),
            &[tcp(80)],
            false,
        )
        .expect("cidr");
    assert_eq!(connect(&n, 2, 80), (2, None));
}

#[test]
fn refreshing_a_name_never_shortens_its_rule() {
    let n = setup("refresh");
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], Some(Duration::from_secs(120)))
        .expect("long");
    // A later answer with a shorter TTL for the same rule keeps the longer expiry.
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], Some(Duration::from_secs(1)))
        .expect("short");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(connect(&n, 1, 80), (2, None));
}

#[test]
fn the_union_is_bounded_and_the_rule_expiring_first_is_displaced_and_counted() {
    let n = setup("bounded");
    // MAX_PORT_RULES names, each on its own port, with increasing lifetimes.
    for i in 0..MAX_PORT_RULES as u16 {
        n.t1()
            .allow_ip(
                JOB_KEY,
                SHARED,
                &[tcp(1000 + i)],
                Some(Duration::from_secs(100 + u64::from(i))),
            )
            .expect("ip");
    }
    for i in 0..MAX_PORT_RULES as u16 {
        assert_eq!(connect(&n, 1 + i, 1000 + i), (2, None), "port {}", 1000 + i);
    }
    assert_eq!(n.t1().displaced_port_rules(), 0);
    // One more name: the rule that expires first (port 1000) makes room.
    n.t1()
        .allow_ip(
            JOB_KEY,
            SHARED,
            &[tcp(2000)],
            Some(Duration::from_secs(500)),
        )
        .expect("ip");
    assert_eq!(n.t1().displaced_port_rules(), 1);
    assert_eq!(connect(&n, 100, 2000), (2, None));
    assert_eq!(connect(&n, 101, 1000), (1, Some(Reason::PortDenied)));
    assert_eq!(connect(&n, 102, 1001), (2, None));
    // More rules in one call than an entry holds is the caller's error.
    let too_many: Vec<PortRule> = (0..=MAX_PORT_RULES as u16).map(|i| tcp(3000 + i)).collect();
    assert!(n
        .t1()
        .allow_ip(JOB_KEY, SHARED, &too_many, Some(Duration::from_secs(60)))
        .is_err());
}

#[test]
fn established_flows_survive_their_bindings_expiry_while_new_ones_are_refused() {
    let n = setup("estsurvives");
    n.t1()
        .allow_ip(JOB_KEY, SHARED, &[tcp(80)], Some(Duration::from_secs(1)))
        .expect("ip");
    let flow = Pkt {
        sport: 1,
        ..Pkt::tcp_syn(SHARED, 80)
    };
    assert_eq!(n.run_sandbox(&flow.frame()).retval, TC_ACT_REDIRECT);
    let reply = geneve_frame(PROXY_IPS[0], JOB_KEY, &flow.reply(0x12).ip());
    assert_eq!(n.run_uplink(&reply).retval, TC_ACT_REDIRECT);
    std::thread::sleep(Duration::from_millis(2100));
    for _ in 0..100 {
        let data = Pkt {
            tcp_flags: 0x18,
            payload: vec![0; 1000],
            ..flow.clone()
        };
        assert_eq!(n.run_sandbox(&data.frame()).retval, TC_ACT_REDIRECT);
        assert_eq!(n.t1().last_redirect().expect("debug").expect("rec").kind, 2);
    }
    assert_eq!(connect(&n, 2, 80), (1, Some(Reason::DestinationDenied)));
    // The flow's own RST still reaches its proxy; once closed, the flow has no exemption:
    // a new SYN on its 5-tuple is refused, and so is a late ACK.
    assert_eq!(
        n.run_sandbox(&flow.with_flags(0x04).frame()).retval,
        TC_ACT_REDIRECT
    );
    let syn = n.run_sandbox(&flow.frame());
    assert_eq!(syn.retval, TC_ACT_REDIRECT);
    assert_eq!(
        n.t1().last_redirect().expect("debug").expect("rec").kind,
        1,
        "RST"
    );
    assert_eq!(
        n.run_sandbox(&flow.with_flags(0x10).frame()).retval,
        TC_ACT_SHOT,
        "a closed flow is not established"
    );
}
