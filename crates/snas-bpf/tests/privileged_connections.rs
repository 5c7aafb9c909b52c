//! Connection accounting (BPF_PROG_TEST_RUN, root; fails otherwise): flows close both ways,
//! give their slot back exactly once, linger for late packets, reopen through admission, and
//! the ageing pass forgets idle flows and recounts without ever locking a job out.

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use snas_bpf::testing::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::FlowTimeouts;
use snas_wire::Reason;

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;
const RST_ACK: u8 = 0x14;

fn setup(name: &str, edit: impl FnOnce(&mut snas_bpf::JobConfig)) -> Node {
    let n = node_with_job(name, |_| {}, edit, &proxies(PROXY_IPS.len()));
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    n
}

fn conn(sport: u16) -> Pkt {
    Pkt {
        sport,
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    }
}

/// Sends `p` with `flags` from the sandbox; returns the verdict.
fn out(n: &Node, p: &Pkt, flags: u8) -> i32 {
    n.run_sandbox(&p.with_flags(flags).frame()).retval
}

/// Delivers the far side's packet of `p`'s flow with `flags` through the uplink program.
fn back(n: &Node, p: &Pkt, flags: u8) {
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &p.reply(flags).ip()));
    assert_eq!(out.retval, TC_ACT_REDIRECT, "reply delivered");
}

fn live(n: &Node) -> u64 {
    n.t1().live_flows(VETH).expect("live flows")
}

/// An ageing pass that sees every admission made so far: admissions within
/// `COUNT_MARGIN` before a pass are left to the next one (the count is low until then).
fn age(n: &Node, t: &FlowTimeouts) -> snas_bpf::AgeingReport {
    std::thread::sleep(snas_bpf::tier1::COUNT_MARGIN * 10);
    n.t1().age_flows(t).expect("age")
}

/// A whole connection: handshake, a request, FIN from the sandbox, FIN back, last ACK.
fn full_connection(n: &Node, p: &Pkt) -> bool {
    if out(n, p, SYN) != TC_ACT_REDIRECT {
        return false;
    }
    back(n, p, SYN_ACK);
    let ok = [ACK, 0x18, FIN_ACK]
        .iter()
        .all(|&f| out(n, p, f) == TC_ACT_REDIRECT);
    back(n, p, FIN_ACK);
    ok && out(n, p, ACK) == TC_ACT_REDIRECT
}

#[test]
fn a_thousand_sequential_connections_with_four_slots_are_all_admitted() {
    let n = setup("seq1000", |j| j.max_connections = 4);
    for i in 0..1000u16 {
        assert!(full_connection(&n, &conn(10_000 + i)), "connection {i}");
        assert_eq!(live(&n), 0, "connection {i} gave its slot back");
    }
    assert_eq!(sandbox_drops(&n, Reason::ConnectionLimit), 0);
}

#[test]
fn a_rst_either_way_frees_the_slot() {
    let n = setup("rst", |j| j.max_connections = 1);
    let (a, b, c) = (conn(1), conn(2), conn(3));
    assert_eq!(out(&n, &a, SYN), TC_ACT_REDIRECT);
    assert_eq!(out(&n, &b, SYN), TC_ACT_SHOT, "the one slot is taken");
    assert_eq!(sandbox_drops(&n, Reason::ConnectionLimit), 1);
    // From the sandbox.
    assert_eq!(
        out(&n, &a, RST),
        TC_ACT_REDIRECT,
        "the RST still reaches the proxy"
    );
    assert_eq!(live(&n), 0);
    assert_eq!(out(&n, &b, SYN), TC_ACT_REDIRECT);
    // From the far side (e.g. the proxy refusing the flow).
    back(&n, &b, RST_ACK);
    assert_eq!(live(&n), 0);
    assert_eq!(out(&n, &c, SYN), TC_ACT_REDIRECT);
    // A second RST of a closed flow gives nothing back twice.
    assert_eq!(out(&n, &a, RST), TC_ACT_REDIRECT);
    back(&n, &b, RST);
    assert_eq!(live(&n), 1, "c still holds the slot");
    assert_eq!(out(&n, &conn(4), SYN), TC_ACT_SHOT);
}

#[test]
fn a_fin_in_one_direction_only_keeps_the_slot() {
    let n = setup("halfclose", |j| j.max_connections = 1);
    let (a, b) = (conn(1), conn(2));
    assert_eq!(out(&n, &a, SYN), TC_ACT_REDIRECT);
    back(&n, &a, SYN_ACK);
    assert_eq!(out(&n, &a, FIN_ACK), TC_ACT_REDIRECT);
    assert_eq!(out(&n, &a, FIN_ACK), TC_ACT_REDIRECT, "retransmitted FIN");
    assert_eq!(out(&n, &b, SYN), TC_ACT_SHOT, "half-closed holds its slot");
    assert_eq!(live(&n), 1);
    back(&n, &a, FIN_ACK);
    assert_eq!(live(&n), 0);
    assert_eq!(out(&n, &b, SYN), TC_ACT_REDIRECT);

    // The same from the other side: the far side's FIN alone keeps the slot too.
    back(&n, &b, SYN_ACK);
    back(&n, &b, FIN_ACK);
    back(&n, &b, FIN_ACK);
    assert_eq!(live(&n), 1);
    assert_eq!(out(&n, &conn(3), SYN), TC_ACT_SHOT);
}

