//! IPv6 through the tier-1 programs (BPF_PROG_TEST_RUN, root; fails otherwise): allowed only
//! for jobs with IPv6 rules and a sandbox IPv6 address, through the IPv6 maps, encapsulated
//! with GENEVE protocol 0x86DD in the same IPv4 underlay.

mod common;

use std::net::Ipv6Addr;
use std::time::{Duration, SystemTime};

use common::*;
use snas_bpf::testing::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{PortRule, ProxyEntry, RuleProtocol};
use snas_wire::Reason;

const SANDBOX6: Ipv6Addr = Ipv6Addr::new(0xfd53, 0x4e41, 0, 0, 0, 0, 0, 2);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 9);

fn setup(name: &str, ipv6_rules: bool) -> Node {
    let n = node_with_job(
        name,
        |_| {},
        |j| {
            j.ipv6_rules = ipv6_rules;
            j.sandbox_ip6 = Some(SANDBOX6);
        },
        &proxies(1),
    );
    n.t1()
        .allow_cidr6(
            JOB_KEY,
            "2001:db8::/48".parse().expect("net"),
            &tcp_443_and_udp_4000s(),
            false,
        )
        .expect("cidr6");
    n
}

#[derive(Clone)]
struct P6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    ack: u32,
    payload: Vec<u8>,
    src_mac: [u8; 6],
}

impl P6 {
    fn tcp_syn(dst: Ipv6Addr, dport: u16) -> P6 {
        P6 {
            src: SANDBOX6,
            dst,
            next: 6,
            sport: 40000,
            dport,
            flags: 0x02,
            ack: 0,
            payload: vec![],
            src_mac: SANDBOX_MAC,
        }
    }

    fn udp(dst: Ipv6Addr, dport: u16, payload: &[u8]) -> P6 {
        P6 {
            next: 17,
            flags: 0,
            payload: payload.to_vec(),
            ..P6::tcp_syn(dst, dport)
        }
    }

    fn l4(&self) -> Vec<u8> {
        let mut l = match self.next {
            6 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.sport.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[4..8].copy_from_slice(&1000u32.to_be_bytes());
                t[8..12].copy_from_slice(&self.ack.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = self.flags;
                t
            }
            17 => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.sport.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u
            }
            _ => vec![],
        };
        l.extend_from_slice(&self.payload);
        let mut sum = 0u32;
        for a in [self.src.octets(), self.dst.octets()] {
            for w in a.chunks(2) {
                sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        sum += l.len() as u32 + u32::from(self.next);
        let c = csum(&l, sum);
        match self.next {
            6 => l[16..18].copy_from_slice(&c.to_be_bytes()),
            17 => l[6..8].copy_from_slice(&c.to_be_bytes()),
            _ => {}
        }
        l
    }

    fn ip(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[self.next, 64]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&l4);
        ip
    }

    fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&self.ip());
        f
    }
}

