//! BPF_PROG_TEST_RUN tests of bpf/proxy_fastpath.bpf.c, the egress proxy's fast path (root;
//! fails, saying so, otherwise). The programs run with a fixed redirect target
//! (`test_redirect_ifindex`: test_run has no routes); TCP super-packets cannot be built here
//! (test_run cannot set a GSO type), the proxy's netns tests carry them.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::*;
use snas_bpf::fastpath::{
    ClockDir, ClockOwner, ClockRate, DivertReason, FastFlowSpec, FastPath, FastPathConfig,
    FastProto,
};
use snas_bpf::testing::{run, SkbCtx, TC_ACT_OK, TC_ACT_REDIRECT};
use snas_bpf::{mono_now, Bps};

const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const EGRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
const EGRESS_PORT: u16 = 31337;
const LO: u32 = 1;

/// How long a clock that bound stays bound in these tests (the proxy uses 1 s).
const HOLD: Duration = Duration::from_millis(500);

fn load() -> FastPath {
    require_root("proxy fast path");
    FastPath::load(&FastPathConfig {
        proxy_ip: PROXY,
        geneve_port: 6081,
        underlay_mtu: 1500,
        slack: Duration::from_millis(1),
        bound_hold: HOLD,
        test_redirect_ifindex: Some(LO),
    })
    .expect("load the fast path")
}

fn spec(p: &Pkt) -> FastFlowSpec {
    FastFlowSpec {
        job_key: JOB_KEY,
        tenant_id: TENANT,
        serial: SERIAL,
        node: NODE_IP,
        proto: if p.proto == 6 {
            FastProto::Tcp
        } else {
            FastProto::Udp
        },
        sandbox: SocketAddrV4::new(p.src, p.sport),
        remote: SocketAddrV4::new(p.dst, p.dport),
        egress: SocketAddrV4::new(EGRESS, EGRESS_PORT),
        expires: mono_now().expect("clock") + Duration::from_secs(3600),
    }
}

fn clocks(fp: &FastPath, job: ClockRate, tenant: ClockRate) {
    for dir in [ClockDir::Egress, ClockDir::Ingress] {
        fp.set_clock(ClockOwner::Job(JOB_KEY), dir, job).unwrap();
        fp.set_clock(ClockOwner::Tenant(TENANT), dir, tenant)
            .unwrap();
    }
}

/// A fast path with the flow of `p` installed and unlimited clocks.
fn with_flow(p: &Pkt) -> FastPath {
    let fp = load();
    fp.add_nodes(&[NODE_IP]).unwrap();
    clocks(&fp, ClockRate::Unlimited, ClockRate::Unlimited);
    fp.install(&spec(p)).unwrap();
    fp
}

/// The GENEVE datagram a node sends for the inner IPv4 packet `inner`, with `serial`.
fn from_node(inner: &[u8], serial: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&PROXY_MAC);
    f.extend_from_slice(&UNDERLAY_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut o = expected_outer(NODE_IP, PROXY, 0x1234, inner.len(), JOB_KEY);
    o[52..56].copy_from_slice(&serial.to_be_bytes());
    f.extend_from_slice(&o);
    f.extend_from_slice(inner);
    f
}

fn data_packet() -> Pkt {
    Pkt {
        tcp_flags: 0x18,
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    }
}

fn run_node(fp: &FastPath, frame: &[u8]) -> snas_bpf::testing::RunOutput {
    run(
        fp.from_node_prog(),
        frame,
        &SkbCtx {
            ifindex: LO,
            ..SkbCtx::default()
        },
    )
    .expect("test_run")
}

fn run_internet(fp: &FastPath, frame: &[u8]) -> snas_bpf::testing::RunOutput {
    run(
        fp.from_internet_prog(),
        frame,
        &SkbCtx {
            ifindex: LO,
            ..SkbCtx::default()
        },
    )
    .expect("test_run")
}

#[test]
fn a_fast_flows_packet_from_its_node_is_decapsulated_source_natted_and_redirected() {
    let p = data_packet();
    let fp = with_flow(&p);
    let inner = p.ip();
    let out = run_node(&fp, &from_node(&inner, SERIAL.get()));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let ip = &out.data[ETH..];
    assert_eq!(ip.len(), inner.len(), "the 56 overlay bytes are gone");
    assert_eq!(
        &ip[12..16],
        &EGRESS.octets(),
        "source NATed to the egress address"
    );
    assert_eq!(&ip[16..20], &ALLOWED_IP.octets());
    assert_eq!(be16(ip, 20), EGRESS_PORT, "source port NATed");
    assert_eq!(be16(ip, 22), 443);
    assert_eq!(ip[8], 63, "TTL decremented as forwarding does");
    assert!(ipv4_header_ok(ip), "IPv4 checksum");
    assert!(l4_ok(ip), "TCP checksum");
    assert_eq!(&ip[40..], &p.payload[..], "payload untouched");
    let st = fp.stats().unwrap();
    assert_eq!(
        (st.from_node_packets, st.from_node_bytes),
        (1, inner.len() as u64)
    );
    assert_eq!(st.last_redirect, u64::from(LO));
    let (o, i) = fp.counts(&spec(&p).keys()).unwrap().expect("installed");
    assert_eq!((o.packets, o.bytes), (1, inner.len() as u64));
    assert!(o.last_seen.is_some());
    assert_eq!(i.packets, 0);
}

