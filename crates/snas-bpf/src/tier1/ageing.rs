//! The ageing pass over the flow tables: idle flows removed, open connections recounted.

use std::collections::HashMap;
use std::time::Duration;

use libbpf_rs::MapCore;

use super::maps::{for_each_entry, update};
use super::{mono_now, Tier1, Tier1Error};
use crate::config::saturating_ns;
use crate::flows::{self, Ageing, FlowTimeouts};
use crate::pod::from_bytes;
use crate::skel::types;

/// The ageing pass counts a flow only if it was admitted this long before the pass read the
/// job's counter: BPF stamps `admitted` after the count went up, so this margin only absorbs
/// the difference between the two readings of CLOCK_MONOTONIC (`bpf_ktime_get_ns` is the
/// NMI-safe fast clock, `clock_gettime` the vDSO one; they differ by nanoseconds). A flow left
/// out is counted at the next pass: until then the job may open one more (over-admission).
pub const COUNT_MARGIN: Duration = Duration::from_micros(100);

/// What one ageing pass did ([`Tier1::age_flows`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgeingReport {
    /// Flow entries still in the tables.
    pub kept: u64,
    /// Flow entries removed because they were idle beyond their state's timeout.
    pub removed: u64,
    /// Open connections counted, all jobs together.
    pub open: u64,
}

impl Tier1 {
    /// The ageing pass (call it every few seconds): removes flow entries idle beyond their
    /// state's timeout ([`FlowTimeouts`], defaults equal to tier 2's conntrack: SYN sent 30 s,
    /// established 1 h, closing 60 s, closed 30 s, UDP 30 s unreplied / 120 s replied) and
    /// recounts each job's open connections, correcting what BPF cannot see end (idle
    /// timeouts, LRU evictions).
    ///
    /// The recount never overwrites BPF's counter: it reads each job's counter first, counts
    /// the open entries admitted before that read, and stores the difference as the job's
    /// bias; admissions and closes BPF makes meanwhile keep moving the counter. Every race
    /// (an entry closed or admitted while the pass runs) leaves the count low, never high:
    /// tier 1 may over-admit briefly, never under-admit.
    pub fn age_flows(&self, timeouts: &FlowTimeouts) -> Result<AgeingReport, Tier1Error> {
        let _w = self.writers();
        let now = saturating_ns(mono_now()?);
        let count_before = now.saturating_sub(saturating_ns(COUNT_MARGIN));
        let mut read_open = HashMap::<u32, i64>::new();
        for key in self.maps.job_conns.keys() {
            if let Some(idx) = from_bytes::<u32>(&key) {
                if let Ok(open) = self.conns_open(idx) {
                    read_open.insert(idx, open);
                }
            }
        }
        let mut report = AgeingReport::default();
        let mut counted = HashMap::<u32, i64>::new();
        let mut age =
            |key: &[u8], val: &[u8], ifindex: u32, proto: u8, doomed: &mut Vec<Vec<u8>>| {
                let Some(v) = from_bytes::<types::flow_val>(val) else {
                    return;
                };
                match flows::age_entry(
                    timeouts,
                    proto,
                    v.flags,
                    v.last_seen,
                    v.admitted,
                    now,
                    count_before,
                ) {
                    Ageing::Remove => doomed.push(key.to_vec()),
                    Ageing::KeepOpen => {
                        *counted.entry(ifindex).or_default() += 1;
                        report.kept += 1;
                        report.open += 1;
                    }
                    Ageing::Keep => report.kept += 1,
                }
            };
        let mut doomed = Vec::new();
        for_each_entry(&self.maps.flows, "snas_flows", |key, val| {
            if let Some(k) = from_bytes::<types::flow_key>(key) {
                age(key, val, k.ifindex, k.proto, &mut doomed);
            }
        })?;
        let mut doomed6 = Vec::new();
        for_each_entry(&self.maps.flows6, "snas_flows6", |key, val| {
            if let Some(k) = from_bytes::<types::flow6_key>(key) {
                age(key, val, k.ifindex, k.proto, &mut doomed6);
            }
        })?;
        for k in &doomed {
            if self.maps.flows.delete(k).is_ok() {
                report.removed += 1;
            }
        }
        for k in &doomed6 {
            if self.maps.flows6.delete(k).is_ok() {
                report.removed += 1;
            }
        }
        for (idx, open) in read_open {
            let bias = open - counted.get(&idx).copied().unwrap_or(0);
            update(
                &self.maps.job_conns_bias,
                &idx,
                &bias,
                "snas_job_conns_bias",
            )?;
        }
        Ok(report)
    }
}