/// The C flow hash over IPv6 (bpf/lib/maglev.h flow_hash6).
fn flow_hash6(p: &P6) -> u32 {
    fn fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let mut h = 0x534e_4136u32;
    for a in [p.src.octets(), p.dst.octets()] {
        for w in a.chunks(4) {
            h = fmix32(h ^ u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    h = fmix32(h ^ ((u32::from(p.sport) << 16) | u32::from(p.dport)));
    fmix32(h ^ u32::from(p.next))
}

#[test]
fn ipv6_is_denied_unless_the_job_has_ipv6_rules() {
    let n = setup("v6norules", false);
    assert_drop(&n, &P6::tcp_syn(ALLOWED6, 443).frame(), Reason::Ipv6Denied);
}

#[test]
fn allowed_ipv6_is_encapsulated_with_protocol_86dd() {
    let n = setup("v6encap", true);
    let p = P6::tcp_syn(ALLOWED6, 443);
    let frame = p.frame();
    let out = n.run_sandbox(&frame);
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let inner = p.ip();
    let mut outer = expected_outer(NODE_IP, PROXY_IPS[0], flow_hash6(&p), inner.len(), JOB_KEY);
    outer[30..32].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(&out.data[..12], &frame[..12]);
    assert_eq!(
        &out.data[12..14],
        &0x0800u16.to_be_bytes(),
        "outer frame is IPv4"
    );
    assert_eq!(&out.data[ETH..ETH + 56], &outer[..]);
    assert!(ipv4_header_ok(&out.data[ETH..]));
    assert_eq!(&out.data[ETH + 56..], &inner[..]);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!((dbg.kind, dbg.flow_hash), (2, flow_hash6(&p)));
}

#[test]
fn ipv6_spoofed_source_is_dropped() {
    let n = setup("v6spoof", true);
    let p = P6 {
        src: Ipv6Addr::new(0xfd53, 0x4e41, 0, 0, 0, 0, 0, 3),
        ..P6::tcp_syn(ALLOWED6, 443)
    };
    assert_drop(&n, &p.frame(), Reason::SpoofedSource);
}

#[test]
fn ipv6_extension_and_fragment_headers_are_dropped() {
    let n = setup("v6ext", true);
    for (next, reason) in [
        (0u8, Reason::IpOptions),
        (60, Reason::IpOptions),
        (43, Reason::IpOptions),
        (44, Reason::Fragment),
    ] {
        let p = P6 {
            next,
            payload: vec![6, 0, 0, 0, 0, 0, 0, 0],
            ..P6::tcp_syn(ALLOWED6, 443)
        };
        assert_drop(&n, &p.frame(), reason);
    }
}

#[test]
fn ipv6_always_denied_ranges_need_allow_private() {
    let n = setup("v6private", true);
    let all: ipnet::Ipv6Net = "::/0".parse().expect("net");
    n.t1()
        .allow_cidr6(JOB_KEY, all, &[PortRule::all(RuleProtocol::Any)], false)
        .expect("cidr6");
    for dst in [
        "fe80::1",
        "::1",
        "::ffff:10.0.0.1",
        "::ffff:203.0.113.7",
        "fd00::1",
        "ff02::1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
    ] {
        let p = P6 {
            flags: 0x10,
            ..P6::tcp_syn(dst.parse().expect("addr"), 443)
        };
        assert_drop(&n, &p.frame(), Reason::AlwaysDenied);
    }
    // Outside 2001:db8::/48 the ::/0 rule allows public addresses.
    assert_eq!(
        n.run_sandbox(&P6::tcp_syn(OTHER6, 8443).frame()).retval,
        TC_ACT_REDIRECT
    );
    let ula: ipnet::Ipv6Net = "fd00::/8".parse().expect("net");
    n.t1()
        .allow_cidr6(JOB_KEY, ula, &[PortRule::all(RuleProtocol::Any)], true)
        .expect("cidr6");
    let p = P6::tcp_syn("fd00::1".parse().expect("addr"), 443);
    assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
}

#[test]
fn ipv6_policy_checks_destination_and_port() {
    let n = setup("v6policy", true);
    assert_drop(
        &n,
        &P6 {
            flags: 0x10,
            ..P6::tcp_syn(OTHER6, 443)
        }
        .frame(),
        Reason::DestinationDenied,
    );
    assert_drop(
        &n,
        &P6 {
            flags: 0x10,
            ..P6::tcp_syn(ALLOWED6, 80)
        }
        .frame(),
        Reason::PortDenied,
    );
    assert_eq!(
        n.run_sandbox(&P6::udp(ALLOWED6, 4001, &[1; 8]).frame())
            .retval,
        TC_ACT_REDIRECT
    );
    n.t1()
        .allow_ip6(
            JOB_KEY,
            OTHER6,
            &[PortRule::port(RuleProtocol::Tcp, 443)],
            None,
        )
        .expect("ip6");
    assert_eq!(
        n.run_sandbox(&P6::tcp_syn(OTHER6, 443).frame()).retval,
        TC_ACT_REDIRECT
    );
    n.t1().revoke_ip6(JOB_KEY, OTHER6).expect("revoke");
    assert_drop(
        &n,
        &P6 {
            sport: 1,
            flags: 0x10,
            ..P6::tcp_syn(OTHER6, 443)
        }
        .frame(),
        Reason::DestinationDenied,
    );
}

#[test]
fn neighbour_discovery_goes_to_the_host_and_dns_over_ipv6_is_denied() {
    let n = setup("v6nd", true);
    let ns = P6 {
        next: 58,
        payload: vec![135, 0, 0, 0, 0, 0, 0, 0],
        dst: "ff02::1:ff00:1".parse().expect("addr"),
        ..P6::tcp_syn(ALLOWED6, 0)
    };
    let out = n.run_sandbox(&ns.frame());
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data, ns.frame());
    let echo = P6 {
        payload: vec![128, 0, 0, 0, 0, 0, 0, 0],
        ..ns.clone()
    };
    assert_eq!(n.run_sandbox(&echo.frame()).retval, TC_ACT_SHOT);
    // DNS over IPv6 is refused like any denied UDP: counted and answered with ICMPv6.
    let out = n.run_sandbox(&P6::udp(ALLOWED6, 53, &[0; 12]).frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(out.data[ETH + 6], 58, "an ICMPv6 answer");
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
}

#[test]
fn ipv6_replies_are_decapsulated_for_jobs_with_ipv6_rules_only() {
    let n = setup("v6decap", true);
    let inner = P6 {
        src: ALLOWED6,
        dst: SANDBOX6,
        sport: 443,
        dport: 40000,
        flags: 0x12,
        ..P6::tcp_syn(ALLOWED6, 443)
    }
    .ip();
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0x0a, 1, 2, 0, 0, 0, 0x0a, 2, 0x08, 0x00]);
    let mut outer = expected_outer(PROXY_IPS[0], NODE_IP, 7, inner.len(), JOB_KEY);
    outer[30..32].copy_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&outer);
    f.extend_from_slice(&inner);
    let out = n.run_uplink(&f);
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let mut want = Vec::new();
    want.extend_from_slice(&SANDBOX_MAC);
    want.extend_from_slice(&HOST_MAC);
    want.extend_from_slice(&0x86ddu16.to_be_bytes());
    want.extend_from_slice(&inner);
    assert_eq!(out.data, want);

    // The same job without IPv6 rules gets nothing.
    let mut j = job();
    j.sandbox_ip6 = Some(SANDBOX6);
    n.t1().configure_job(&j).expect("job");
    assert_eq!(n.run_uplink(&f).retval, TC_ACT_SHOT);
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.dropped(Reason::Ipv6Denied).packets, 1);
}

