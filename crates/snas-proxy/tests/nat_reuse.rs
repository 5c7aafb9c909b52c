//! Properties over random open / packet / close / advance sequences under a fake clock:
//! - a NAT tuple is never handed out while a flow or its quarantine holds it, except that the
//!   flow key (job, source, destination) whose flow put it in quarantine takes it back when it
//!   opens again — always, when it does;
//! - the pool reports exhaustion only when every tuple for the destination is really held;
//! - the per-(job, destination) cap refuses exactly when the job has that many live flows there;
//! - no flow expires before its timeout, and none is left overdue after `expire(now)`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use proptest::prelude::*;
use snas_proxy::clock::Nanos;
use snas_proxy::conntrack::{
    Conntrack, ConntrackConfig, Direction, FlowId, FlowKey, Open, ReplyKey, TcpFlags, Timeouts,
};
use snas_proxy::nat::JobLimits;
use snas_wire::L4Proto;
use snas_wire::Reason;

const EGRESS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
];
const PORTS: u16 = 8;
const QUARANTINE: Duration = Duration::from_secs(60);
const PER_DEST_CAP: u32 = 5;

#[derive(Debug, Clone)]
enum Op {
    Open {
        job: u8,
        sport: u8,
        dest: u8,
        udp: bool,
    },
    Reply {
        pick: u16,
    },
    Packet {
        pick: u16,
        flags: u8,
        reply: bool,
    },
    Close {
        pick: u16,
    },
    Advance {
        secs: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, 0u8..40, 0u8..3, any::<bool>())
            .prop_map(|(job, sport, dest, udp)| Op::Open { job, sport, dest, udp }),
        2 => any::<u16>().prop_map(|pick| Op::Reply { pick }),
        3 => (any::<u16>(), prop::sample::select(vec![0x10u8, 0x11, 0x04, 0x02, 0x12]), any::<bool>())
            .prop_map(|(pick, flags, reply)| Op::Packet { pick, flags, reply }),
        3 => any::<u16>().prop_map(|pick| Op::Close { pick }),
        2 => (0u16..90).prop_map(|secs| Op::Advance { secs }),
        1 => (3_000u16..4_000).prop_map(|secs| Op::Advance { secs }),
    ]
}

type Tuple = (IpAddr, u16, L4Proto, IpAddr, u16);

#[derive(Default)]
struct Model {
    /// Tuples of live flows.
    live: HashMap<Tuple, FlowId>,
    /// Tuples of removed flows → end of their quarantine and the key of the flow that held it.
    quarantined_until: HashMap<Tuple, (Nanos, FlowKey)>,
    flows: Vec<(FlowId, FlowKey, Tuple)>,
}

impl Model {
    fn held(&self, t: &Tuple, now: Nanos) -> bool {
        self.live.contains_key(t) || self.quarantined_until.get(t).is_some_and(|(u, _)| *u > now)
    }

    /// The quarantined tuple `key` would take back if it opened now.
    fn reopens(&self, key: &FlowKey, now: Nanos) -> Option<Tuple> {
        self.quarantined_until
            .iter()
            .find(|(t, (u, k))| k == key && *u > now && !self.live.contains_key(*t))
            .map(|(t, _)| *t)
    }