#[test]
fn late_acks_and_fin_retransmits_after_close_pass_without_admission() {
    let n = setup("linger", |j| j.max_connections = 1);
    let (a, b) = (conn(1), conn(2));
    assert!(full_connection(&n, &a));
    assert_eq!(out(&n, &b, SYN), TC_ACT_REDIRECT, "a's slot is free");
    // a is closed and b holds the only slot: a's late packets still reach the proxy.
    for flags in [ACK, FIN_ACK, ACK] {
        assert_eq!(out(&n, &a, flags), TC_ACT_REDIRECT);
        let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
        assert_eq!(dbg.kind, 2, "to the proxy, not a refusal");
    }
    back(&n, &a, FIN_ACK);
    assert_eq!(live(&n), 1);
    assert_eq!(sandbox_drops(&n, Reason::ConnectionLimit), 0);
}

#[test]
fn a_syn_on_a_closed_entry_is_a_new_connection_and_is_counted() {
    let n = setup("reopen", |j| j.max_connections = 1);
    let a = conn(1);
    assert!(full_connection(&n, &a));
    assert_eq!(live(&n), 0);
    // The application reuses the 5-tuple (e.g. a fixed source port).
    assert_eq!(out(&n, &a, SYN), TC_ACT_REDIRECT);
    assert_eq!(live(&n), 1, "counted again");
    assert_eq!(out(&n, &conn(2), SYN), TC_ACT_SHOT);
    // And it closes again like any connection.
    back(&n, &a, SYN_ACK);
    assert_eq!(out(&n, &a, FIN_ACK), TC_ACT_REDIRECT);
    back(&n, &a, FIN_ACK);
    assert_eq!(live(&n), 0);
}

#[test]
fn a_syn_on_a_closed_entry_takes_a_new_connection_token() {
    let n = setup("reopenrate", |j| {
        j.new_conn_per_sec = 1;
        j.new_conn_burst = 1;
    });
    let a = conn(1);
    assert!(full_connection(&n, &a));
    assert_eq!(out(&n, &a, SYN), TC_ACT_SHOT, "the bucket is empty");
    assert_eq!(sandbox_drops(&n, Reason::NewConnectionRate), 1);
    assert_eq!(live(&n), 0);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(out(&n, &a, SYN), TC_ACT_REDIRECT);
    assert_eq!(live(&n), 1);
}

#[test]
fn a_never_answered_syn_ages_out_and_frees_its_slot() {
    let n = setup("synaging", |j| j.max_connections = 2);
    let (a, b) = (conn(1), conn(2));
    assert_eq!(out(&n, &a, SYN), TC_ACT_REDIRECT);
    assert_eq!(out(&n, &b, SYN), TC_ACT_REDIRECT);
    back(&n, &b, SYN_ACK);
    assert_eq!(out(&n, &conn(3), SYN), TC_ACT_SHOT);
    // Short idle times so that the test need not wait 30 s; the states are the defaults'.
    let t = FlowTimeouts {
        tcp_syn_sent: Duration::from_millis(100),
        ..FlowTimeouts::default()
    };
    let r = age(&n, &t);
    assert_eq!((r.removed, r.open), (0, 2), "nothing idle yet");
    std::thread::sleep(Duration::from_millis(200));
    let r = age(&n, &t);
    assert_eq!((r.removed, r.open), (1, 1), "only the unanswered SYN goes");
    assert_eq!(live(&n), 1);
    assert_eq!(out(&n, &conn(3), SYN), TC_ACT_REDIRECT);
    // b, established, was kept: its packets pass without admission.
    assert_eq!(out(&n, &b, ACK), TC_ACT_REDIRECT);
    assert_eq!(live(&n), 2);
}

#[test]
fn closed_entries_linger_until_the_closed_timeout() {
    let n = setup("closedaging", |j| j.max_connections = 1);
    let a = conn(1);
    assert!(full_connection(&n, &a));
    let t = FlowTimeouts {
        tcp_closed: Duration::from_millis(100),
        ..FlowTimeouts::default()
    };
    let r = age(&n, &t);
    assert_eq!((r.kept, r.removed, r.open), (1, 0, 0));
    std::thread::sleep(Duration::from_millis(200));
    let r = age(&n, &t);
    assert_eq!((r.kept, r.removed), (0, 1));
    assert_eq!(live(&n), 0);
}

#[test]
fn udp_flows_age_by_whether_they_were_answered() {
    let n = setup("udpaging", |j| j.max_connections = 10);
    let asked = Pkt {
        sport: 5000,
        ..Pkt::udp(ALLOWED_IP, 4000, b"q")
    };
    let answered = Pkt {
        sport: 5001,
        ..asked.clone()
    };
    assert_eq!(n.run_sandbox(&asked.frame()).retval, TC_ACT_REDIRECT);
    assert_eq!(n.run_sandbox(&answered.frame()).retval, TC_ACT_REDIRECT);
    back(&n, &answered, 0);
    assert_eq!(live(&n), 2);
    let t = FlowTimeouts {
        udp_unreplied: Duration::from_millis(100),
        ..FlowTimeouts::default()
    };
    std::thread::sleep(Duration::from_millis(200));
    let r = age(&n, &t);
    assert_eq!((r.removed, r.open), (1, 1));
    assert_eq!(live(&n), 1);
}

