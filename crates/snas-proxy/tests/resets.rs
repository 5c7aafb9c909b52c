//! Flows the proxy ends on its own (live update, revocation, key removal) are reset both ways
//! (`snas_proxy::resets`): each end is probed, each answer becomes RSTs whose sequence numbers
//! come from the answer — exact whether or not the engine saw the flow's recent packets (the
//! fast path carried it, or it was idle). Pure: a manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use snas_proxy::offload::OffloadEvent;
use snas_proxy::resets::{Control, ControlTo, LINGER, RETRY};
use snas_proxy::tier2::{FlowEnd, Verdict, GENEVE_HEADER_LEN, JOB_SCAN};
use snas_wire::build::{udp, UdpSpec};
use snas_wire::geneve::{parse_payload, InnerProto, SnasOption};
use snas_wire::{IpPacket, Reason, TcpFlags, Transport};

mod engine;
use engine::{
    internet_segment as reply, sandbox_segment as seg, Engine, DATA, EGRESS, NODE, SANDBOX,
};

const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const DB: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20));
const JTI: &str = "jti-resets-000001";

const HEAD: &str = "tenant = \"acme\"\njob = \"job-1\"\nnode = \"192.0.2.7\"\n[limits]\nmax_connections = 4096\nnew_connections_per_sec = 100000\nnew_connections_burst = 100000\negress_bps = \"2Gbit\"\ningress_bps = \"3Gbit\"\n";
const API_RULE: &str = "[[egress]]\ncidr = \"203.0.113.10/32\"\nports = \"443\"\n";
const DB_RULE: &str = "[[egress]]\ncidr = \"203.0.113.20/32\"\nports = \"5432\"\n";
const DB_UDP_RULE: &str =
    "[[egress]]\ncidr = \"203.0.113.20/32\"\nports = \"5432\"\nprotocol = \"udp\"\n";

/// One job holding API, DB (TCP) and DB (UDP) rules, on an engine from `tests/engine`.
struct Fx(Engine);

impl Deref for Fx {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.0
    }
}

impl DerefMut for Fx {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.0
    }
}

fn job() -> snas_wire::JobKey {
    snas_policy::identity::job_key(JTI)
}

impl Fx {
    fn new(offload: bool) -> Fx {
        let mut e = Engine::single_node();
        e.tier2.set_offload(offload);
        e.hold_policy(&format!("{HEAD}{API_RULE}{DB_RULE}{DB_UDP_RULE}"), JTI, 1);
        Fx(e)
    }

    /// The update that removes the database rules.
    fn update_to_api_only(&mut self) -> usize {
        let new = self.signer.policy(&format!("{HEAD}{API_RULE}"), JTI, 2);
        let now = self.now();
        let n = self.tier2.reevaluate_job(&new, now);
        self.policies.insert(new);
        n
    }

    fn opt(&self) -> SnasOption {
        engine::option(JTI, 1)
    }

    /// A packet from the sandbox; returns the verdict and the (rewritten) packet.
    fn send(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let opt = self.opt();
        let r = self.packet_from_node(NODE, &opt, inner);
        (r.verdict, r.payload)
    }

    /// A packet from the sandbox that is refused: the verdict and the refusal.
    fn send_refused(&mut self, inner: &[u8]) -> (Verdict, Seg) {
        let opt = self.opt();
        let r = self.packet_from_node(NODE, &opt, inner);
        let Verdict::Refuse {
            reply_len, node, ..
        } = r.verdict
        else {
            panic!("not refused: {:?}", r.verdict)
        };
        (
            r.verdict.clone(),
            parse_node_bytes(node, &r.refusal[..reply_len]),
        )
    }

    fn receive(&mut self, inner: &[u8]) -> Verdict {
        self.packet_from_internet(inner).0
    }

    /// A TCP flow from `sport` to `dst`:`dport` through its handshake and a payload each way;
    /// returns its egress port.
    fn established(&mut self, sport: u16, dst: IpAddr, dport: u16) -> u16 {
        let (v, p) = self.send(&seg(sport, dst, dport, 1000, 0, TcpFlags::SYN, b""));
        let Verdict::ToInternet { range, .. } = v else {
            panic!("SYN not admitted: {v:?}")
        };
        let port = IpPacket::parse(&p[range])
            .unwrap()
            .flow_tuple()
            .unwrap()
            .src_port;
        let syn_ack = TcpFlags::SYN | TcpFlags::ACK;
        let v = self.receive(&reply(dst, dport, port, 5000, 1001, syn_ack, b""));
        assert!(matches!(v, Verdict::ToNode { .. }), "{v:?}");
        let (v, _) = self.send(&seg(sport, dst, dport, 1001, 5001, DATA, b"hello"));
        assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
        let v = self.receive(&reply(dst, dport, port, 5001, 1006, DATA, b"world"));
        assert!(matches!(v, Verdict::ToNode { .. }), "{v:?}");
        port
    }