    fn removed(&mut self, t: Tuple, key: FlowKey, now: Nanos) {
        self.live.remove(&t);
        self.quarantined_until
            .insert(t, (now.saturating_add(QUARANTINE), key));
        self.flows.retain(|(_, _, x)| *x != t);
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut cfg = ConntrackConfig::new(EGRESS.to_vec());
    cfg.nat.ports = 30_000..=30_000 + PORTS - 1;
    cfg.nat.quarantine = QUARANTINE;
    let mut ct =
        Conntrack::new(cfg, Nanos::ZERO).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let limits = JobLimits {
        max_connections: u32::MAX,
        max_ports_per_destination: PER_DEST_CAP,
    };
    let timeouts = Timeouts::default();
    let mut now = Nanos::ZERO;
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Open {
                job,
                sport,
                dest,
                udp,
            } => {
                let proto = if udp { L4Proto::Udp } else { L4Proto::Tcp };
                let key = FlowKey {
                    job: snas_wire::JobKey(u64::from(job)),
                    proto,
                    src_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, job + 1)),
                    src_port: u16::from(sport),
                    dst_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, dest + 1)),
                    dst_port: 443,
                };
                let to_dest = m
                    .flows
                    .iter()
                    .filter(|(_, k, _)| {
                        k.job == key.job && k.proto == proto && k.dst_ip == key.dst_ip
                    })
                    .count() as u32;
                let existing = m.flows.iter().any(|(_, k, _)| *k == key);
                let reopened = m.reopens(&key, now);
                match ct.open(key, snas_wire::TenantId(u32::from(job % 2)), limits, now) {
                    Open::Created {
                        id,
                        egress_ip,
                        egress_port,
                    } => {
                        prop_assert!(!existing);
                        prop_assert!(to_dest < PER_DEST_CAP, "cap {} exceeded", PER_DEST_CAP);
                        let t = (egress_ip, egress_port, proto, key.dst_ip, key.dst_port);
                        match reopened {
                            Some(r) => {
                                prop_assert_eq!(t, r, "a reopened key takes its tuple back");
                                m.quarantined_until.remove(&t);
                            }
                            None => {
                                prop_assert!(!m.held(&t, now), "tuple {t:?} reused while held")
                            }
                        }
                        m.live.insert(t, id);
                        m.flows.push((id, key, t));
                        let reply = ReplyKey {
                            proto,
                            remote_ip: key.dst_ip,
                            remote_port: key.dst_port,
                            egress_ip,
                            egress_port,
                        };
                        prop_assert_eq!(ct.lookup_reply(&reply), Some(id));
                    }
                    Open::Existing(id) => {
                        prop_assert!(m.flows.iter().any(|(f, k, _)| *f == id && *k == key));
                    }
                    Open::Refused(Reason::DestinationPortCap) => {
                        prop_assert!(!existing);
                        let _ = reopened;
                        prop_assert_eq!(to_dest, PER_DEST_CAP);
                    }
                    Open::Refused(r) => {
                        prop_assert_eq!(r, Reason::PortsExhausted);
                        prop_assert!(!existing);
                        prop_assert_eq!(reopened, None, "a reopened key is never refused a port");
                        prop_assert!(to_dest < PER_DEST_CAP);
                        let held = EGRESS
                            .iter()
                            .flat_map(|ip| (0..PORTS).map(move |p| (*ip, 30_000 + p)))
                            .filter(|(ip, p)| m.held(&(*ip, *p, proto, key.dst_ip, 443), now))
                            .count();
                        prop_assert_eq!(held, EGRESS.len() * usize::from(PORTS));
                    }
                }
            }
            Op::Reply { pick } => {
                if !m.flows.is_empty() {
                    let (id, _, _) = m.flows[usize::from(pick) % m.flows.len()];
                    let flags = TcpFlags::SYN | TcpFlags::ACK;
                    prop_assert!(ct.observe(id, Direction::Reply, flags, 60, now).is_some());
                }
            }
            Op::Packet { pick, flags, reply } => {
                if !m.flows.is_empty() {
                    let (id, _, _) = m.flows[usize::from(pick) % m.flows.len()];
                    let dir = if reply {
                        Direction::Reply
                    } else {
                        Direction::Original
                    };
                    prop_assert!(ct.observe(id, dir, TcpFlags(flags), 60, now).is_some());
                }
            }
            Op::Close { pick } => {
                if !m.flows.is_empty() {
                    let (id, key, t) = m.flows[usize::from(pick) % m.flows.len()];
                    prop_assert!(ct.remove(id, now).is_some());
                    prop_assert_eq!(ct.lookup(&key), None);
                    m.removed(t, key, now);
                }
            }
            Op::Advance { secs } => {
                now = now.saturating_add(Duration::from_secs(u64::from(secs)));
                let gone: Vec<_> = ct.expire(now).collect();
                for f in gone {
                    let t = (
                        f.egress_ip,
                        f.egress_port,
                        f.key.proto,
                        f.key.dst_ip,
                        f.key.dst_port,
                    );
                    prop_assert!(m.live.contains_key(&t));
                    let deadline = f.last_seen.saturating_add(timeouts.of(f.state));
                    prop_assert!(deadline <= now, "{:?} expired before its timeout", f.state);
                    m.removed(t, f.key, now);
                }
            }
        }
        prop_assert_eq!(ct.len(), m.live.len());
        for (id, key, _) in &m.flows {
            prop_assert_eq!(ct.lookup(key), Some(*id));
            // Expiry is driven on every Advance: no live flow may be overdue.
            let info = ct.info(*id);
            prop_assert!(info.is_some());
            if let Some(info) = info {
                let deadline = info.last_seen.saturating_add(timeouts.of(info.state));
                prop_assert!(deadline > now, "{:?} overdue", info.state);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn nat_tuples_are_never_reused_while_held_except_by_the_key_that_reopens_them(ops in proptest::collection::vec(op(), 1..400)) {
        run(ops)?;
    }
}