#[test]
fn a_udp_flows_datagram_keeps_a_valid_checksum_through_the_nat() {
    let p = Pkt::udp(ALLOWED_IP, 4000, b"hello, fast path");
    let fp = with_flow(&p);
    let out = run_node(&fp, &from_node(&p.ip(), SERIAL.get()));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let ip = &out.data[ETH..];
    assert_eq!(&ip[12..16], &EGRESS.octets());
    assert_eq!(be16(ip, 20), EGRESS_PORT);
    assert!(ipv4_header_ok(ip));
    assert!(l4_ok(ip), "UDP checksum");
}

#[test]
fn a_packet_whose_option_carries_another_serial_takes_the_userspace_path_untouched() {
    let p = data_packet();
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get() + 1);
    let out = run_node(&fp, &frame);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data, frame);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Serial), 1);
    assert_eq!(fp.stats().unwrap().from_node_packets, 0);
}

#[test]
fn syn_fin_and_rst_always_take_the_userspace_path() {
    let p = data_packet();
    let fp = with_flow(&p);
    for flags in [0x02, 0x12, 0x11, 0x01, 0x04, 0x14] {
        let frame = from_node(&p.with_flags(flags).ip(), SERIAL.get());
        let out = run_node(&fp, &frame);
        assert_eq!(out.retval, TC_ACT_OK, "flags {flags:#x}");
        assert_eq!(out.data, frame);
    }
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Flags), 6);
}

#[test]
fn packets_of_flows_without_an_entry_or_from_untrusted_nodes_are_left_alone() {
    let p = data_packet();
    let fp = with_flow(&p);
    let other = Pkt {
        sport: 40001,
        ..p.clone()
    };
    let frame = from_node(&other.ip(), SERIAL.get());
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::NoEntry), 1);
    let mut untrusted = from_node(&p.ip(), SERIAL.get());
    untrusted[ETH + 12..ETH + 16].copy_from_slice(&Ipv4Addr::new(192, 0, 2, 99).octets());
    assert_eq!(run_node(&fp, &untrusted).retval, TC_ACT_OK);
    assert_eq!(fp.stats().unwrap().from_node_packets, 0);
}

#[test]
fn once_the_jobs_rate_binds_its_packets_take_the_userspace_path() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    // 10 Mbit/s: 1 ms of slack is 1,250 bytes, so the second 1,040-byte packet is ahead.
    clocks(
        &fp,
        ClockRate::Limited(Bps::mbit(10).unwrap()),
        ClockRate::Unlimited,
    );
    let frame = from_node(&p.ip(), SERIAL.get());
    let mut fast = 0;
    for _ in 0..20 {
        if run_node(&fp, &frame).retval == TC_ACT_REDIRECT {
            fast += 1;
        }
    }
    assert!(
        (1..=2).contains(&fast),
        "only the slack's worth leaves fast: {fast}"
    );
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Paced), 20 - fast);
}

#[test]
fn the_packets_handed_to_the_pacer_are_charged_to_the_clock_as_the_pacer_charges_them() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    bind_at_10_mbit(&fp, &frame);
    let clock = || {
        fp.clock_times(ClockOwner::Job(JOB_KEY), ClockDir::Egress)
            .unwrap()
            .expect("clock")
            .0
    };
    // 10 diverted packets of 1,040 bytes at 10 Mbit/s: the clock moves 8.32 ms (less the
    // microseconds the loop takes, which start-time EDT does not credit).
    let before = clock();
    for _ in 0..10 {
        assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    }
    let moved = clock() - before;
    assert!(
        (Duration::from_micros(8_000)..=Duration::from_micros(8_320)).contains(&moved),
        "{moved:?}"
    );
}