#[test]
fn denied_ipv6_syn_is_answered_with_an_exact_rst() {
    let n = setup("v6rst", true);
    let p = P6::tcp_syn(OTHER6, 443);
    let out = n.run_sandbox(&p.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!((dbg.kind, dbg.ifindex), (1, VETH));
    let mut want = Vec::new();
    want.extend_from_slice(&SANDBOX_MAC);
    want.extend_from_slice(&HOST_MAC);
    want.extend_from_slice(&0x86ddu16.to_be_bytes());
    want.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    want.extend_from_slice(&OTHER6.octets());
    want.extend_from_slice(&SANDBOX6.octets());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&443u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[8..12].copy_from_slice(&1001u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x14;
    let mut sum = 0u32;
    for a in [OTHER6.octets(), SANDBOX6.octets()] {
        for w in a.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    let c = csum(&tcp, sum + 20 + 6);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    want.extend_from_slice(&tcp);
    assert_eq!(out.data, want);
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
    // DNS over TCP/IPv6 fails fast too.
    let dns = n.run_sandbox(&P6::tcp_syn(ALLOWED6, 53).frame());
    assert_eq!(dns.retval, TC_ACT_REDIRECT);
    assert_eq!(dns.data.len(), 74);
}

impl P6 {
    /// The far side's packet of this flow with `flags`.
    fn reply(&self, flags: u8) -> P6 {
        P6 {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            flags,
            payload: vec![],
            ..self.clone()
        }
    }
}

/// `inner` (IPv6) inside GENEVE from the first proxy, as the uplink receives it.
fn geneve6(inner: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0x0a, 1, 2, 0, 0, 0, 0x0a, 2, 0x08, 0x00]);
    let mut outer = expected_outer(PROXY_IPS[0], NODE_IP, 7, inner.len(), JOB_KEY);
    outer[30..32].copy_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&outer);
    f.extend_from_slice(inner);
    f
}

fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for a in [src.octets(), dst.octets()] {
        for w in a.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    sum + len as u32 + u32::from(next)
}

/// The ICMPv6 destination unreachable tier 1 must answer `p` with.
fn icmp6_for(p: &P6, code: u8) -> Vec<u8> {
    let quote = &p.ip()[..48];
    let mut icmp = vec![1, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quote);
    let c = csum(&icmp, pseudo6(p.dst, p.src, 58, icmp.len()));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&p.dst.octets());
    f.extend_from_slice(&p.src.octets());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn denied_ipv6_udp_is_answered_with_an_exact_icmpv6_unreachable() {
    let n = setup("v6icmp", true);
    let denied = P6::udp(OTHER6, 4000, b"hello");
    let out = n.run_sandbox(&denied.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(
        out.data,
        icmp6_for(&denied, 1),
        "administratively prohibited"
    );
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!((dbg.kind, dbg.ifindex), (1, VETH));
    let wrong_port = P6::udp(ALLOWED6, 5000, &[7; 40]);
    let out = n.run_sandbox(&wrong_port.frame());
    assert_eq!(out.data, icmp6_for(&wrong_port, 4), "port unreachable");
    assert_eq!(sandbox_drops(&n, Reason::DestinationDenied), 1);
    assert_eq!(sandbox_drops(&n, Reason::PortDenied), 1);
}

#[test]
fn ipv6_infrastructure_is_refused_whatever_the_rules_say() {
    let n = setup("v6infra", true);
    let all: ipnet::Ipv6Net = "::/0".parse().expect("net");
    n.t1()
        .allow_cidr6(JOB_KEY, all, &[PortRule::all(RuleProtocol::Any)], true)
        .expect("cidr6");
    n.t1()
        .set_infrastructure(&["2001:db8:ffff::/48".parse().expect("net")])
        .expect("infra");
    let syn = n.run_sandbox(&P6::tcp_syn(OTHER6, 9090).frame());
    assert_eq!((syn.retval, syn.data.len()), (TC_ACT_REDIRECT, 74), "a RST");
    let udp = P6::udp(OTHER6, 9090, b"x");
    assert_eq!(n.run_sandbox(&udp.frame()).data, icmp6_for(&udp, 1));
    assert_eq!(sandbox_drops(&n, Reason::InfrastructureDenied), 2);
    let outside = P6::tcp_syn("2001:db8:fffe::1".parse().expect("addr"), 9090);
    assert_eq!(n.run_sandbox(&outside.frame()).retval, TC_ACT_REDIRECT);
    let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
    assert_eq!(dbg.kind, 2, "to a proxy");
}

#[test]
fn an_expired_ipv6_job_gets_a_rst_for_any_segment_and_icmpv6_for_udp() {
    require_root("v6expired");
    let n = load(&node_config("v6expired"));
    let mut j = job();
    j.ipv6_rules = true;
    j.sandbox_ip6 = Some(SANDBOX6);
    j.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
    n.t1().configure_job(&j).expect("job");
    n.t1()
        .set_proxies(&[ProxyEntry::active(PROXY_IPS[0])])
        .expect("proxies");
    n.t1()
        .allow_cidr6(
            JOB_KEY,
            "2001:db8::/48".parse().expect("net"),
            &[PortRule::all(RuleProtocol::Any)],
            false,
        )
        .expect("cidr6");
    let data = P6 {
        flags: 0x18,
        ack: 0x0102_0304,
        payload: vec![9; 30],
        ..P6::tcp_syn(ALLOWED6, 443)
    };
    let out = n.run_sandbox(&data.frame());
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let tcp = &out.data[ETH + 40..];
    assert_eq!(
        (&tcp[4..8], &tcp[8..12], tcp[13]),
        (&[1u8, 2, 3, 4][..], &[0u8; 4][..], 0x04),
        "<SEQ=SEG.ACK><CTL=RST>"
    );
    assert_eq!(csum(tcp, pseudo6(ALLOWED6, SANDBOX6, 6, 20)), 0);
    let udp = P6::udp(ALLOWED6, 4000, b"x");
    assert_eq!(n.run_sandbox(&udp.frame()).data, icmp6_for(&udp, 1));
    assert_eq!(sandbox_drops(&n, Reason::PolicyExpired), 2);
    // Neighbour discovery still reaches the host.
    let ns = P6 {
        next: 58,
        payload: vec![135, 0, 0, 0, 0, 0, 0, 0],
        dst: "ff02::1:ff00:1".parse().expect("addr"),
        ..P6::tcp_syn(ALLOWED6, 0)
    };
    assert_eq!(n.run_sandbox(&ns.frame()).retval, TC_ACT_OK);
}

#[test]
fn ipv6_connections_that_close_both_ways_give_their_slot_back() {
    require_root("v6close");
    let n = load(&node_config("v6close"));
    let mut j = job();
    j.ipv6_rules = true;
    j.sandbox_ip6 = Some(SANDBOX6);
    j.max_connections = 1;
    n.t1().configure_job(&j).expect("job");
    n.t1()
        .set_proxies(&[ProxyEntry::active(PROXY_IPS[0])])
        .expect("proxies");
    n.t1()
        .allow_cidr6(
            JOB_KEY,
            "2001:db8::/48".parse().expect("net"),
            &[PortRule::port(RuleProtocol::Tcp, 443)],
            false,
        )
        .expect("cidr6");
    for sport in 1000..1300u16 {
        let c = P6 {
            sport,
            ..P6::tcp_syn(ALLOWED6, 443)
        };
        assert_eq!(n.run_sandbox(&c.frame()).retval, TC_ACT_REDIRECT, "{sport}");
        assert_eq!(
            n.run_uplink(&geneve6(&c.reply(0x12).ip())).retval,
            TC_ACT_REDIRECT
        );
        let fin = P6 {
            flags: 0x11,
            ..c.clone()
        };
        assert_eq!(n.run_sandbox(&fin.frame()).retval, TC_ACT_REDIRECT);
        assert_eq!(
            n.run_uplink(&geneve6(&c.reply(0x11).ip())).retval,
            TC_ACT_REDIRECT
        );
    }
    assert_eq!(n.t1().live_flows(VETH).expect("live"), 0);
    assert_eq!(sandbox_drops(&n, Reason::ConnectionLimit), 0);
}

#[test]
fn two_names_on_one_ipv6_address_keep_both_their_ports() {
    let n = setup("v6union", true);
    let ttl = Some(Duration::from_secs(60));
    n.t1()
        .allow_ip6(
            JOB_KEY,
            OTHER6,
            &[PortRule::port(RuleProtocol::Tcp, 80)],
            ttl,
        )
        .expect("ip6");
    n.t1()
        .allow_ip6(
            JOB_KEY,
            OTHER6,
            &[PortRule::port(RuleProtocol::Tcp, 7)],
            ttl,
        )
        .expect("ip6");
    for port in [80, 7] {
        assert_eq!(
            n.run_sandbox(&P6::tcp_syn(OTHER6, port).frame()).retval,
            TC_ACT_REDIRECT
        );
        let dbg = n.t1().last_redirect().expect("debug").expect("recorded");
        assert_eq!(dbg.kind, 2, "port {port} allowed");
    }
}

/// An ICMPv6 error (`kind`: type, code; packet too big carries MTU 1280) from `router` to the
/// sandbox quoting the first 48 bytes of `quoted`.
fn icmp6_error(router: Ipv6Addr, kind: (u8, u8), quoted: &P6) -> Vec<u8> {
    let mut body = vec![kind.0, kind.1, 0, 0, 0, 0, 0x05, 0x00];
    body.extend_from_slice(&quoted.ip()[..48]);
    P6 {
        src: router,
        dst: SANDBOX6,
        next: 58,
        payload: body,
        ..P6::tcp_syn(SANDBOX6, 0)
    }
    .ip()
}

#[test]
fn an_icmpv6_error_about_a_flow_of_the_job_reaches_the_sandbox_from_any_router() {
    let n = setup("v6icmpok", true);
    let tcp = P6::tcp_syn(ALLOWED6, 443);
    let udp = P6::udp(ALLOWED6, 4001, b"q");
    for p in [&tcp, &udp] {
        assert_eq!(n.run_sandbox(&p.frame()).retval, TC_ACT_REDIRECT);
    }
    let router: Ipv6Addr = "2001:db8:ff01::1".parse().expect("addr");
    for (p, kind) in [
        (&tcp, (2, 0)),
        (&udp, (1, 4)),
        (&tcp, (3, 0)),
        (&tcp, (4, 0)),
    ] {
        let inner = icmp6_error(router, kind, p);
        let out = n.run_uplink(&geneve6(&inner));
        assert_eq!(out.retval, TC_ACT_REDIRECT, "{kind:?}");
        assert_eq!(&out.data[ETH..], &inner[..]);
    }
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.dropped(Reason::NoConntrack).packets, 0);
}

