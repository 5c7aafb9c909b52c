//! What a refused packet gets back, and the refusals that come from the job rather than the
//! destination (BPF_PROG_TEST_RUN, root; fails otherwise): exact ICMP unreachables for
//! denied UDP and their per-job rate limit; policy expiry (RFC 793 resets for any segment,
//! ICMP for UDP and DNS, ARP and replies still pass); the per-job DNS packet budget; VLAN and
//! other tagged frames.

mod common;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use common::*;
use snas_bpf::testing::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{AuditKind, JobConfig, NodeConfig, PacketBudget};
use snas_wire::Reason;

fn setup(
    name: &str,
    node_edit: impl FnOnce(&mut NodeConfig),
    job_edit: impl FnOnce(&mut JobConfig),
) -> Node {
    let n = node_with_job(name, node_edit, job_edit, &proxies(1));
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    n
}

/// The ICMP destination unreachable (type 3, `code`) tier 1 must answer the UDP packet `p`
/// with: MACs, addresses swapped (source = the refused destination), TOS 0xc0, TTL 64, id 0,
/// no DF, and the first 28 bytes of `p`'s IP packet quoted.
fn icmp_for(p: &Pkt, code: u8) -> Vec<u8> {
    let mut icmp = vec![3, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&p.ip()[..28]);
    let c = csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&p.dst.octets());
    ip.extend_from_slice(&p.src.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&p.dst_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Runs `p` and checks that it was answered back into the sandbox; returns the answer.
fn answered(n: &Node, p: &Pkt) -> Vec<u8> {
    n.t1().clear_debug().expect("clear");
    let out = n.run_sandbox(&p.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT, "answered: {p:?}");
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!((dbg.kind, dbg.ifindex), (1, VETH), "into the sandbox");
    out.data
}

#[test]
fn denied_udp_gets_an_exact_icmp_prohibited_or_port_unreachable() {
    let n = setup("icmpbytes", |_| {}, |_| {});
    let to_denied = Pkt::udp(OTHER_IP, 4000, b"query");
    let got = answered(&n, &to_denied);
    assert_eq!(got, icmp_for(&to_denied, 13), "administratively prohibited");
    assert!(ipv4_header_ok(&got[ETH..]));
    assert_eq!(csum(&got[ETH + 20..], 0), 0, "ICMP checksum");

    let wrong_port = Pkt {
        sport: 33_333,
        ..Pkt::udp(ALLOWED_IP, 53_000, &[0xab; 300])
    };
    assert_eq!(
        answered(&n, &wrong_port),
        icmp_for(&wrong_port, 3),
        "port unreachable"
    );

    let private = Pkt::udp(Ipv4Addr::new(10, 9, 9, 9), 4000, b"x");
    assert_eq!(
        answered(&n, &private),
        icmp_for(&private, 13),
        "always denied"
    );
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
    assert_eq!(sandbox_drops(&n, Reason::PortDenied), 1);
    assert_eq!(sandbox_drops(&n, Reason::AlwaysDenied), 1);
}

#[test]
fn icmp_answers_are_rate_limited_per_job_and_the_rest_only_dropped() {
    let n = setup(
        "icmprate",
        |c| c.icmp_budget = PacketBudget::new(1, 10).expect("budget"),
        |_| {},
    );
    let mut answered = 0;
    for sport in 1..=40u16 {
        let p = Pkt {
            sport,
            ..Pkt::udp(OTHER_IP, 4000, b"x")
        };
        match n.run_sandbox(&p.frame()).retval {
            TC_ACT_REDIRECT => answered += 1,
            TC_ACT_SHOT => {}
            other => panic!("verdict {other}"),
        }
    }
    // The burst of 10, plus at most one refill token if the loop crossed a second.
    assert!((10..=11).contains(&answered), "{answered} answered");
    assert_eq!(
        sandbox_drops(&n, Reason::DestinationDenied),
        40,
        "every one counted"
    );
    assert_eq!(
        n.t1().icmp_suppressed(VETH).expect("suppressed"),
        40 - answered
    );
    // Denied TCP SYNs are answered with RSTs, which the ICMP budget does not limit.
    for sport in 100..110u16 {
        let syn = Pkt {
            sport,
            ..Pkt::tcp_syn(OTHER_IP, 443)
        };
        assert_eq!(n.run_sandbox(&syn.frame()).retval, TC_ACT_REDIRECT);
    }
}

fn expired_job(j: &mut JobConfig) {
    j.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
}

/// The RST header tier 1 answers with: (seq, ack, flags).
fn rst_fields(answer: &[u8]) -> (u32, u32, u8) {
    let t = ETH + 20;
    assert_eq!(answer.len(), t + 20, "a 54-byte RST");
    assert!(ipv4_header_ok(&answer[ETH..]) && l4_ok(&answer[ETH..]));
    (be32(answer, t + 4), be32(answer, t + 8), answer[t + 13])
}

#[test]
fn an_expired_job_gets_the_rfc_793_reset_for_any_tcp_segment() {
    let n = setup("expiredtcp", |_| {}, expired_job);
    let base = Pkt {
        seq: 5000,
        ack: 0x0a0b_0c0d,
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    // A segment with ACK: <SEQ=SEG.ACK><CTL=RST>.
    let data = Pkt {
        tcp_flags: 0x18,
        payload: vec![1; 100],
        ..base.clone()
    };
    assert_eq!(rst_fields(&answered(&n, &data)), (0x0a0b_0c0d, 0, 0x04));
    assert_eq!(
        rst_fields(&answered(&n, &base.with_flags(0x11))),
        (0x0a0b_0c0d, 0, 0x04),
        "FIN|ACK"
    );
    // Without ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, SYN and FIN counting one each.
    assert_eq!(rst_fields(&answered(&n, &base)), (0, 5001, 0x14), "SYN");
    let fin_data = Pkt {
        tcp_flags: 0x01,
        payload: vec![2; 7],
        ..base.clone()
    };
    assert_eq!(
        rst_fields(&answered(&n, &fin_data)),
        (0, 5008, 0x14),
        "FIN + 7 bytes"
    );
    let bare = Pkt {
        tcp_flags: 0x00,
        payload: vec![3; 10],
        ..base.clone()
    };
    assert_eq!(
        rst_fields(&answered(&n, &bare)),
        (0, 5010, 0x14),
        "no flags"
    );
    // Never a RST for a RST.
    assert_eq!(
        n.run_sandbox(&base.with_flags(0x04).frame()).retval,
        TC_ACT_SHOT
    );
    assert_eq!(sandbox_drops(&n, Reason::PolicyExpired), 6);
    // The exact frame of one of them.
    let rst = answered(&n, &data);
    let want = Pkt {
        src_mac: HOST_MAC,
        dst_mac: SANDBOX_MAC,
        src: ALLOWED_IP,
        dst: SANDBOX_IP,
        sport: 443,
        dport: 40000,
        tcp_flags: 0x04,
        seq: 0x0a0b_0c0d,
        ack: 0,
        payload: vec![],
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    let mut w = want.frame();
    w[ETH + 4..ETH + 6].copy_from_slice(&[0, 0]); // IP id 0
    w[ETH + 20 + 14..ETH + 20 + 16].copy_from_slice(&[0, 0]); // window 0
    let ip_sum = {
        w[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
        csum(&w[ETH..ETH + 20], 0)
    };
    w[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = ETH + 20;
    w[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let c = csum(&w[t..], pseudo(ALLOWED_IP, SANDBOX_IP, 6, 20));
    w[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(rst, w);
}

#[test]
fn an_expired_job_gets_icmp_for_udp_and_for_dns_which_is_no_longer_captured() {
    let n = setup("expiredudp", |_| {}, expired_job);
    let udp = Pkt::udp(ALLOWED_IP, 4000, b"allowed before");
    assert_eq!(answered(&n, &udp), icmp_for(&udp, 13));
    let dns = Pkt::udp(
        GATEWAY_IP,
        53,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
    );
    assert_eq!(
        answered(&n, &dns),
        icmp_for(&dns, 13),
        "no answer from the stub"
    );
    let dns_tcp = Pkt::tcp_syn(OTHER_IP, 53);
    assert_eq!(rst_fields(&answered(&n, &dns_tcp)), (0, 1001, 0x14));
    let icmp_echo = Pkt {
        proto: 1,
        payload: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        ..Pkt::tcp_syn(ALLOWED_IP, 0)
    };
    assert_eq!(n.run_sandbox(&icmp_echo.frame()).retval, TC_ACT_SHOT);
    assert_eq!(sandbox_drops(&n, Reason::PolicyExpired), 4);
    let c = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    assert_eq!(c.forwarded.packets, 0);
}

#[test]
fn after_expiry_arp_passes_and_replies_still_reach_the_sandbox() {
    let n = setup("expiredpass", |_| {}, expired_job);
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&SANDBOX_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&SANDBOX_MAC);
    arp.extend_from_slice(&SANDBOX_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GATEWAY_IP.octets());
    assert_eq!(n.run_sandbox(&arp).retval, TC_ACT_OK);
    // The proxy's own refusal (a RST) comes back through the overlay and is delivered.
    let rst = Pkt::tcp_syn(ALLOWED_IP, 443).reply(0x14);
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &rst.ip()));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(&out.data[ETH..], &rst.ip()[..]);
}

#[test]
fn expiry_is_audited_with_the_rate_limit_and_a_later_expiry_reopens() {
    let n = setup("expiredaudit", |c| c.audit_per_sec = 3, expired_job);
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    let reader = n
        .t1()
        .audit_reader(move |e| sink.borrow_mut().push(e))
        .expect("reader");
    for sport in 1..=10u16 {
        let p = Pkt {
            sport,
            ..Pkt::udp(ALLOWED_IP, 4000, b"x")
        };
        n.run_sandbox(&p.frame());
    }
    reader.consume().expect("consume");
    {
        let ev = events.borrow();
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert!(ev
            .iter()
            .all(|e| e.kind == AuditKind::Deny(Reason::PolicyExpired)));
    }
    assert_eq!(n.t1().audit_suppressed(VETH).expect("suppressed"), 7);
    // A renewed policy (live update) moves the expiry; the job's state is kept.
    let mut j = job();
    j.expires_at = Some(SystemTime::now() + Duration::from_secs(3600));
    n.t1().configure_job(&j).expect("renew");
    let p = Pkt::udp(ALLOWED_IP, 4000, b"x");
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(dbg.kind, 2, "to a proxy");
}

#[test]
fn a_job_expiring_later_is_not_refused_until_then() {
    let n = setup(
        "expiresoon",
        |_| {},
        |j| j.expires_at = Some(SystemTime::now() + Duration::from_millis(1500)),
    );
    let p = Pkt::udp(ALLOWED_IP, 4000, b"x");
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    assert_eq!(n.t1().last_redirect().expect("debug").expect("rec").kind, 2);
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(answered(&n, &p), icmp_for(&p, 13));
    assert_eq!(sandbox_drops(&n, Reason::PolicyExpired), 1);
}

#[test]
fn dns_beyond_the_jobs_packet_budget_is_dropped_as_dns_rate() {
    let n = setup(
        "dnsbudget",
        |c| c.audit_per_sec = 1000,
        |j| j.dns_budget = PacketBudget::new(1, 20),
    );
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    let reader = n
        .t1()
        .audit_reader(move |e| sink.borrow_mut().push(e))
        .expect("reader");
    let mut captured = 0u64;
    for sport in 1..=100u16 {
        let q = Pkt {
            sport,
            ..Pkt::udp(
                OTHER_IP,
                53,
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
            )
        };
        match n.run_sandbox(&q.frame()).retval {
            TC_ACT_OK => captured += 1,
            TC_ACT_SHOT => {}
            other => panic!("verdict {other}"),
        }
    }
    // The burst of 20, plus at most one refill token if the loop crossed a second.
    assert!((20..=21).contains(&captured), "{captured} captured");
    assert_eq!(sandbox_drops(&n, Reason::DnsRate), 100 - captured);
    let c = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    assert_eq!(
        c.forwarded.packets, captured,
        "only captured queries reach the stub"
    );
    // DNS over TCP takes from the same budget.
    assert_eq!(
        n.run_sandbox(&Pkt::tcp_syn(OTHER_IP, 53).frame()).retval,
        TC_ACT_SHOT
    );
    reader.consume().expect("consume");
    let rate_events = events
        .borrow()
        .iter()
        .filter(|e| e.kind == AuditKind::Deny(Reason::DnsRate))
        .count() as u64;
    assert_eq!(rate_events, 101 - captured);
    // Other traffic is not charged.
    assert_eq!(
        n.run_sandbox(&Pkt::tcp_syn(ALLOWED_IP, 443).frame()).retval,
        TC_ACT_REDIRECT
    );
}

#[test]
fn a_job_without_a_dns_budget_is_not_limited_in_tier_1() {
    let n = setup("dnsnobudget", |_| {}, |_| {});
    for sport in 1..=2000u16 {
        let q = Pkt {
            sport,
            ..Pkt::udp(OTHER_IP, 53, b"\x12\x34")
        };
        assert_eq!(n.run_sandbox(&q.frame()).retval, TC_ACT_OK);
    }
    assert_eq!(sandbox_drops(&n, Reason::DnsRate), 0);
}

#[test]
fn frames_with_vlan_and_qinq_ethertypes_are_not_ip() {
    let n = setup("vlanframe", |_| {}, |_| {});
    let plain = Pkt::udp(ALLOWED_IP, 4000, b"x").frame();
    for tpid in [0x8100u16, 0x88a8, 0x9100] {
        // TPID, TCI (VLAN 5), then the IPv4 EtherType and packet.
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&tpid.to_be_bytes());
        tagged.extend_from_slice(&5u16.to_be_bytes());
        tagged.extend_from_slice(&plain[12..]);
        let before = sandbox_drops(&n, Reason::NotIp);
        assert_eq!(n.run_sandbox(&tagged).retval, TC_ACT_SHOT, "{tpid:#x}");
        assert_eq!(sandbox_drops(&n, Reason::NotIp), before + 1);
    }
    assert_eq!(n.run_sandbox(&plain).retval, TC_ACT_REDIRECT);
}