#[test]
fn a_packet_the_pacer_would_drop_beyond_its_horizon_is_not_charged() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    bind_at_10_mbit(&fp, &frame);
    // The pacer's horizon at 10 Mbit/s is one 64 KiB super-packet's time (52.4 ms: more than
    // the 1 ms slack). 200 packets (166 ms at the rate) arrive at once: the clock stops at
    // most one packet past the horizon (plus the loop's own time), as the pacer's, which
    // drops the rest; charged all, it would be 166 ms ahead.
    let start = mono_now().unwrap();
    for _ in 0..200 {
        assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    }
    let (next, _) = fp
        .clock_times(ClockOwner::Job(JOB_KEY), ClockDir::Egress)
        .unwrap()
        .expect("clock");
    let ahead = next - start;
    let horizon = Duration::from_nanos(65_536 * 8 * 100);
    assert!(
        ahead > horizon - Duration::from_millis(1) && ahead < horizon + Duration::from_millis(10),
        "{ahead:?}"
    );
}

/// Runs `frame` until the job's 10 Mbit/s clock binds (a packet is diverted); returns how
/// many left fast before.
fn bind_at_10_mbit(fp: &FastPath, frame: &[u8]) -> usize {
    clocks(
        fp,
        ClockRate::Limited(Bps::mbit(10).unwrap()),
        ClockRate::Unlimited,
    );
    let mut fast = 0;
    while run_node(fp, frame).retval == TC_ACT_REDIRECT {
        fast += 1;
        assert!(fast < 10, "the clock never bound");
    }
    fast
}

#[test]
fn a_job_whose_rate_bound_stays_on_the_userspace_path_after_its_clock_fell_behind() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    let bound_at = mono_now().unwrap();
    let fast = bind_at_10_mbit(&fp, &frame);
    assert!((1..=2).contains(&fast), "{fast}");
    // 20 ms later the clock (a few ms ahead at most) and the hand-off hold are behind now:
    // without the hysteresis these packets would leave fast between the paced ones.
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..100 {
        assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    }
    assert!(
        mono_now().unwrap() < bound_at + HOLD,
        "the test ran past the hold: it proves nothing"
    );
    // Nothing found the clock ahead since the bind: a hold later the job is fast again.
    std::thread::sleep(HOLD);
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Paced), 101);
}

#[test]
fn a_bound_job_stays_on_the_userspace_path_while_the_pacer_keeps_its_clock_ahead() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    bind_at_10_mbit(&fp, &frame);
    // The job keeps sending at its rate: 6 packets of 1,040 bytes (5 ms at 10 Mbit/s) every
    // 5 ms, each handed to the pacer and charged, keep the clock ahead, for twice the hold.
    let start = mono_now().unwrap();
    let mut sent = 0;
    while mono_now().unwrap() < start + 2 * HOLD {
        for _ in 0..6 {
            assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK, "after {sent}");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(sent > 120, "{sent}");
    // The job stops: its clock drains within 5 ms, and a hold later it is fast again.
    std::thread::sleep(HOLD + Duration::from_millis(100));
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
}

#[test]
fn a_tenant_whose_cap_bound_keeps_all_its_jobs_on_the_userspace_path() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    clocks(
        &fp,
        ClockRate::Unlimited,
        ClockRate::Limited(Bps::mbit(10).unwrap()),
    );
    let mut fast = 0;
    while run_node(&fp, &frame).retval == TC_ACT_REDIRECT {
        fast += 1;
        assert!(fast < 10, "the tenant's clock never bound");
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
}

#[test]
fn an_unlimited_job_under_an_unlimited_tenant_never_binds() {
    let p = Pkt {
        payload: vec![0x55; 1000],
        ..data_packet()
    };
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    for i in 0..5_000 {
        assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT, "packet {i}");
    }
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Paced), 0);
}

#[test]
fn a_download_whose_rate_bound_stays_on_the_userspace_path_after_its_clock_fell_behind() {
    let p = data_packet();
    let fp = with_flow(&p);
    let reply = reply_to_egress(&p, &[0x66; 1000]).frame();
    clocks(
        &fp,
        ClockRate::Limited(Bps::mbit(10).unwrap()),
        ClockRate::Unlimited,
    );
    let mut fast = 0;
    while run_internet(&fp, &reply).retval == TC_ACT_REDIRECT {
        fast += 1;
        assert!(fast < 10, "the ingress clock never bound");
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(run_internet(&fp, &reply).retval, TC_ACT_OK);
    // The egress clock did not bind: uploads stay fast.
    let frame = from_node(&p.ip(), SERIAL.get());
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
}

#[test]
fn no_packet_leaves_fast_while_one_of_its_job_waits_in_the_userspace_pacer() {
    let p = data_packet();
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
    // The pacer holds a packet of the job until 50 ms from now (its clock is not ahead:
    // unlimited rate): later packets must not overtake it.
    let now = mono_now().unwrap();
    fp.hold(
        ClockOwner::Job(JOB_KEY),
        ClockDir::Egress,
        now + Duration::from_millis(50),
    )
    .unwrap();
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Paced), 1);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
}

