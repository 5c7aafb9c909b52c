//! A job's life in tier 1: its configuration and state entries, attaching the sandbox programs
//! to its veth, adopting it after an agent restart, and removing every entry it has.
//!
//! Invariant: userspace writes `job_state` and `job_conns` only to create them; a job
//! reconfigured under the same key keeps its state, a reused ifindex starts fresh.

use libbpf_rs::{MapCore, MapFlags, TC_EGRESS, TC_INGRESS};

use super::maps::{delete_where, lookup, update};
use super::rules::{cidr6_job, cidr_job};
use super::tc::{tc_attach, tc_detach};
use super::{clocks, Tier1, Tier1Error};
use crate::config::{JobConfig, JobKey};
use crate::pod::bytes_of;
use crate::skel::types;

/// `JOB_F_ATTACHED` in maps.h: the program is attached to the job's veth.
const JOB_F_ATTACHED: u16 = 2;

impl Tier1 {
    /// Writes a job's configuration (and fresh state) without attaching anything: for tests
    /// through BPF_PROG_TEST_RUN and for updating a running job (serial, limits, expiry). The
    /// state of a job reconfigured under the same key (pacing clocks, buckets, connection
    /// count, flows) is kept.
    pub fn configure_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let _w = self.writers();
        let attached = self.attached(job.veth_ifindex)?;
        self.write_job(job, attached)
    }

    pub(super) fn attached(&self, veth_ifindex: u32) -> Result<bool, Tier1Error> {
        let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &veth_ifindex, "snas_jobs")?;
        Ok(cfg.is_some_and(|c| c.flags & JOB_F_ATTACHED != 0))
    }

    fn write_job(&self, job: &JobConfig, attached: bool) -> Result<(), Tier1Error> {
        let idx = job.veth_ifindex;
        let mut c = job.to_c(&clocks()?);
        if attached {
            c.flags |= JOB_F_ATTACHED;
        }
        // Keep the state of a job being reconfigured (pacing and buckets continue), but not
        // the state a previous job left on a reused ifindex.
        let previous: Option<types::job_cfg> = lookup(&self.maps.jobs, &idx, "snas_jobs")?;
        let state_flags = match previous {
            Some(p) if p.job_key == job.job_key.get() => MapFlags::NO_EXIST,
            Some(p) => {
                if self.veth_of(JobKey(p.job_key))? == Some(idx) {
                    let _ = self.maps.job_by_key.delete(bytes_of(&p.job_key));
                }
                delete_where::<types::flow_key>(&self.maps.flows, |k| k.ifindex == idx);
                delete_where::<types::flow6_key>(&self.maps.flows6, |k| k.ifindex == idx);
                let _ = self.maps.job_conns_bias.delete(bytes_of(&idx));
                MapFlags::ANY
            }
            None => {
                let _ = self.maps.job_conns_bias.delete(bytes_of(&idx));
                MapFlags::ANY
            }
        };
        // State first: a program that finds the configuration finds its state too.
        let fresh = types::job_state::default();
        let _ = self
            .maps
            .job_state
            .update(bytes_of(&idx), bytes_of(&fresh), state_flags);
        let conns = types::job_conns::default();
        let _ = self
            .maps
            .job_conns
            .update(bytes_of(&idx), bytes_of(&conns), state_flags);
        update(&self.maps.jobs, &idx, &c, "snas_jobs")?;
        update(
            &self.maps.job_by_key,
            &job.job_key.get(),
            &idx,
            "snas_job_by_key",
        )
    }

    /// Configures the job and attaches the sandbox programs to its veth (clsact ingress and
    /// egress).
    pub fn attach_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let _w = self.writers();
        self.write_job(job, false)?;
        tc_attach(&self.sandbox_prog, job.veth_ifindex, TC_INGRESS)?;
        tc_attach(&self.sandbox_egress_prog, job.veth_ifindex, TC_EGRESS)?;
        self.write_job(job, true)
    }

    /// Takes over a job found at agent start: if the veth's configuration already names this
    /// job as attached, only its configuration is rewritten (so that the restarted agent's
    /// limits and the policy's expiry, converted anew, apply); programs, state, flows and
    /// counters are left alone. Otherwise it is attached like a new job.
    pub fn adopt_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &job.veth_ifindex, "snas_jobs")?;
        match cfg {
            Some(c) if c.job_key == job.job_key.get() && c.flags & JOB_F_ATTACHED != 0 => {
                let _w = self.writers();
                self.write_job(job, true)
            }
            _ => self.attach_job(job),
        }
    }

    /// The veth ifindex of a job, if it is configured.
    pub fn veth_of(&self, job_key: JobKey) -> Result<Option<u32>, Tier1Error> {
        lookup(&self.maps.job_by_key, &job_key.get(), "snas_job_by_key")
    }

    /// [`Tier1::detach_job`] by job key. Idempotent; returns whether anything was removed. If
    /// the job's veth ifindex has meanwhile been reused by another job, only the state keyed
    /// by `job_key` is removed and the other job is left alone.
    pub fn detach_job_by_key(&self, key: JobKey) -> Result<bool, Tier1Error> {
        let idx = self.veth_of(key)?;
        let job_key = key.get();
        if let Some(idx) = idx {
            let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &idx, "snas_jobs")?;
            if cfg.is_some_and(|c| c.job_key == job_key) {
                return self.detach_job(idx);
            }
        }
        let _ = self.maps.job_by_key.delete(bytes_of(&job_key));
        self.remove_key_state(job_key);
        Ok(idx.is_some())
    }

    /// Detaches the programs from the veth (if it still exists) and removes every map entry
    /// of the job: config, state, rules, flows, DNS NAT, counters. Idempotent; returns whether
    /// a job was configured on the veth.
    pub fn detach_job(&self, veth_ifindex: u32) -> Result<bool, Tier1Error> {
        let _w = self.writers();
        let Some(cfg) = lookup::<types::job_cfg>(&self.maps.jobs, &veth_ifindex, "snas_jobs")?
        else {
            return Ok(false);
        };
        if cfg.flags & JOB_F_ATTACHED != 0 {
            tc_detach(&self.sandbox_prog, veth_ifindex, TC_INGRESS);
            tc_detach(&self.sandbox_egress_prog, veth_ifindex, TC_EGRESS);
        }
        let job = cfg.job_key;
        let _ = self.maps.jobs.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_state.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_conns.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_conns_bias.delete(bytes_of(&veth_ifindex));
        if self.veth_of(JobKey(job))? == Some(veth_ifindex) {
            let _ = self.maps.job_by_key.delete(bytes_of(&job));
        }
        delete_where::<types::flow_key>(&self.maps.flows, |k| k.ifindex == veth_ifindex);
        delete_where::<types::flow6_key>(&self.maps.flows6, |k| k.ifindex == veth_ifindex);
        delete_where::<types::dns_nat_key>(&self.maps.dns_nat, |k| k.ifindex == veth_ifindex);
        self.remove_key_state(job);
        Ok(true)
    }

    fn remove_key_state(&self, job: u64) {
        delete_where::<types::dst_key>(&self.maps.dst_exact, |k| k.job_key == job);
        delete_where::<types::cidr_key>(&self.maps.dst_cidr, |k| cidr_job(k).get() == job);
        delete_where::<types::dst6_key>(&self.maps.dst6_exact, |k| k.job_key == job);
        delete_where::<types::cidr6_key>(&self.maps.dst6_cidr, |k| cidr6_job(k).get() == job);
        delete_where::<types::cidr_key>(&self.maps.deny_cidr, |k| cidr_job(k).get() == job);
        delete_where::<types::cidr6_key>(&self.maps.deny6_cidr, |k| cidr6_job(k).get() == job);
        delete_where::<types::counter_key>(&self.maps.counters, |k| k.job_key == job);
    }
}
