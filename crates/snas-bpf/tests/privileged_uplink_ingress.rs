//! BPF_PROG_TEST_RUN tests of bpf/uplink_ingress.bpf.c (root; fails, saying
//! so, otherwise).

mod common;

use std::net::Ipv4Addr;

use common::*;
use snas_bpf::testing::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::ProxyEntry;
use snas_wire::Reason;

fn setup(name: &str) -> Node {
    node_with_job(name, |_| {}, |_| {}, &proxies(1))
}

fn reply_inner() -> Vec<u8> {
    Pkt {
        src: ALLOWED_IP,
        dst: SANDBOX_IP,
        sport: 443,
        dport: 40000,
        tcp_flags: 0x12,
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    }
    .ip()
}

fn in_drops(n: &Node, job: JobKey, r: Reason) -> u64 {
    n.t1()
        .counters(job)
        .expect("counters")
        .to_sandbox
        .dropped(r)
        .packets
}

#[test]
fn geneve_from_a_proxy_is_decapsulated_into_the_job_veth() {
    let n = setup("decap");
    let inner = reply_inner();
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &inner));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let mut want = Vec::new();
    want.extend_from_slice(&SANDBOX_MAC);
    want.extend_from_slice(&HOST_MAC);
    want.extend_from_slice(&0x0800u16.to_be_bytes());
    want.extend_from_slice(&inner);
    assert_eq!(out.data, want);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(
        (dbg.kind, dbg.ifindex),
        (3, VETH),
        "redirect_peer into the job's veth"
    );
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.forwarded.packets, 1);
    assert_eq!(c.to_sandbox.forwarded.bytes, want.len() as u64);
}

#[test]
fn non_geneve_traffic_passes_untouched() {
    let n = setup("passthru");
    let plain = Pkt {
        src: PROXY_IPS[0],
        dst: NODE_IP,
        ..Pkt::udp(NODE_IP, 53, &[1, 2, 3, 4])
    }
    .frame();
    let out = n.run_uplink(&plain);
    assert_eq!((out.retval, &out.data), (TC_ACT_OK, &plain));
    let tcp = Pkt {
        src: PROXY_IPS[0],
        ..Pkt::tcp_syn(NODE_IP, 6081)
    }
    .frame();
    let out = n.run_uplink(&tcp);
    assert_eq!((out.retval, &out.data), (TC_ACT_OK, &tcp));
}

#[test]
fn geneve_from_an_unknown_source_passes_untouched() {
    let n = setup("untrusted");
    let f = geneve_frame(Ipv4Addr::new(198, 51, 100, 66), JOB_KEY, &reply_inner());
    let out = n.run_uplink(&f);
    assert_eq!((out.retval, &out.data), (TC_ACT_OK, &f));
}

#[test]
fn geneve_to_another_address_passes_untouched() {
    let n = setup("otherdst");
    let mut f = geneve_frame(PROXY_IPS[0], JOB_KEY, &reply_inner());
    f[ETH + 19] = 99; // outer destination 192.0.2.99, not this node
    let out = n.run_uplink(&f);
    assert_eq!((out.retval, &out.data), (TC_ACT_OK, &f));
}

#[test]
fn geneve_naming_an_unknown_job_is_dropped() {
    let n = setup("unknownkey");
    let out = n.run_uplink(&geneve_frame(
        PROXY_IPS[0],
        JobKey(JOB_KEY.get() ^ 1),
        &reply_inner(),
    ));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JobKey(0), Reason::GeneveUnknownJob), 1);
}

#[test]
fn geneve_with_a_wrong_tenant_is_dropped() {
    let n = setup("tenant");
    let mut f = geneve_frame(PROXY_IPS[0], JOB_KEY, &reply_inner());
    f[ETH + 40] ^= 0xff; // first byte of the tenant id
    assert_eq!(n.run_uplink(&f).retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JobKey(0), Reason::GeneveUnknownJob), 1);
}