    fn control(&mut self) -> Vec<Control> {
        let mut out = Vec::new();
        while self.tier2.take_control(&mut out, 1000) > 0 {}
        out
    }
}

/// A control packet's TCP fields: (src, dst, seq, flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    to: ControlTo,
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    flags: TcpFlags,
}

fn parse(c: &Control) -> Seg {
    match c.to {
        ControlTo::Node(node) => parse_node_bytes(node, c.bytes()),
        ControlTo::Internet => parse_inner(c.to, c.bytes()),
    }
}

/// A GENEVE payload for `node` (the job's option, IPv4 inside).
fn parse_node_bytes(node: Ipv4Addr, bytes: &[u8]) -> Seg {
    let g = parse_payload(bytes).unwrap();
    assert_eq!(g.inner_offset, GENEVE_HEADER_LEN);
    assert_eq!(g.option.job_key, job());
    assert_eq!(g.inner_proto, InnerProto::Ipv4);
    parse_inner(ControlTo::Node(node), &bytes[GENEVE_HEADER_LEN..])
}

fn parse_inner(to: ControlTo, inner: &[u8]) -> Seg {
    let c_to = to;
    let ip = IpPacket::parse(inner).unwrap();
    let Transport::Tcp(t) = ip.transport().unwrap() else {
        panic!("not TCP")
    };
    assert!(t.checksum_ok(ip.src(), ip.dst()), "bad checksum");
    Seg {
        to: c_to,
        src: SocketAddr::new(ip.src(), t.src_port()),
        dst: SocketAddr::new(ip.dst(), t.dst_port()),
        seq: t.seq(),
        flags: t.flags(),
    }
}

fn segs(cs: &[Control]) -> Vec<Seg> {
    cs.iter().map(parse).collect()
}

/// The probes of one flow: two ACKs to each end, their sequence numbers 2^31 apart.
fn assert_probes(s: &[Seg], sport: u16, egress_port: u16, dst: IpAddr, dport: u16) {
    let remote = SocketAddr::new(dst, dport);
    let egress = SocketAddr::new(EGRESS, egress_port);
    let sandbox = SocketAddr::new(SANDBOX, sport);
    let to_remote: Vec<&Seg> = s
        .iter()
        .filter(|x| x.to == ControlTo::Internet && x.src == egress && x.dst == remote)
        .collect();
    let to_job: Vec<&Seg> = s
        .iter()
        .filter(|x| x.to == ControlTo::Node(NODE) && x.src == remote && x.dst == sandbox)
        .collect();
    for side in [&to_remote, &to_job] {
        assert_eq!(side.len(), 2, "{s:?}");
        assert!(side.iter().all(|x| x.flags == TcpFlags::ACK));
        assert_eq!(side[0].seq.wrapping_sub(side[1].seq), 1 << 31);
    }
}

#[test]
fn an_update_probes_both_ends_of_every_tcp_flow_it_ends_and_of_none_it_keeps() {
    let mut f = Fx::new(false);
    let mut db = Vec::new();
    for i in 0..300u16 {
        db.push((20000 + i, f.established(20000 + i, DB, 5432)));
        f.established(40000 + i, API, 443);
    }
    assert!(f.control().is_empty());
    assert_eq!(f.update_to_api_only(), 300);
    let s = segs(&f.control());
    assert_eq!(
        s.len(),
        300 * 4,
        "two probes to each end of each ended flow"
    );
    for (sport, port) in db {
        assert_probes(&s, sport, port, DB, 5432);
    }
    assert!(s.iter().all(|x| x.src.ip() != API && x.dst.ip() != API));
    assert_eq!(f.tier2.closing_flows(), 300);
    let st = f.tier2.reset_stats();
    assert_eq!((st.flows, st.probes), (300, 1200));
}

