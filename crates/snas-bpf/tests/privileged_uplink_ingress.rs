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