#[test]
fn geneve_without_our_critical_option_is_dropped() {
    let n = setup("option");
    let base = geneve_frame(PROXY_IPS[0], JOB_KEY, &reply_inner());
    let g = ETH + 28;
    for (off, val) in [(g + 9, 0xffu8), (g + 10, 0x01), (g + 1, 0x00), (g, 0x04)] {
        let mut f = base.clone();
        f[off] = val;
        assert_eq!(
            n.run_uplink(&f).retval,
            TC_ACT_SHOT,
            "byte {off} = {val:#x}"
        );
    }
    assert_eq!(in_drops(&n, JobKey(0), Reason::GeneveOption), 4);
    let mut v1 = base.clone();
    v1[g] = 0x45; // version 1
    assert_eq!(n.run_uplink(&v1).retval, TC_ACT_SHOT);
    let mut other_proto = base;
    other_proto[g + 2..g + 4].copy_from_slice(&0x88b5u16.to_be_bytes()); // not IPv4 or IPv6
    assert_eq!(n.run_uplink(&other_proto).retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JobKey(0), Reason::GeneveMalformed), 2);
}

#[test]
fn inner_packet_for_another_address_is_dropped() {
    let n = setup("innerdst");
    let inner = Pkt {
        src: ALLOWED_IP,
        dst: Ipv4Addr::new(10, 88, 0, 99),
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    }
    .ip();
    assert_eq!(
        n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &inner))
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(in_drops(&n, JOB_KEY, Reason::DestinationDenied), 1);
}

#[test]
fn the_node_polices_a_jobs_downloads_to_its_ingress_rate() {
    require_root("inpolice");
    let n = load(&node_config("inpolice"));
    let mut j = job();
    // 10 Mbit/s: 1400 bytes are 1.12 ms; the horizon is at least one 64 KiB burst (52.4 ms),
    // so about 47 back-to-back packets pass, then the rest is dropped.
    j.ingress = Some(snas_bpf::Bps::new(10_000_000).expect("a rate is not zero"));
    n.t1().configure_job(&j).expect("job");
    n.t1()
        .set_proxies(&[ProxyEntry::active(PROXY_IPS[0])])
        .expect("proxies");
    let inner = Pkt {
        src: ALLOWED_IP,
        dst: SANDBOX_IP,
        ..Pkt::udp(ALLOWED_IP, 4000, &vec![0; 1400 - 28])
    }
    .ip();
    let frame = geneve_frame(PROXY_IPS[0], JOB_KEY, &inner);
    let verdicts: Vec<i32> = (0..120).map(|_| n.run_uplink(&frame).retval).collect();
    let passed = verdicts.iter().filter(|&&v| v == TC_ACT_REDIRECT).count();
    assert!(
        verdicts[..40].iter().all(|&v| v == TC_ACT_REDIRECT),
        "one burst passes: {verdicts:?}"
    );
    assert!(
        (40..100).contains(&passed),
        "{passed} of 120 back-to-back packets passed"
    );
    assert_eq!(
        in_drops(&n, JOB_KEY, Reason::PacingHorizon),
        (120 - passed) as u64
    );
    assert!(verdicts
        .iter()
        .all(|&v| v == TC_ACT_REDIRECT || v == TC_ACT_SHOT));
}