#[test]
fn a_forged_icmpv6_error_quoting_no_flow_of_the_job_is_dropped_as_no_conntrack() {
    let n = setup("v6icmpforged", true);
    let real = P6::tcp_syn(ALLOWED6, 443);
    assert_eq!(n.run_sandbox(&real.frame()).retval, TC_ACT_REDIRECT);
    let router: Ipv6Addr = "2001:db8:ff01::1".parse().expect("addr");
    let forged = [
        P6 {
            sport: 40001,
            ..real.clone()
        },
        P6::tcp_syn(OTHER6, 443),
        P6::udp(ALLOWED6, 443, b""),
        P6 {
            src: OTHER6,
            ..real.clone()
        },
    ];
    for (i, q) in forged.iter().enumerate() {
        for kind in [(2, 0), (1, 4), (3, 0), (4, 0)] {
            let out = n.run_uplink(&geneve6(&icmp6_error(router, kind, q)));
            assert_eq!(out.retval, TC_ACT_SHOT, "forged {i} {kind:?} passed");
        }
    }
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.dropped(Reason::NoConntrack).packets, 4 * 4);
    // A quote cut short of its ports cannot be checked.
    let mut short = icmp6_error(router, (2, 0), &real);
    short.truncate(40 + 8 + 40 + 2);
    let l = (short.len() - 40) as u16;
    short[4..6].copy_from_slice(&l.to_be_bytes());
    assert_eq!(n.run_uplink(&geneve6(&short)).retval, TC_ACT_SHOT);
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.dropped(Reason::Malformed).packets, 1);
    // An error behind a destination-options header, which the proxies never send.
    let mut hidden = icmp6_error(router, (2, 0), &forged[0]);
    let mut ext = vec![58, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&hidden[40..]);
    hidden.truncate(40);
    hidden[6] = 60;
    hidden[4..6].copy_from_slice(&(ext.len() as u16).to_be_bytes());
    hidden.extend_from_slice(&ext);
    assert_eq!(n.run_uplink(&geneve6(&hidden)).retval, TC_ACT_SHOT);
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.to_sandbox.dropped(Reason::IpOptions).packets, 1);
}