#[test]
fn a_blocked_tenant_or_a_missing_clock_is_never_fast() {
    let p = data_packet();
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    clocks(&fp, ClockRate::Unlimited, ClockRate::Blocked);
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    fp.remove_clock(ClockOwner::Tenant(TENANT), ClockDir::Egress)
        .unwrap();
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Paced), 2);
}

#[test]
fn a_removed_flow_returns_its_counters_and_is_never_fast_again() {
    let p = data_packet();
    let fp = with_flow(&p);
    let frame = from_node(&p.ip(), SERIAL.get());
    for _ in 0..3 {
        assert_eq!(run_node(&fp, &frame).retval, TC_ACT_REDIRECT);
    }
    let (o, _) = fp.remove(&spec(&p).keys()).unwrap().expect("was installed");
    assert_eq!(o.packets, 3);
    assert!(fp.is_empty());
    assert_eq!(run_node(&fp, &frame).retval, TC_ACT_OK);
    assert_eq!(fp.remove(&spec(&p).keys()).unwrap(), None);
}

/// A reply from the internet to the flow of `p`: remote → egress address and port.
fn reply_to_egress(p: &Pkt, payload: &[u8]) -> Pkt {
    Pkt {
        src: p.dst,
        dst: EGRESS,
        sport: p.dport,
        dport: EGRESS_PORT,
        tcp_flags: 0x10,
        payload: payload.to_vec(),
        ..p.clone()
    }
}

#[test]
fn a_reply_is_destination_natted_encapsulated_for_the_jobs_node_and_redirected() {
    let p = data_packet();
    let fp = with_flow(&p);
    let r = reply_to_egress(&p, b"HTTP/1.1 200 OK\r\n\r\n");
    let out = run_internet(&fp, &r.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let inner_len = r.ip().len();
    let outer = &out.data[ETH..ETH + 56];
    assert!(ipv4_header_ok(outer), "outer IPv4 checksum");
    assert_eq!(&outer[12..16], &PROXY.octets(), "from this proxy");
    assert_eq!(&outer[16..20], &NODE_IP.octets(), "to the job's node");
    assert_eq!(
        be16(outer, 20),
        6081,
        "from the GENEVE port, as the sockets send"
    );
    assert_eq!(be16(outer, 22), 6081);
    assert_eq!(usize::from(be16(outer, 2)), inner_len + 56);
    assert_eq!(
        &outer[28..],
        &expected_outer(PROXY, NODE_IP, 0, inner_len, JOB_KEY)[28..]
    );
    let ip = &out.data[ETH + 56..];
    assert_eq!(&ip[16..20], &SANDBOX_IP.octets(), "destination NATed back");
    assert_eq!(be16(ip, 22), p.sport);
    assert_eq!(&ip[12..16], &ALLOWED_IP.octets());
    assert_eq!(ip[8], 63);
    assert!(ipv4_header_ok(ip));
    assert!(l4_ok(ip));
    let st = fp.stats().unwrap();
    assert_eq!(
        (st.to_node_packets, st.to_node_bytes),
        (1, inner_len as u64)
    );
    let (_, i) = fp.counts(&spec(&p).keys()).unwrap().expect("installed");
    assert_eq!(i.packets, 1);
}

#[test]
fn a_reply_too_large_for_the_underlay_once_wrapped_takes_the_userspace_path() {
    let p = data_packet();
    let fp = with_flow(&p);
    // 1,500 bytes from the internet do not fit a 1,500-byte underlay with 56 bytes added.
    let r = reply_to_egress(&p, &[0u8; 1460]);
    let frame = r.frame();
    let out = run_internet(&fp, &frame);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data, frame);
    assert_eq!(fp.stats().unwrap().diverted(DivertReason::Route), 1);
}

#[test]
fn replies_with_syn_fin_or_rst_and_to_other_ports_take_the_userspace_path() {
    let p = data_packet();
    let fp = with_flow(&p);
    for flags in [0x12, 0x11, 0x04] {
        let r = Pkt {
            tcp_flags: flags,
            ..reply_to_egress(&p, b"")
        };
        assert_eq!(run_internet(&fp, &r.frame()).retval, TC_ACT_OK);
    }
    let other = Pkt {
        dport: EGRESS_PORT + 1,
        ..reply_to_egress(&p, b"x")
    };
    assert_eq!(run_internet(&fp, &other.frame()).retval, TC_ACT_OK);
    let st = fp.stats().unwrap();
    assert_eq!(st.diverted(DivertReason::Flags), 3);
    assert_eq!(st.diverted(DivertReason::NoEntry), 1);
    assert_eq!(st.to_node_packets, 0);
}
