//! BPF_PROG_TEST_RUN tests of bpf/sandbox_ingress.bpf.c (root; fails, saying
//! so, otherwise). Every test loads its own node under a unique bpffs directory.

mod common;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use snas_bpf::maglev;
use snas_bpf::testing::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{AuditKind, Bps, PortRule, RuleProtocol};
use snas_wire::Reason;

/// A node with one job, three proxies and 203.0.113.0/24 allowed on TCP 443 and UDP 4000-4999.
fn setup(name: &str) -> Node {
    setup_with(name, |_| {}, |_| {})
}

fn setup_with(
    name: &str,
    node_edit: impl FnOnce(&mut snas_bpf::NodeConfig),
    job_edit: impl FnOnce(&mut snas_bpf::JobConfig),
) -> Node {
    let n = node_with_job(name, node_edit, job_edit, &proxies(3));
    allow_test_net(&n, &tcp_443_and_udp_4000s());
    n
}

#[test]
fn allowed_syn_is_encapsulated_with_exact_geneve_bytes() {
    let n = setup("encap");
    let p = Pkt::tcp_syn(ALLOWED_IP, 443);
    let frame = p.frame();
    let out = n.run_sandbox(&frame);
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(out.data.len(), frame.len() + 56);
    let dbg = n
        .t1()
        .last_redirect()
        .expect("debug")
        .expect("redirect recorded");
    assert_eq!((dbg.kind, dbg.ifindex), (2, UPLINK));
    let hash = flow_hash(&p);
    assert_eq!(dbg.flow_hash, hash);
    let proxy_ip = PROXY_IPS[dbg.proxy as usize];
    let inner = p.ip();
    assert_eq!(
        &out.data[..ETH],
        &frame[..ETH],
        "Ethernet header kept for redirect_neigh"
    );
    assert_eq!(
        &out.data[ETH..ETH + 56],
        &expected_outer(NODE_IP, proxy_ip, hash, inner.len(), JOB_KEY)[..]
    );
    assert!(ipv4_header_ok(&out.data[ETH..]));
    assert_eq!(&out.data[ETH + 56..], &inner[..], "inner packet untouched");
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.from_sandbox.forwarded.packets, 1);
    assert!(c.from_sandbox.drops.is_empty());
}

#[test]
fn proxy_choice_follows_the_maglev_table_and_is_stable_for_a_flow() {
    let n = setup("maglev");
    let backends: Vec<_> = PROXY_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| maglev::Backend {
            index: i as u16,
            id: u64::from(u32::from(*ip)),
        })
        .collect();
    let table = maglev::build(&backends);
    for sport in 40000..40020 {
        let p = Pkt {
            sport,
            ..Pkt::tcp_syn(ALLOWED_IP, 443)
        };
        let want = table[flow_hash(&p) as usize % maglev::TABLE_SIZE];
        for _ in 0..2 {
            assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
            let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
            assert_eq!(dbg.proxy, u32::from(want), "sport {sport}");
        }
    }
}