/// An ICMP error from `router` to the sandbox quoting (the first 28 bytes of) `quoted`: type 3
/// code 4 (fragmentation needed, next-hop MTU 1280) unless `kind` says otherwise.
fn icmp_error(router: Ipv4Addr, kind: (u8, u8), quoted: &Pkt) -> Vec<u8> {
    let mut icmp = vec![kind.0, kind.1, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(&quoted.ip()[..28]);
    let c = csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Pkt {
        src: router,
        dst: SANDBOX_IP,
        proto: 1,
        payload: icmp,
        ..Pkt::tcp_syn(SANDBOX_IP, 0)
    }
    .ip()
}

#[test]
fn an_icmp_error_about_a_flow_of_the_job_reaches_the_sandbox_from_any_router() {
    let n = setup("icmpok");
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    let tcp = Pkt::tcp_syn(ALLOWED_IP, 443);
    let udp = Pkt::udp(ALLOWED_IP, 4001, b"q");
    for p in [&tcp, &udp] {
        assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    }
    // A router on the path answers from its own address, not the destination's.
    let router = Ipv4Addr::new(198, 51, 100, 1);
    for (p, kind) in [(&tcp, (3, 4)), (&udp, (3, 3)), (&tcp, (11, 0))] {
        let inner = icmp_error(router, kind, p);
        let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &inner));
        assert_eq!(out.retval, TC_ACT_REDIRECT, "{kind:?} about {p:?}");
        assert_eq!(&out.data[ETH..], &inner[..]);
    }
    assert_eq!(in_drops(&n, JOB_KEY, Reason::NoConntrack), 0);
}

#[test]
fn a_forged_icmp_error_quoting_no_flow_of_the_job_is_dropped_as_no_conntrack() {
    let n = setup("icmpforged");
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    let real = Pkt::tcp_syn(ALLOWED_IP, 443);
    assert_eq!(n.run_sandbox(&real.frame()).retval, TC_ACT_REDIRECT);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let forged = [
        // Another source port (a connection the job does not have).
        Pkt {
            sport: 40001,
            ..real.clone()
        },
        // Another destination.
        Pkt::tcp_syn(Ipv4Addr::new(203, 0, 113, 8), 443),
        // The same ports over UDP.
        Pkt::udp(ALLOWED_IP, 443, b""),
        // Quoting a packet someone else sent (not the sandbox's address).
        Pkt {
            src: OTHER_IP,
            ..real.clone()
        },
    ];
    for (i, q) in forged.iter().enumerate() {
        for kind in [(3, 4), (3, 1), (11, 0), (12, 0), (5, 1)] {
            let inner = icmp_error(router, kind, q);
            let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &inner));
            assert_eq!(out.retval, TC_ACT_SHOT, "forged {i} {kind:?} passed");
        }
    }
    assert_eq!(in_drops(&n, JOB_KEY, Reason::NoConntrack), 4 * 5);
    // Not errors: an echo reply is not checked here (the policy path decides about ICMP).
    let echo_reply = Pkt {
        src: ALLOWED_IP,
        dst: SANDBOX_IP,
        proto: 1,
        payload: vec![0, 0, 0xff, 0xff, 0, 0, 0, 0],
        ..real.clone()
    }
    .ip();
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &echo_reply));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
}

#[test]
fn an_icmp_error_that_cannot_be_checked_is_dropped() {
    let n = setup("icmpshort");
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    let real = Pkt::tcp_syn(ALLOWED_IP, 443);
    assert_eq!(n.run_sandbox(&real.frame()).retval, TC_ACT_REDIRECT);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    // The quote cut short of the ports.
    let mut short = icmp_error(router, (3, 4), &real);
    short.truncate(20 + 8 + 20 + 2);
    let l = short.len() as u16;
    short[2..4].copy_from_slice(&l.to_be_bytes());
    short[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&short[..20], 0);
    short[10..12].copy_from_slice(&c.to_be_bytes());
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &short));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JOB_KEY, Reason::Malformed), 1);
    // The same error behind IP options, or as a fragment.
    let mut err = Pkt {
        src: router,
        dst: SANDBOX_IP,
        proto: 1,
        payload: icmp_error(router, (3, 4), &real)[20..].to_vec(),
        ..real.clone()
    };
    err.ip_options = vec![1, 1, 1, 1];
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &err.ip()));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JOB_KEY, Reason::IpOptions), 1);
    err.ip_options.clear();
    err.frag_off = 0x2000;
    let out = n.run_uplink(&geneve_frame(PROXY_IPS[0], JOB_KEY, &err.ip()));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(in_drops(&n, JOB_KEY, Reason::Fragment), 1);
}
