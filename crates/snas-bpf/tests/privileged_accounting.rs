//! Every frame the sandbox program sees is accounted exactly once (forwarded or one drop
//! reason), whatever its bytes, and the verdict is one of OK / SHOT / REDIRECT. Frames are
//! valid TCP/UDP/ARP frames with random bytes overwritten. Root; fails, saying so, otherwise.

mod common;

use common::*;
use proptest::prelude::*;
use snas_bpf::testing::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use snas_bpf::{PortRule, RuleProtocol};

fn total(n: &Node) -> u64 {
    let c = n.t1().counters(JOB_KEY).expect("counters").from_sandbox;
    c.forwarded.packets + c.drops.values().map(|p| p.packets).sum::<u64>()
}

#[test]
fn every_mutated_frame_is_counted_exactly_once() {
    let n = node_with_job("accounting", |_| {}, |_| {}, &proxies(1));
    allow_test_net(&n, &[PortRule::all(RuleProtocol::Any)]);
    let bases = [
        Pkt::tcp_syn(ALLOWED_IP, 443).frame(),
        Pkt::udp(ALLOWED_IP, 4000, &[1; 40]).frame(),
        Pkt::udp(OTHER_IP, 53, &[2; 20]).frame(),
        Pkt::tcp_syn(OTHER_IP, 80).frame(),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(600));
    let strategy = (
        0..bases.len(),
        proptest::collection::vec((0usize..80, any::<u8>()), 0..6),
    );
    runner
        .run(&strategy, |(base, edits)| {
            let mut f = bases[base].clone();
            for (at, v) in edits {
                let i = at % f.len();
                f[i] = v;
            }
            let before = total(&n);
            let out = n.run_sandbox(&f);
            prop_assert!([TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.retval));
            prop_assert_eq!(total(&n), before + 1, "frame {:02x?}", f);
            Ok(())
        })
        .expect("property holds");
}

/// Whatever replies arrive (any flags, any ports, mutated bytes), every close is counted
/// exactly once: BPF's connection count equals what an ageing pass recounts from the table.
#[test]
fn random_replies_never_make_the_connection_count_drift() {
    let n = node_with_job("replydrift", |_| {}, |_| {}, &proxies(1));
    allow_test_net(&n, &[PortRule::all(RuleProtocol::Any)]);
    let conn = |sport: u16, udp: bool| {
        let p = Pkt {
            sport,
            ..Pkt::tcp_syn(ALLOWED_IP, 443)
        };
        if udp {
            Pkt {
                proto: 17,
                tcp_flags: 0,
                ..p
            }
        } else {
            p
        }
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    let strategy = (
        1u16..40,
        any::<bool>(),
        any::<u8>(),
        any::<bool>(),
        proptest::collection::vec((0usize..64, any::<u8>()), 0..3),
    );
    runner
        .run(&strategy, |(sport, udp, flags, from_sandbox, edits)| {
            let p = conn(sport, udp);
            // Open (or reuse) the flow, then one packet either way with random flags.
            let _ = n.run_sandbox(&p.frame());
            if from_sandbox {
                let _ = n.run_sandbox(&p.with_flags(flags).frame());
            } else {
                let inner = p.reply(flags).ip();
                let mut f = geneve_frame(PROXY_IPS[0], JOB_KEY, &inner);
                for (at, v) in edits {
                    let i = ETH + 56 + at % inner.len();
                    f[i] = v;
                }
                let out = n.run_uplink(&f);
                prop_assert!([TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.retval));
            }
            let counted = n.t1().live_flows(VETH).expect("live");
            std::thread::sleep(snas_bpf::tier1::COUNT_MARGIN * 10);
            n.t1()
                .age_flows(&snas_bpf::FlowTimeouts::default())
                .expect("age");
            prop_assert_eq!(n.t1().live_flows(VETH).expect("live"), counted);
            Ok(())
        })
        .expect("property holds");
}
