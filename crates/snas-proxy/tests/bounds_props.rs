//! Property tests of the per-job bounds: whatever sequence of holds, releases, drops and
//! expiries (hold queue) or of enqueues and dequeues (pacing-queue budget), the totals equal the
//! sums of what each job holds and no bound is ever exceeded.
#![allow(clippy::unwrap_used)]

use snas_wire::JobKey;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use proptest::prelude::*;
use snas_proxy::budget::{QueueBudget, QueueLimits};
use snas_proxy::clock::Nanos;
use snas_proxy::hold::{HoldConfig, HoldQueue};

#[derive(Debug, Clone)]
enum HoldOp {
    Hold { job: JobKey, len: usize },
    Ready(JobKey),
    Take(usize),
    Drop(JobKey),
    Advance(u64),
}

fn hold_op() -> impl Strategy<Value = HoldOp> {
    prop_oneof![
        5 => (0u64..6, 1usize..400).prop_map(|(job, len)| HoldOp::Hold { job: JobKey(job), len }),
        1 => (0u64..6).prop_map(|j| HoldOp::Ready(JobKey(j))),
        1 => (1usize..10).prop_map(HoldOp::Take),
        1 => (0u64..6).prop_map(|j| HoldOp::Drop(JobKey(j))),
        1 => (0u64..1500).prop_map(HoldOp::Advance),
    ]
}

proptest! {
    #[test]
    fn the_hold_queue_never_exceeds_its_bounds_and_keeps_each_jobs_order(
        ops in proptest::collection::vec(hold_op(), 1..300)
    ) {
        let cfg = HoldConfig {
            job_packets: 5,
            job_bytes: 1000,
            total_packets: 12,
            total_bytes: 3000,
            max_wait: Duration::from_secs(2),
        };
        let mut h = HoldQueue::new(cfg).unwrap();
        let mut now = Nanos::ZERO;
        let mut seq = 0u32;
        // What the model says each job holds: sequence numbers in arrival order, with sizes.
        let mut model: HashMap<JobKey, Vec<(u32, usize)>> = HashMap::new();
        let mut out = Vec::new();
        for op in ops {
            match op {
                HoldOp::Hold { job, len } => {
                    seq += 1;
                    let mut payload = vec![0u8; len.max(4)];
                    payload[..4].copy_from_slice(&seq.to_be_bytes());
                    if h.hold(job, Ipv4Addr::LOCALHOST, &payload, now).is_ok() {
                        model.entry(job).or_default().push((seq, payload.len()));
                    }
                }
                HoldOp::Ready(job) => h.mark_ready(job),
                HoldOp::Take(limit) => {
                    out.clear();
                    h.take_ready(&mut out, limit);
                    for p in &out {
                        let s = u32::from_be_bytes([p.payload[0], p.payload[1], p.payload[2], p.payload[3]]);
                        // It is the oldest packet of some job.
                        let job = model
                            .iter()
                            .find(|(_, v)| v.first().map(|x| x.0) == Some(s))
                            .map(|(j, _)| *j);
                        prop_assert!(job.is_some(), "packet {} out of order", s);
                        model.get_mut(&job.unwrap()).unwrap().remove(0);
                    }
                }
                HoldOp::Drop(job) => {
                    let n = h.drop_job(job);
                    let had = model.remove(&job).map_or(0, |v| v.len());
                    prop_assert_eq!(n as usize, had);
                }
                HoldOp::Advance(ms) => {
                    now = now.saturating_add(Duration::from_millis(ms));
                    for (job, n) in h.expire(now) {
                        let had = model.remove(&job).map_or(0, |v| v.len());
                        prop_assert_eq!(n as usize, had);
                    }
                }
            }
            model.retain(|_, v| !v.is_empty());
            let packets: usize = model.values().map(Vec::len).sum();
            let bytes: usize = model.values().flatten().map(|x| x.1).sum();
            prop_assert_eq!(h.packets() as usize, packets);
            prop_assert_eq!(h.bytes() as usize, bytes);
            prop_assert!(h.packets() <= cfg.total_packets && h.bytes() <= cfg.total_bytes);
            for (job, v) in &model {
                prop_assert_eq!(h.held_of(*job), v.len());
                prop_assert!(v.len() <= cfg.job_packets as usize);
                prop_assert!(v.iter().map(|x| x.1 as u64).sum::<u64>() <= cfg.job_bytes);
            }
        }
    }

    #[test]
    fn the_pacing_queue_budget_matches_what_is_queued(
        ops in proptest::collection::vec((any::<bool>(), 0u64..5, 1u64..3000), 1..400)
    ) {
        let limits = QueueLimits {
            job_packets: 8,
            job_bytes: 10_000,
            total_packets: 20,
            total_bytes: 25_000,
        };
        let mut q = QueueBudget::new(limits);
        let mut queued: Vec<(JobKey, u64)> = Vec::new();
        for (add, job, len) in ops {
            let job = JobKey(job);
            if add {
                if q.try_add(job, len) {
                    queued.push((job, len));
                }
            } else if let Some(i) = queued.iter().position(|x| x.0 == job) {
                let (j, l) = queued.remove(i);
                q.remove(j, l);
            }
            let total: u64 = queued.iter().map(|x| x.1).sum();
            prop_assert_eq!(q.total(), (queued.len() as u32, total));
            prop_assert!(queued.len() as u32 <= limits.total_packets && total <= limits.total_bytes);
            for job in 0..5 {
                let mine: Vec<_> = queued.iter().filter(|x| x.0 == JobKey(job)).collect();
                let bytes: u64 = mine.iter().map(|x| x.1).sum();
                prop_assert_eq!(q.of(JobKey(job)), (mine.len() as u32, bytes));
                prop_assert!(mine.len() as u32 <= limits.job_packets && bytes <= limits.job_bytes);
            }
        }
    }
}