/// An MLDv2 listener report as the sandbox's kernel sends one when its interface comes up:
/// from `src`, hop limit `hlim`, to `dst`, behind a Hop-by-Hop header with `options` (6 bytes),
/// ICMPv6 type `icmp_type`.
fn mld_frame(src: Ipv6Addr, dst: Ipv6Addr, hlim: u8, options: [u8; 6], icmp_type: u8) -> Vec<u8> {
    let mut body = vec![58, 0];
    body.extend_from_slice(&options);
    // Report: type, code, checksum, reserved, 1 record (to_ex ff02::1:ff00:2, no sources).
    let mut icmp = vec![icmp_type, 0, 0, 0, 0, 0, 0, 1, 4, 0, 0, 0];
    icmp.extend_from_slice(&"ff02::1:ff00:2".parse::<Ipv6Addr>().expect("addr").octets());
    let c = csum(&icmp, pseudo6(src, dst, 58, icmp.len()));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    body.extend_from_slice(&icmp);
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 0x16]);
    f.extend_from_slice(&SANDBOX_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, hlim]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&body);
    f
}

#[test]
fn the_sandboxs_own_mld_reports_go_to_the_host_and_are_no_ip_options_drop() {
    let n = setup("v6mld", true);
    let ll: Ipv6Addr = "fe80::e0b4:22ff:fe2a:88de".parse().expect("addr");
    let all_mld: Ipv6Addr = "ff02::16".parse().expect("addr");
    let ra_padn = [5, 2, 0, 0, 1, 0];
    // What a Linux job namespace sends when eth0 comes up: MLDv2 reports from its link-local
    // address and, before that is ready, from ::; MLDv1 reports and dones to the group.
    let group: Ipv6Addr = "ff02::1:ff00:2".parse().expect("addr");
    for f in [
        mld_frame(ll, all_mld, 1, ra_padn, 143),
        mld_frame(Ipv6Addr::UNSPECIFIED, all_mld, 1, ra_padn, 143),
        mld_frame(ll, all_mld, 1, [5, 2, 0, 0, 0, 0], 143),
        mld_frame(ll, group, 1, ra_padn, 131),
        mld_frame(ll, all_mld, 1, ra_padn, 132),
    ] {
        let out = n.run_sandbox(&f);
        assert_eq!(out.retval, TC_ACT_OK);
        assert_eq!(out.data, f, "passed to the host untouched");
    }
    assert_eq!(sandbox_drops(&n, Reason::IpOptions), 0);
    let c = n.t1().counters(JOB_KEY).expect("counters");
    assert_eq!(c.from_sandbox.forwarded.packets, 5);

    // Anything else behind a Hop-by-Hop header is still dropped as ip_options.
    let not_mld = [
        // Routed further than the link.
        mld_frame(ll, all_mld, 64, ra_padn, 143),
        // To a global destination.
        mld_frame(ll, ALLOWED6, 1, ra_padn, 143),
        // To a wider-scope multicast group.
        mld_frame(ll, "ff05::16".parse().expect("addr"), 1, ra_padn, 143),
        // From the sandbox's global address or someone else's.
        mld_frame(OTHER6, all_mld, 1, ra_padn, 143),
        // Another option than Router Alert (a jumbo payload option), or an RSVP alert.
        mld_frame(ll, all_mld, 1, [0xc2, 4, 0, 1, 0, 0], 143),
        mld_frame(ll, all_mld, 1, [5, 2, 0, 1, 1, 0], 143),
        // Not MLD behind the header (an echo request).
        mld_frame(ll, all_mld, 1, ra_padn, 128),
    ];
    for (i, f) in not_mld.iter().enumerate() {
        assert_eq!(n.run_sandbox(f).retval, TC_ACT_SHOT, "{i} passed");
    }
    assert_eq!(sandbox_drops(&n, Reason::IpOptions), not_mld.len() as u64);
}