#[test]
fn established_flow_stays_pinned_when_the_table_changes_and_moves_when_its_proxy_dies() {
    let n = setup("pinning");
    let b = |k: usize| -> Vec<maglev::Backend> {
        PROXY_IPS[..k]
            .iter()
            .enumerate()
            .map(|(i, ip)| maglev::Backend {
                index: i as u16,
                id: u64::from(u32::from(*ip)),
            })
            .collect()
    };
    // Start with two proxies; find a flow whose slot moves to proxy 2 when it is added.
    n.t1().set_proxies(&proxies(2)).expect("proxies");
    let (t2, t3) = (maglev::build(&b(2)), maglev::build(&b(3)));
    let p = (30000..u16::MAX)
        .map(|sport| Pkt {
            sport,
            ..Pkt::tcp_syn(ALLOWED_IP, 443)
        })
        .find(|p| {
            let s = flow_hash(p) as usize % maglev::TABLE_SIZE;
            t2[s] != t3[s]
        })
        .expect("some flow moves");
    let slot = flow_hash(&p) as usize % maglev::TABLE_SIZE;
    let proxy_of = |n: &Node, p: &Pkt| {
        assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
        n.t1()
            .last_redirect()
            .expect("debug")
            .expect("recorded")
            .proxy
    };
    assert_eq!(proxy_of(&n, &p), u32::from(t2[slot]));

    n.t1().set_proxies(&proxies(3)).expect("proxies");
    let ack = Pkt {
        tcp_flags: 0x10,
        ..p.clone()
    };
    assert_eq!(
        proxy_of(&n, &ack),
        u32::from(t2[slot]),
        "established flow stays pinned"
    );
    let fresh = Pkt {
        sport: p.sport,
        dport: 443,
        dst: Ipv4Addr::new(203, 0, 113, 8),
        ..p.clone()
    };
    let fresh_slot = flow_hash(&fresh) as usize % maglev::TABLE_SIZE;
    assert_eq!(
        proxy_of(&n, &fresh),
        u32::from(t3[fresh_slot]),
        "new flow uses the new table"
    );

    // The pinned proxy dies: the flow is re-picked from the current table.
    let mut px = proxies(3);
    px[usize::from(t2[slot])].alive = false;
    n.t1().set_proxies(&px).expect("proxies");
    let alive: Vec<_> = b(3).into_iter().filter(|x| x.index != t2[slot]).collect();
    let t_alive = maglev::build(&alive);
    assert_eq!(proxy_of(&n, &ack), u32::from(t_alive[slot]));
}

#[test]
fn no_alive_proxy_drops_with_no_proxy() {
    let n = setup("noproxy");
    n.t1().set_proxies(&[]).expect("proxies");
    assert_drop(&n, &Pkt::tcp_syn(ALLOWED_IP, 443).frame(), Reason::NoProxy);
}