#[test]
fn the_remotes_answer_resets_both_ends_at_exactly_the_numbers_it_carries() {
    let mut f = Fx::new(false);
    let ports: Vec<(u16, u16)> = (0..500u16)
        .map(|i| (20000 + i, f.established(20000 + i, DB, 5432)))
        .collect();
    f.update_to_api_only();
    f.control();
    for (i, (sport, port)) in ports.iter().enumerate() {
        // The remote's duplicate ACK: its SND.NXT and RCV.NXT, whatever the engine saw.
        let (snd_nxt, rcv_nxt) = (3_000_000_000u32 + i as u32, 7_000 + i as u32);
        let v = f.receive(&reply(
            DB,
            5432,
            *port,
            snd_nxt,
            rcv_nxt,
            TcpFlags::ACK,
            b"",
        ));
        assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
        let s = segs(&f.control());
        let want_remote = Seg {
            to: ControlTo::Internet,
            src: SocketAddr::new(EGRESS, *port),
            dst: SocketAddr::new(DB, 5432),
            seq: rcv_nxt,
            flags: TcpFlags::RST,
        };
        let want_job = Seg {
            to: ControlTo::Node(NODE),
            src: SocketAddr::new(DB, 5432),
            dst: SocketAddr::new(SANDBOX, *sport),
            seq: snd_nxt,
            flags: TcpFlags::RST,
        };
        assert_eq!(s, vec![want_remote, want_job]);
    }
    let st = f.tier2.reset_stats();
    assert_eq!((st.resets_to_remote, st.resets_to_job), (500, 500));
}

#[test]
fn the_sandboxs_answer_resets_both_ends_at_exactly_the_numbers_it_carries() {
    let mut f = Fx::new(false);
    let port = f.established(20000, DB, 5432);
    f.update_to_api_only();
    f.control();
    let (snd_nxt, rcv_nxt) = (123_456u32, 4_000_000_000u32);
    let (v, rst) = f.send_refused(&seg(20000, DB, 5432, snd_nxt, rcv_nxt, TcpFlags::ACK, b""));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::NoConntrack,
                node: NODE,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(
        rst,
        Seg {
            to: ControlTo::Node(NODE),
            src: SocketAddr::new(DB, 5432),
            dst: SocketAddr::new(SANDBOX, 20000),
            seq: rcv_nxt,
            flags: TcpFlags::RST,
        }
    );
    let s = segs(&f.control());
    assert_eq!(
        s,
        vec![Seg {
            to: ControlTo::Internet,
            src: SocketAddr::new(EGRESS, port),
            dst: SocketAddr::new(DB, 5432),
            seq: snd_nxt,
            flags: TcpFlags::RST,
        },]
    );
}

#[test]
fn a_flow_carried_by_the_fast_path_leaves_it_in_the_same_call_and_is_reset_from_the_answers() {
    let mut f = Fx::new(true);
    let port = f.established(20000, DB, 5432);
    let key_installed = f
        .tier2
        .drain_offload_events()
        .any(|e| matches!(e, OffloadEvent::Install(ff) if ff.key.dst_ip == DB));
    assert!(key_installed, "the flow is carried by the fast path");
    f.update_to_api_only();
    let removed = f
        .tier2
        .drain_offload_events()
        .any(|e| matches!(e, OffloadEvent::Remove(ff) if ff.key.dst_ip == DB));
    assert!(removed, "out of the fast path before its probes leave");
    let s = segs(&f.control());
    assert_probes(&s, 20000, port, DB, 5432);
    // Gigabytes went by in the fast path: the answer's numbers are far from anything the
    // engine saw, and the RSTs carry them.
    let v = f.receive(&reply(
        DB,
        5432,
        port,
        2_000_000_000,
        1_500_000_000,
        TcpFlags::ACK,
        b"",
    ));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    let seqs: Vec<(ControlTo, u32)> = segs(&f.control()).iter().map(|x| (x.to, x.seq)).collect();
    assert_eq!(
        seqs,
        vec![
            (ControlTo::Internet, 1_500_000_000),
            (ControlTo::Node(NODE), 2_000_000_000)
        ]
    );
}

#[test]
fn an_idle_flow_cut_off_by_a_revocation_is_reset_even_though_the_job_is_refused() {
    let mut f = Fx::new(false);
    let port = f.established(20000, DB, 5432);
    // Idle for 50 minutes (under the 1 h established timeout), ticks keep running.
    for _ in 0..50 {
        f.tick(Duration::from_secs(60));
    }
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job()), 1);
    assert!(f.control().is_empty());
    f.policies.reject(job(), Reason::PolicyRevoked);
    f.tick(JOB_SCAN);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job()), 0);
    let s = segs(&f.control());
    assert_probes(&s, 20000, port, DB, 5432);
    // The sandbox answers although its policy is revoked: answered, not dropped unanswered.
    let (v, rst) = f.send_refused(&seg(20000, DB, 5432, 1006, 5006, TcpFlags::ACK, b""));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::NoConntrack,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!((rst.seq, rst.flags), (5006, TcpFlags::RST));
    let s = segs(&f.control());
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].to, s[0].seq), (ControlTo::Internet, 1006));
    // Any other packet of the revoked job is still refused as before.
    let (v, _) = f.send(&seg(20001, API, 443, 1, 0, TcpFlags::SYN, b""));
    assert_eq!(v, Verdict::Drop(Reason::PolicyRevoked));
}