#[test]
fn the_ageing_pass_recounts_and_later_admissions_and_closes_still_count() {
    let n = setup("recount", |j| j.max_connections = 10);
    let t = FlowTimeouts {
        tcp_syn_sent: Duration::from_millis(100),
        ..FlowTimeouts::default()
    };
    // Three answered connections and three unanswered SYNs.
    for sport in 1..=6 {
        assert_eq!(out(&n, &conn(sport), SYN), TC_ACT_REDIRECT);
        if sport <= 3 {
            back(&n, &conn(sport), SYN_ACK);
        }
    }
    assert_eq!(live(&n), 6);
    std::thread::sleep(Duration::from_millis(200));
    let r = age(&n, &t);
    assert_eq!((r.removed, r.open), (3, 3));
    assert_eq!(live(&n), 3, "BPF never saw the SYNs end; the pass did");
    // After the pass BPF's own movements still count, on top of the correction.
    assert_eq!(out(&n, &conn(7), SYN), TC_ACT_REDIRECT);
    assert_eq!(live(&n), 4);
    assert_eq!(out(&n, &conn(1), RST), TC_ACT_REDIRECT);
    assert_eq!(live(&n), 3);
    // A pass with nothing to forget changes nothing.
    let r = age(&n, &FlowTimeouts::default());
    assert_eq!((r.removed, r.open), (0, 3));
    assert_eq!(live(&n), 3);
    // The recount holds when a job reaches its limit: 7 more fit, the 8th does not.
    for sport in 100..107 {
        assert_eq!(out(&n, &conn(sport), SYN), TC_ACT_REDIRECT, "sport {sport}");
    }
    assert_eq!(out(&n, &conn(107), SYN), TC_ACT_SHOT);
}

#[test]
fn ageing_while_connections_churn_never_refuses_a_connection() {
    let n = setup("churn", |j| j.max_connections = 1);
    let done = AtomicBool::new(false);
    let passes = std::thread::scope(|s| {
        let ager = s.spawn(|| {
            let mut passes = 0u32;
            while !done.load(Ordering::Relaxed) {
                n.t1().age_flows(&FlowTimeouts::default()).expect("age");
                passes += 1;
            }
            passes
        });
        for i in 0..3000u16 {
            assert!(full_connection(&n, &conn(20_000 + i)), "connection {i}");
        }
        done.store(true, Ordering::Relaxed);
        ager.join().expect("ager")
    });
    assert!(passes > 0);
    eprintln!("{passes} ageing passes ran during 3000 connections");
    assert_eq!(sandbox_drops(&n, Reason::ConnectionLimit), 0);
    age(&n, &FlowTimeouts::default());
    assert_eq!(live(&n), 0);
}

#[test]
fn a_reconfigured_job_keeps_its_count_and_a_new_job_on_the_veth_starts_at_zero() {
    let n = setup("reconf", |j| j.max_connections = 1);
    assert_eq!(out(&n, &conn(1), SYN), TC_ACT_REDIRECT);
    let mut j = job();
    j.max_connections = 1;
    j.policy_serial = PolicySerial(SERIAL.get() + 1);
    n.t1().configure_job(&j).expect("reconfigure");
    assert_eq!(live(&n), 1);
    assert_eq!(out(&n, &conn(2), SYN), TC_ACT_SHOT);
    j.job_key = JobKey(JOB_KEY.get() + 1);
    n.t1().configure_job(&j).expect("new job");
    assert_eq!(live(&n), 0);
}

#[test]
fn the_ageing_pass_sees_every_flow_of_a_large_table() {
    let n = setup("bigtable", |_| {});
    const FLOWS: u32 = 50_000;
    for i in 0..FLOWS {
        let p = Pkt {
            dst: Ipv4Addr::new(203, 0, 113, 10 + (i / 60_000) as u8),
            sport: 1 + (i % 60_000) as u16,
            ..Pkt::tcp_syn(ALLOWED_IP, 443)
        };
        assert_eq!(out(&n, &p, SYN), TC_ACT_REDIRECT, "flow {i}");
    }
    let r = age(&n, &FlowTimeouts::default());
    assert_eq!(
        (r.kept, r.open, r.removed),
        (u64::from(FLOWS), u64::from(FLOWS), 0)
    );
    assert_eq!(live(&n), u64::from(FLOWS));
    let t = FlowTimeouts {
        tcp_syn_sent: Duration::from_millis(1),
        ..FlowTimeouts::default()
    };
    std::thread::sleep(Duration::from_millis(10));
    let r = age(&n, &t);
    assert_eq!(
        (r.kept, r.removed),
        (0, u64::from(FLOWS)),
        "every idle SYN goes"
    );
    assert_eq!(live(&n), 0);
}