#[test]
fn spoofed_source_ip_is_dropped() {
    let n = setup("spoofip");
    let p = Pkt {
        src: Ipv4Addr::new(10, 88, 0, 3),
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    assert_drop(&n, &p.frame(), Reason::SpoofedSource);
}

#[test]
fn spoofed_source_mac_is_dropped() {
    let n = setup("spoofmac");
    let p = Pkt {
        src_mac: [0x02, 0, 0, 0, 0, 0x66],
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    assert_drop(&n, &p.frame(), Reason::SpoofedMac);
}

#[test]
fn first_and_later_fragments_are_dropped() {
    let n = setup("frag");
    let first = Pkt {
        frag_off: 0x2000,
        ..Pkt::udp(ALLOWED_IP, 4000, &[1; 16])
    };
    assert_drop(&n, &first.frame(), Reason::Fragment);
    let later = Pkt {
        frag_off: 0x0004,
        ..Pkt::udp(ALLOWED_IP, 4000, &[1; 16])
    };
    assert_drop(&n, &later.frame(), Reason::Fragment);
}

#[test]
fn ip_options_are_dropped() {
    let n = setup("ipopts");
    // Record-route-sized option area: NOP padding to 4 bytes.
    let p = Pkt {
        ip_options: vec![1, 1, 1, 0],
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    assert_drop(&n, &p.frame(), Reason::IpOptions);
}

#[test]
fn inconsistent_ipv4_headers_are_malformed() {
    let n = setup("malformed");
    let good = Pkt::tcp_syn(ALLOWED_IP, 443).frame();
    let mut longer = good.clone();
    longer[ETH + 2..ETH + 4].copy_from_slice(&2000u16.to_be_bytes());
    assert_drop(&n, &longer, Reason::Malformed);
    let mut version = good.clone();
    version[ETH] = 0x65;
    assert_drop(&n, &version, Reason::Malformed);
    let mut short_ihl = good;
    short_ihl[ETH] = 0x44;
    assert_drop(&n, &short_ihl, Reason::Malformed);
}

#[test]
fn arp_passes_and_other_ethertypes_are_dropped() {
    let n = setup("arp");
    let arp = arp_request(SANDBOX_MAC, SANDBOX_IP);
    let out = n.run_sandbox(&arp);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data, arp);
    let mut other = arp.clone();
    other[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    assert_drop(&n, &other, Reason::NotIp);
}

/// Who-has 10.88.0.1 from the given sender, in a frame from the sandbox MAC.
fn arp_request(sha: [u8; 6], spa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SANDBOX_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY_IP.octets());
    f
}

#[test]
fn arp_claiming_another_address_or_mac_is_dropped() {
    let n = setup("arpspoof");
    assert_drop(
        &n,
        &arp_request(SANDBOX_MAC, Ipv4Addr::new(10, 88, 0, 9)),
        Reason::SpoofedSource,
    );
    assert_drop(
        &n,
        &arp_request([2, 0, 0, 0, 0, 9], SANDBOX_IP),
        Reason::SpoofedMac,
    );
}

#[test]
fn ipv6_is_denied_and_counted() {
    let n = setup("ipv6");
    let mut f = Pkt::tcp_syn(ALLOWED_IP, 443).frame();
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f.truncate(ETH);
    let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&v6);
    assert_drop(&n, &f, Reason::Ipv6Denied);
}

#[test]
fn unknown_veth_is_counted_as_unknown_job() {
    let n = setup("unknownjob");
    assert!(n.t1().detach_job(VETH).expect("detach"));
    let out = n.run_sandbox(&Pkt::tcp_syn(ALLOWED_IP, 443).frame());
    assert_eq!(out.retval, TC_ACT_SHOT);
    let c = n.t1().unattributed_counters().expect("counters");
    assert_eq!(c.from_sandbox.dropped(Reason::UnknownJob).packets, 1);
}

#[test]
fn denied_syn_is_answered_with_an_exact_rst() {
    let n = setup("rst");
    let p = Pkt {
        seq: 0xfffffff0,
        ..Pkt::tcp_syn(OTHER_IP, 443)
    };
    let out = n.run_sandbox(&p.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(
        (dbg.kind, dbg.ifindex),
        (1, VETH),
        "RST goes back out of the sandbox veth"
    );
    let rst = Pkt {
        src_mac: HOST_MAC,
        dst_mac: SANDBOX_MAC,
        src: OTHER_IP,
        dst: SANDBOX_IP,
        proto: 6,
        sport: 443,
        dport: 40000,
        tcp_flags: 0x14,
        seq: 0,
        ack: 0,
        payload: vec![],
        frag_off: 0,
        ip_options: vec![],
    };
    let mut want = rst.frame();
    // IP id 0; ack = seq + 1 (wraps); window 0.
    want[ETH + 4..ETH + 6].copy_from_slice(&[0, 0]);
    want[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = csum(&want[ETH..ETH + 20], 0);
    want[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    let t = ETH + 20;
    want[t + 8..t + 12].copy_from_slice(&0xfffffff1u32.to_be_bytes());
    want[t + 14..t + 16].copy_from_slice(&[0, 0]);
    want[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let c = csum(&want[t..t + 20], pseudo(OTHER_IP, SANDBOX_IP, 6, 20));
    want[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(out.data, want);
    assert!(ipv4_header_ok(&out.data[ETH..]) && l4_ok(&out.data[ETH..]));
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
}

/// A refused packet that is answered: counted under `r` and sent back into the sandbox.
fn assert_answered(n: &Node, frame: &[u8], r: Reason) -> Vec<u8> {
    let before = sandbox_drops(n, r);
    let out = n.run_sandbox(frame);
    assert_eq!(out.retval, TC_ACT_REDIRECT, "expected an answer for {r}");
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!((dbg.kind, dbg.ifindex), (1, VETH), "back into the sandbox");
    assert_eq!(sandbox_drops(n, r), before + 1, "counter of {r}");
    out.data
}

#[test]
fn denied_udp_is_answered_and_non_syn_tcp_is_dropped_without_reply() {
    let n = setup("denyudp");
    let icmp = assert_answered(
        &n,
        &Pkt::udp(OTHER_IP, 4000, &[0; 8]).frame(),
        Reason::DestinationDenied,
    );
    assert_eq!((icmp[ETH + 9], icmp[ETH + 20], icmp[ETH + 21]), (1, 3, 13));
    let ack = Pkt {
        tcp_flags: 0x10,
        ..Pkt::tcp_syn(OTHER_IP, 443)
    };
    assert_drop(&n, &ack.frame(), Reason::DestinationDenied);
}

#[test]
fn allowed_destination_on_a_wrong_port_or_protocol_is_port_denied() {
    let n = setup("portdeny");
    assert_drop(
        &n,
        &Pkt {
            tcp_flags: 0x10,
            ..Pkt::tcp_syn(ALLOWED_IP, 80)
        }
        .frame(),
        Reason::PortDenied,
    );
    let icmp = assert_answered(
        &n,
        &Pkt::udp(ALLOWED_IP, 443, &[0; 8]).frame(),
        Reason::PortDenied,
    );
    assert_eq!(icmp[ETH + 21], 3, "port unreachable");
    assert_eq!(
        n.run_sandbox(&Pkt::udp(ALLOWED_IP, 4999, &[0; 8]).frame())
            .retval,
        TC_ACT_REDIRECT
    );
}

#[test]
fn always_denied_ranges_need_allow_private() {
    let n = setup("private");
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    assert_drop(
        &n,
        &Pkt {
            tcp_flags: 0x10,
            ..Pkt::tcp_syn(metadata, 80)
        }
        .frame(),
        Reason::AlwaysDenied,
    );
    let private = Ipv4Addr::new(10, 1, 2, 3);
    let net = "10.0.0.0/8".parse().expect("net");
    n.t1()
        .allow_cidr(JOB_KEY, net, &[PortRule::all(RuleProtocol::Any)], false)
        .expect("cidr");
    let p = Pkt {
        tcp_flags: 0x10,
        ..Pkt::tcp_syn(private, 443)
    };
    assert_drop(&n, &p.frame(), Reason::AlwaysDenied);
    // A DNS answer pointing at a private address does not open it either.
    n.t1()
        .allow_ip(JOB_KEY, private, &[PortRule::all(RuleProtocol::Any)], None)
        .expect("ip");
    assert_drop(&n, &p.frame(), Reason::AlwaysDenied);
    n.t1()
        .allow_cidr(JOB_KEY, net, &[PortRule::all(RuleProtocol::Any)], true)
        .expect("cidr");
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
}

#[test]
fn dns_learned_address_admits_new_connections_until_it_expires_and_never_cuts_established_ones() {
    let n = setup("exact");
    let rules = [PortRule::port(RuleProtocol::Tcp, 443)];
    let p = Pkt::tcp_syn(OTHER_IP, 443);
    // Expiries are kept in whole seconds, rounded up: 1 s from now ends within 2 s.
    n.t1()
        .allow_ip(JOB_KEY, OTHER_IP, &rules, Some(Duration::from_secs(1)))
        .expect("ip");
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    std::thread::sleep(Duration::from_millis(2100));
    let p2 = Pkt {
        sport: 40001,
        ..p.clone()
    };
    assert_eq!(
        n.run_sandbox(&p2.frame()).retval,
        TC_ACT_REDIRECT,
        "denied SYN gets a RST"
    );
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(dbg.kind, 1, "the RST goes back into the sandbox");
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
    // The connection opened before the expiry is not cut by it ...
    let ack = Pkt {
        tcp_flags: 0x10,
        payload: vec![1; 100],
        ..p.clone()
    };
    assert_eq!(n.run_sandbox(&ack.frame()).retval, TC_ACT_REDIRECT);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(dbg.kind, 2, "an established flow still goes to its proxy");
    // ... but a revocation cuts it.
    n.t1().revoke_ip(JOB_KEY, OTHER_IP).expect("revoke");
    assert_drop(&n, &ack.frame(), Reason::DestinationDenied);
}

#[test]
fn rules_of_another_job_do_not_apply() {
    let n = setup("otherjob");
    n.t1()
        .allow_ip(
            JobKey(JOB_KEY.get() + 1),
            OTHER_IP,
            &[PortRule::all(RuleProtocol::Any)],
            None,
        )
        .expect("ip");
    let p = Pkt {
        tcp_flags: 0x10,
        ..Pkt::tcp_syn(OTHER_IP, 443)
    };
    assert_drop(&n, &p.frame(), Reason::DestinationDenied);
}

#[test]
fn dns_to_any_resolver_is_rewritten_to_the_job_stub() {
    let n = setup("dns");
    let q = Pkt::udp(
        OTHER_IP,
        53,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
    );
    let out = n.run_sandbox(&q.frame());
    assert_eq!(out.retval, TC_ACT_OK, "delivered to the host stack");
    let want = Pkt {
        dst: GATEWAY_IP,
        dport: 5353,
        ..q.clone()
    }
    .frame();
    let mut want = want;
    // The IP id and everything else are kept; only destination and checksums change.
    assert_eq!(out.data.len(), want.len());
    assert!(ipv4_header_ok(&out.data[ETH..]) && l4_ok(&out.data[ETH..]));
    want[ETH + 10..ETH + 12].copy_from_slice(&out.data[ETH + 10..ETH + 12]);
    assert_eq!(out.data, want);

    let dot = Pkt::tcp_syn(OTHER_IP, 853);
    let out = n.run_sandbox(&dot.frame());
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(&out.data[ETH + 16..ETH + 20], &GATEWAY_IP.octets());
    assert_eq!(&out.data[ETH + 22..ETH + 24], &5353u16.to_be_bytes());
    assert!(ipv4_header_ok(&out.data[ETH..]) && l4_ok(&out.data[ETH..]));
    assert_eq!(
        n.t1()
            .counters(JOB_KEY)
            .expect("c")
            .from_sandbox
            .forwarded
            .packets,
        2
    );
}

#[test]
fn packets_to_the_overlay_port_or_the_node_are_dropped() {
    let n = setup("overlay");
    n.t1()
        .allow_cidr(
            JOB_KEY,
            "192.0.2.0/24".parse().expect("net"),
            &[PortRule::all(RuleProtocol::Any)],
            false,
        )
        .expect("cidr");
    assert_drop(
        &n,
        &Pkt::udp(ALLOWED_IP, 6081, &[0; 8]).frame(),
        Reason::OverlayTarget,
    );
    assert_drop(
        &n,
        &Pkt::tcp_syn(NODE_IP, 443).frame(),
        Reason::OverlayTarget,
    );
}

#[test]
fn encapsulated_size_is_checked_against_the_uplink_mtu() {
    let n = setup("mtu");
    // 1444 bytes of IPv4 + 56 = 1500: fits exactly.
    let fits = Pkt::udp(ALLOWED_IP, 4000, &vec![7; 1444 - 28]);
    assert_eq!(n.run_sandbox(&fits.frame()).retval, TC_ACT_REDIRECT);
    let big = Pkt::udp(ALLOWED_IP, 4000, &vec![7; 1445 - 28]);
    assert_drop(&n, &big.frame(), Reason::MtuExceeded);
}

#[test]
fn edt_spaces_packets_at_the_configured_rate() {
    let n = setup_with(
        "edt",
        |c| c.uplink_mtu = 9000,
        |j| j.egress = Some(Bps::new(10_000_000).expect("a rate is not zero")),
    );
    let before = snas_bpf::mono_now().expect("clock").as_nanos() as u64;
    let mut stamps = Vec::new();
    for _ in 0..8 {
        // 1500-byte IPv4 packets at 10 Mbit/s: 1.2 ms apart.
        let p = Pkt::udp(ALLOWED_IP, 4000, &vec![0; 1500 - 28]);
        let out = n.run_sandbox(&p.frame());
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        stamps.push(out.tstamp);
    }
    let after = snas_bpf::mono_now().expect("clock").as_nanos() as u64;
    assert!(
        stamps[0] >= before && stamps[0] <= after,
        "the first packet of an idle job departs at once"
    );
    for w in stamps.windows(2) {
        assert_eq!(w[1] - w[0], 1_200_000);
    }
}

#[test]
fn edt_drops_beyond_the_horizon_without_advancing() {
    let n = setup_with(
        "horizon",
        |c| c.uplink_mtu = 9000,
        // 100 kbit/s: a 1500-byte packet is 120 ms; a 200 ms horizon holds the departures
        // now and now + 120 ms but not now + 240 ms.
        |j| {
            j.egress = Some(Bps::new(100_000).expect("a rate is not zero"));
            j.horizon = Some(Duration::from_millis(200));
        },
    );
    let p = Pkt::udp(ALLOWED_IP, 4000, &vec![0; 1500 - 28]);
    let first = n.run_sandbox(&p.frame());
    assert_eq!(first.retval, TC_ACT_REDIRECT);
    let second = n.run_sandbox(&p.frame());
    assert_eq!(second.retval, TC_ACT_REDIRECT);
    assert_eq!(second.tstamp - first.tstamp, 120_000_000);
    assert_drop(&n, &p.frame(), Reason::PacingHorizon);
    assert_drop(&n, &p.frame(), Reason::PacingHorizon);
    // 60 ms later now + 240 ms is within the horizon again — and it is still the next
    // departure: the drops did not advance t_last (else it would be 480 ms).
    std::thread::sleep(Duration::from_millis(60));
    let small = Pkt::udp(ALLOWED_IP, 4000, &[0; 2]);
    let out = n.run_sandbox(&small.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(out.tstamp - first.tstamp, 240_000_000);
}

#[test]
fn horizon_override_of_a_job_applies() {
    let n = setup_with(
        "horizon2",
        |c| c.uplink_mtu = 9000,
        |j| {
            j.egress = Some(Bps::new(1_000_000).expect("a rate is not zero"));
            j.horizon = Some(Duration::from_millis(5));
        },
    );
    // 1500 bytes at 1 Mbit/s = 12 ms: the first leaves at once, the second would wait 12 ms,
    // beyond the job's 5 ms horizon (the node default, 20 ms, would hold it).
    let p = Pkt::udp(ALLOWED_IP, 4000, &vec![0; 1500 - 28]);
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    assert_drop(&n, &p.frame(), Reason::PacingHorizon);
}

#[test]
fn new_connection_rate_is_limited_per_job() {
    let n = setup_with(
        "connrate",
        |_| {},
        |j| {
            j.new_conn_per_sec = 1;
            j.new_conn_burst = 2;
        },
    );
    let syn = |sport| {
        Pkt {
            sport,
            ..Pkt::tcp_syn(ALLOWED_IP, 443)
        }
        .frame()
    };
    assert_eq!(n.run_sandbox(&syn(1)).retval, TC_ACT_REDIRECT);
    assert_eq!(n.run_sandbox(&syn(2)).retval, TC_ACT_REDIRECT);
    assert_drop(&n, &syn(3), Reason::NewConnectionRate);
    // Packets of admitted flows are not charged.
    assert_eq!(n.run_sandbox(&syn(1)).retval, TC_ACT_REDIRECT);
}

#[test]
fn max_connections_caps_new_flows_and_a_rst_frees_a_slot() {
    let n = setup_with("maxconn", |_| {}, |j| j.max_connections = 2);
    let syn = |sport| Pkt {
        sport,
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    assert_eq!(n.run_sandbox(&syn(1).frame()).retval, TC_ACT_REDIRECT);
    assert_eq!(n.run_sandbox(&syn(2).frame()).retval, TC_ACT_REDIRECT);
    assert_drop(&n, &syn(3).frame(), Reason::ConnectionLimit);
    assert_eq!(n.t1().live_flows(VETH).expect("flows"), 2);
    let rst = Pkt {
        tcp_flags: 0x04,
        ..syn(1)
    };
    assert_eq!(n.run_sandbox(&rst.frame()).retval, TC_ACT_REDIRECT);
    assert_eq!(n.t1().live_flows(VETH).expect("flows"), 1);
    assert_eq!(n.run_sandbox(&syn(3).frame()).retval, TC_ACT_REDIRECT);
}

#[test]
fn denials_and_new_flows_are_audited_with_a_rate_limit() {
    let n = setup_with("audit", |c| c.audit_per_sec = 3, |_| {});
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    let reader = n
        .t1()
        .audit_reader(move |e| sink.borrow_mut().push(e))
        .expect("reader");
    assert_eq!(
        n.run_sandbox(&Pkt::tcp_syn(ALLOWED_IP, 443).frame()).retval,
        TC_ACT_REDIRECT
    );
    for _ in 0..5 {
        n.run_sandbox(&Pkt::udp(OTHER_IP, 4000, &[0; 4]).frame());
    }
    reader.consume().expect("consume");
    let ev = events.borrow();
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!(ev[0].kind, AuditKind::NewFlow);
    assert_eq!(ev[0].dst, "203.0.113.7:443".parse().expect("addr"));
    assert_eq!(ev[0].src, "10.88.0.2:40000".parse().expect("addr"));
    assert_eq!(ev[1].kind, AuditKind::Deny(Reason::DestinationDenied));
    assert_eq!(ev[1].proto, 17);
    assert_eq!(ev[1].job_key, snas_wire::JobKey(JOB_KEY.get()));
    assert_eq!(n.t1().audit_suppressed(VETH).expect("suppressed"), 3);
}

#[test]
fn counters_are_per_job_and_reason_and_removed_on_detach() {
    let n = setup("counters");
    let p = Pkt {
        src: Ipv4Addr::new(10, 88, 0, 3),
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    n.run_sandbox(&p.frame());
    n.run_sandbox(&p.frame());
    let c = n.t1().counters(JOB_KEY).expect("counters");
    let frame_len = p.frame().len() as u64;
    assert_eq!(c.from_sandbox.dropped(Reason::SpoofedSource).packets, 2);
    assert_eq!(
        c.from_sandbox.dropped(Reason::SpoofedSource).bytes,
        2 * frame_len
    );
    assert!(n
        .t1()
        .counters(JobKey(JOB_KEY.get() + 1))
        .expect("counters")
        .from_sandbox
        .drops
        .is_empty());
    assert!(n.t1().detach_job(VETH).expect("detach"));
    let after = n.t1().counters(JOB_KEY).expect("counters");
    assert!(after.from_sandbox.drops.is_empty());
    assert!(!n.t1().detach_job(VETH).expect("detach again is a no-op"));
    assert!(!n.t1().detach_job_by_key(JOB_KEY).expect("by key too"));
}

#[test]
fn a_reused_veth_starts_fresh_and_the_old_key_detaches_without_harm() {
    let n = setup_with("reuse", |_| {}, |j| j.max_connections = 1);
    assert_eq!(
        n.run_sandbox(&Pkt::tcp_syn(ALLOWED_IP, 443).frame()).retval,
        TC_ACT_REDIRECT
    );
    assert_eq!(n.t1().live_flows(VETH).expect("flows"), 1);
    // The old job's veth is gone and its ifindex now belongs to a new job.
    let mut j2 = job();
    j2.job_key = JobKey(JOB_KEY.get() + 1);
    j2.max_connections = 1;
    n.t1().configure_job(&j2).expect("configure");
    assert_eq!(
        n.t1().live_flows(VETH).expect("flows"),
        0,
        "no state inherited"
    );
    let net = "203.0.113.0/24".parse().expect("net");
    n.t1()
        .allow_cidr(
            JobKey(JOB_KEY.get() + 1),
            net,
            &[PortRule::port(RuleProtocol::Tcp, 443)],
            false,
        )
        .expect("cidr");
    // The old key no longer has a veth; detaching it must not touch the new job.
    assert!(!n.t1().detach_job_by_key(JOB_KEY).expect("old key"));
    assert_eq!(
        n.t1().veth_of(JobKey(JOB_KEY.get() + 1)).expect("veth"),
        Some(VETH),
        "new job untouched"
    );
    let syn = Pkt::tcp_syn(ALLOWED_IP, 443).frame();
    assert_eq!(n.run_sandbox(&syn).retval, TC_ACT_REDIRECT);
}

#[test]
fn reopening_from_pins_keeps_state_and_programs() {
    let n = setup("reopen");
    let p = Pkt::tcp_syn(ALLOWED_IP, 443);
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    let again = snas_bpf::Tier1::open_pinned(&n.dir).expect("reopen");
    assert_eq!(
        again
            .counters(JOB_KEY)
            .expect("c")
            .from_sandbox
            .forwarded
            .packets,
        1
    );
    let out = snas_bpf::testing::run(
        again.sandbox_prog(),
        &Pkt { sport: 2, ..p }.frame(),
        &snas_bpf::testing::SkbCtx {
            ifindex: VETH,
            ..Default::default()
        },
    )
    .expect("run");
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(
        again
            .counters(JOB_KEY)
            .expect("c")
            .from_sandbox
            .forwarded
            .packets,
        2
    );
}

#[test]
fn stub_answers_to_captured_queries_carry_the_resolver_address_again() {
    let n = setup("dnsreply");
    for (proto, q) in [
        (17, Pkt::udp(OTHER_IP, 53, b"\x12\x34\x01\x00")),
        (
            6,
            Pkt {
                tcp_flags: 0x18,
                payload: b"\x00\x02ab".to_vec(),
                ..Pkt::tcp_syn(OTHER_IP, 853)
            },
        ),
    ] {
        assert_eq!(n.run_sandbox(&q.frame()).retval, TC_ACT_OK);
        let answer = Pkt {
            src_mac: HOST_MAC,
            dst_mac: SANDBOX_MAC,
            src: GATEWAY_IP,
            dst: SANDBOX_IP,
            proto,
            sport: 5353,
            dport: q.sport,
            tcp_flags: if proto == 6 { 0x18 } else { 0 },
            payload: b"\x12\x34\x81\x80".to_vec(),
            ..q.clone()
        };
        let out = n.run_sandbox_egress(&answer.frame());
        assert_eq!(out.retval, TC_ACT_OK);
        let mut want = Pkt {
            src: OTHER_IP,
            sport: q.dport,
            ..answer.clone()
        }
        .frame();
        assert!(
            ipv4_header_ok(&out.data[ETH..]) && l4_ok(&out.data[ETH..]),
            "proto {proto}"
        );
        want[ETH + 10..ETH + 12].copy_from_slice(&out.data[ETH + 10..ETH + 12]);
        assert_eq!(out.data, want, "proto {proto}");
    }
    // Other traffic into the sandbox is untouched.
    let other = Pkt {
        src: GATEWAY_IP,
        dst: SANDBOX_IP,
        sport: 5353,
        dport: 999,
        ..Pkt::udp(SANDBOX_IP, 999, &[1])
    }
    .frame();
    assert_eq!(n.run_sandbox_egress(&other).data, other);
}

#[test]
fn a_draining_proxy_keeps_its_flows_but_takes_no_new_ones() {
    let n = setup("drain");
    let syn = |sport| Pkt {
        sport,
        ..Pkt::tcp_syn(ALLOWED_IP, 443)
    };
    let proxy_of = |p: &Pkt| {
        assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
        n.t1()
            .last_redirect()
            .expect("debug")
            .expect("recorded")
            .proxy
    };
    // One established flow per proxy (or as many as the first ports give).
    let mut pinned = std::collections::BTreeMap::new();
    for sport in 1..200 {
        let p = syn(sport);
        pinned.entry(proxy_of(&p)).or_insert(p);
    }
    let (&drained, flow) = pinned.iter().next().expect("some flow");
    let mut px = proxies(3);
    px[drained as usize].draining = true;
    n.t1().set_proxies(&px).expect("proxies");
    let ack = Pkt {
        tcp_flags: 0x10,
        ..flow.clone()
    };
    assert_eq!(
        proxy_of(&ack),
        drained,
        "established flow stays on the draining proxy"
    );
    for sport in 1000..1200 {
        assert_ne!(
            proxy_of(&syn(sport)),
            drained,
            "no new flow on a draining proxy"
        );
    }
}
