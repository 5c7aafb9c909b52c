//! What tier 1 counted: per-job drop and forward counters, suppressed audit events and ICMP
//! answers, and the connection count `max_connections` is checked against.

use libbpf_rs::{MapCore, MapFlags};
use snas_wire::Reason;

use super::maps::lookup;
use super::{bpf_err, Tier1, Tier1Error};
use crate::config::JobKey;
use crate::counters::{DirCounters, Direction, JobCounters, PacketCount};
use crate::pod::{bytes_of, from_bytes};
use crate::skel::types;

impl Tier1 {
    /// Counters of one job (both directions).
    pub fn counters(&self, job_key: JobKey) -> Result<JobCounters, Tier1Error> {
        Ok(JobCounters {
            from_sandbox: self.dir_counters(job_key, Direction::FromSandbox)?,
            to_sandbox: self.dir_counters(job_key, Direction::ToSandbox)?,
        })
    }

    /// Drops not attributable to a job (unknown veth, untrusted GENEVE) are counted under job
    /// key 0.
    pub fn unattributed_counters(&self) -> Result<JobCounters, Tier1Error> {
        self.counters(JobKey(0))
    }

    fn dir_counters(&self, job_key: JobKey, dir: Direction) -> Result<DirCounters, Tier1Error> {
        let mut out = DirCounters {
            forwarded: self.count(job_key, dir, 0)?,
            ..Default::default()
        };
        for r in Reason::ALL {
            let c = self.count(job_key, dir, u32::from(r.code()))?;
            if c.packets > 0 {
                out.drops.insert(r, c);
            }
        }
        Ok(out)
    }

    fn count(
        &self,
        job_key: JobKey,
        dir: Direction,
        reason: u32,
    ) -> Result<PacketCount, Tier1Error> {
        let key = types::counter_key {
            job_key: job_key.get(),
            dir: dir as u32,
            reason,
        };
        let per_cpu = self
            .maps
            .counters
            .lookup_percpu(bytes_of(&key), MapFlags::ANY)
            .map_err(bpf_err("lookup snas_counters"))?;
        let mut total = PacketCount::default();
        for v in per_cpu.unwrap_or_default() {
            let c: types::counter_val =
                from_bytes(&v).ok_or(Tier1Error::ValueSize("snas_counters"))?;
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        Ok(total)
    }

    fn state(&self, veth_ifindex: u32) -> Result<types::job_state, Tier1Error> {
        lookup(&self.maps.job_state, &veth_ifindex, "snas_job_state")?
            .ok_or(Tier1Error::UnknownJob(veth_ifindex))
    }

    /// Audit events suppressed by the per-job rate limit or a full ring.
    pub fn audit_suppressed(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        Ok(self.state(veth_ifindex)?.audit_suppressed)
    }

    /// Denied UDP datagrams of the job left without an ICMP answer by the per-job ICMP budget
    /// (`NodeConfig::icmp_budget`).
    pub fn icmp_suppressed(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        Ok(self.state(veth_ifindex)?.icmp_suppressed)
    }

    /// The job's open connections as tier 1 counts them for `max_connections`: BPF's count
    /// less the last ageing pass's correction (see [`Tier1::age_flows`]).
    pub fn live_flows(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        let open = self.conns_open(veth_ifindex)?;
        let bias: i64 = lookup(
            &self.maps.job_conns_bias,
            &veth_ifindex,
            "snas_job_conns_bias",
        )?
        .unwrap_or(0);
        Ok(u64::try_from(open.saturating_sub(bias)).unwrap_or(0))
    }

    /// BPF's admissions minus closes of a job (read under its lock).
    pub(super) fn conns_open(&self, veth_ifindex: u32) -> Result<i64, Tier1Error> {
        let v = self
            .maps
            .job_conns
            .lookup(bytes_of(&veth_ifindex), MapFlags::LOCK)
            .map_err(bpf_err("lookup snas_job_conns"))?
            .ok_or(Tier1Error::UnknownJob(veth_ifindex))?;
        let c: types::job_conns = from_bytes(&v).ok_or(Tier1Error::ValueSize("snas_job_conns"))?;
        Ok(c.open)
    }
}