#[test]
fn a_key_removed_resets_the_flows_of_the_jobs_it_signed() {
    let mut f = Fx::new(false);
    let ports: Vec<u16> = (0..100u16)
        .map(|i| f.established(20000 + i, API, 443))
        .collect();
    f.policies.reject(job(), Reason::KeyUntrusted);
    f.tick(JOB_SCAN);
    let s = segs(&f.control());
    assert_eq!(s.len(), 400);
    for (i, port) in ports.into_iter().enumerate() {
        assert_probes(&s, 20000 + i as u16, port, API, 443);
    }
}

#[test]
fn udp_flows_and_flows_ended_by_their_node_or_idleness_get_no_segment() {
    let mut f = Fx::new(false);
    for i in 0..50u16 {
        let d = udp(&UdpSpec {
            src: SocketAddr::new(SANDBOX, 30000 + i),
            dst: SocketAddr::new(DB, 5432),
            payload: b"q",
        })
        .unwrap();
        let (v, _) = f.send(&d);
        assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    }
    assert_eq!(f.update_to_api_only(), 50);
    assert!(f.control().is_empty(), "UDP flows just end");
    f.established(20000, API, 443);
    let now = f.now();
    f.tier2.remove_job(job(), FlowEnd::JobEnded, now);
    assert!(
        f.control().is_empty(),
        "a job its node ended is not the proxy's to reset"
    );
    assert_eq!(f.tier2.closing_flows(), 0);
}

#[test]
fn an_end_that_does_not_answer_is_probed_once_more_then_forgotten() {
    let mut f = Fx::new(false);
    let port = f.established(20000, DB, 5432);
    f.update_to_api_only();
    f.control();
    // The remote answers, the sandbox does not (tier 1 dropped its answer).
    f.receive(&reply(DB, 5432, port, 9, 10, TcpFlags::ACK, b""));
    f.control();
    f.tick(RETRY);
    let s = segs(&f.control());
    assert_eq!(s.len(), 2, "only the silent end is probed again: {s:?}");
    assert!(s
        .iter()
        .all(|x| x.to == ControlTo::Node(NODE) && x.flags == TcpFlags::ACK));
    f.tick(RETRY);
    assert!(f.control().is_empty(), "once");
    f.tick(LINGER);
    assert_eq!(f.tier2.closing_flows(), 0);
    assert_eq!(f.tier2.reset_stats().unanswered, 1);
    // From then on, a late answer is an ordinary segment without a flow.
    let v = f.receive(&reply(DB, 5432, port, 9, 10, TcpFlags::ACK, b""));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    assert!(f.control().is_empty());
}

#[test]
fn a_rst_from_either_end_is_never_answered() {
    let mut f = Fx::new(false);
    let port = f.established(20000, DB, 5432);
    f.update_to_api_only();
    f.control();
    let v = f.receive(&reply(DB, 5432, port, 9, 0, TcpFlags::RST, b""));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    let (v, _) = f.send(&seg(20000, DB, 5432, 9, 0, TcpFlags::RST, b""));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    assert!(f.control().is_empty());
}

#[test]
fn a_syn_on_a_closing_tuple_is_a_new_connection_decided_by_the_policy() {
    let mut f = Fx::new(false);
    f.established(20000, DB, 5432);
    f.update_to_api_only();
    f.control();
    let (v, _) = f.send(&seg(20000, DB, 5432, 77, 0, TcpFlags::SYN, b""));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::DestinationDenied,
                ..
            }
        ),
        "{v:?}"
    );
    assert!(f.control().is_empty());
    assert_eq!(f.tier2.closing_flows(), 0);
}

#[test]
fn answers_of_a_flow_are_bounded() {
    let mut f = Fx::new(false);
    let port = f.established(20000, DB, 5432);
    f.update_to_api_only();
    f.control();
    for i in 0..1000u32 {
        f.receive(&reply(DB, 5432, port, i, i, TcpFlags::ACK, b""));
    }
    assert_eq!(f.control().len(), 2 * 4, "four answers, two RSTs each");
}
