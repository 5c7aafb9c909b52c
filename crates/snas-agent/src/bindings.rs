//! The ledger of the addresses the DNS stub installed into tier 1, by job, address and name —
//! what a live policy update needs to withdraw the bindings of names the new policy no longer
//! allows (tier 1's exact entries hold ports, not names).
//!
//! Pure: the caller passes monotonic times in ([`Duration`] since an origin of its choosing).
//!
//! # Invariants
//! - One entry per (job, address, name): the port rules the name's policy rules gave and the
//!   binding's end (the lifetime the stub installed it with, refreshed by later answers). A name
//!   audit mode let through unbound is recorded with no rules, so that tier-1 audit lines name
//!   it ([`BindingLedger::name_of`]); an update installs it if the new policy allows the name
//!   (as a fresh answer would be) and forgets it otherwise (nothing to withdraw).
//! - At most [`MAX_PER_JOB`] entries per job: beyond, the entry that ends first is forgotten.
//!   A forgotten binding stays in tier 1 until its lifetime ends (its TTL plus grace) and is not
//!   withdrawn by an update; tier 2 re-checks the name against the new policy anyway.
//! - [`BindingLedger::rebind`] returns, per address whose rules change, the complete set of
//!   rules to install again (possibly none): the caller deletes the address's entry and installs
//!   these, so removed ports and names are gone from tier 1 — established flows to them
//!   included, as tier 1 cuts a flow whose entry is deleted.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use snas_bpf::PortRule;
use snas_wire::JobKey;

/// Most (address, name) bindings remembered per job.
pub const MAX_PER_JOB: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    rules: Vec<PortRule>,
    until: Duration,
}

/// Bindings by job, address and name.
#[derive(Debug, Default)]
pub struct BindingLedger {
    jobs: HashMap<JobKey, BTreeMap<IpAddr, BTreeMap<String, Entry>>>,
}

/// What to do with one address of a job after an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebind {
    /// The address.
    pub ip: IpAddr,
    /// The rules to install after deleting the address's entry, each with its remaining
    /// lifetime (empty: the address is withdrawn).
    pub install: Vec<(Vec<PortRule>, Duration)>,
}

impl BindingLedger {
    /// Remembers that `name` bound `ip` for `job` with `rules` until `until`.
    pub fn record(
        &mut self,
        job: JobKey,
        name: &str,
        ip: IpAddr,
        rules: &[PortRule],
        until: Duration,
    ) {
        let per_ip = self.jobs.entry(job).or_default();
        let entry = Entry {
            rules: rules.to_vec(),
            until,
        };
        let names = per_ip.entry(ip).or_default();
        match names.get_mut(name) {
            Some(e) => {
                e.until = e.until.max(until);
                e.rules = entry.rules;
            }
            None => {
                names.insert(name.to_owned(), entry);
            }
        }
        let total: usize = per_ip.values().map(BTreeMap::len).sum();
        if total > MAX_PER_JOB {
            evict_first_ending(per_ip);
        }
    }

    /// The changes an update of `job` needs: `rules_for(name)` gives the port rules the new
    /// policy allows for a name (empty: refused). Entries ended by `now` are dropped first;
    /// names the new policy refuses are forgotten.
    pub fn rebind(
        &mut self,
        job: JobKey,
        now: Duration,
        mut rules_for: impl FnMut(&str) -> Vec<PortRule>,
    ) -> Vec<Rebind> {
        let Some(per_ip) = self.jobs.get_mut(&job) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        per_ip.retain(|ip, names| {
            names.retain(|_, e| e.until > now);
            let mut changed = false;
            for (name, e) in names.iter_mut() {
                let new = rules_for(name);
                if new != e.rules {
                    changed = true;
                    e.rules = new;
                }
            }
            names.retain(|_, e| !e.rules.is_empty());
            if changed {
                out.push(Rebind {
                    ip: *ip,
                    install: names
                        .values()
                        .map(|e| (e.rules.clone(), e.until.saturating_sub(now)))
                        .collect(),
                });
            }
            !names.is_empty()
        });
        if per_ip.is_empty() {
            self.jobs.remove(&job);
        }
        out
    }

    /// Forgets a job (deleted).
    pub fn forget_job(&mut self, job: JobKey) {
        self.jobs.remove(&job);
    }

    /// Forgets entries ended by `now`.
    pub fn sweep(&mut self, now: Duration) {
        self.jobs.retain(|_, per_ip| {
            per_ip.retain(|_, names| {
                names.retain(|_, e| e.until > now);
                !names.is_empty()
            });
            !per_ip.is_empty()
        });
    }

    /// The name `job` resolved to `ip`, as of `now` (for audit lines of tier-1 events): a name
    /// bound with ports first, else one audit mode let through unbound (recorded with no
    /// rules); among several, the first in name order. `None` when no live entry names it.
    pub fn name_of(&self, job: JobKey, ip: IpAddr, now: Duration) -> Option<&str> {
        let names = self.jobs.get(&job)?.get(&ip)?;
        let live = || names.iter().filter(|(_, e)| e.until > now);
        live()
            .find(|(_, e)| !e.rules.is_empty())
            .or_else(|| live().next())
            .map(|(n, _)| n.as_str())
    }

    /// Bindings remembered for `job`.
    pub fn len_of(&self, job: JobKey) -> usize {
        self.jobs
            .get(&job)
            .map_or(0, |m| m.values().map(BTreeMap::len).sum())
    }
}

fn evict_first_ending(per_ip: &mut BTreeMap<IpAddr, BTreeMap<String, Entry>>) {
    let first = per_ip
        .iter()
        .flat_map(|(ip, names)| names.iter().map(move |(n, e)| (e.until, *ip, n.clone())))
        .min();
    if let Some((_, ip, name)) = first {
        if let Some(names) = per_ip.get_mut(&ip) {
            names.remove(&name);
            if names.is_empty() {
                per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snas_wire::RuleProtocol;

    const JOB: JobKey = JobKey(7);

    fn tcp(port: u16) -> PortRule {
        PortRule::port(RuleProtocol::Tcp, port)
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[test]
    fn the_name_of_an_address_is_the_bound_one_first_then_an_unbound_one_until_it_ends() {
        let mut l = BindingLedger::default();
        for i in 0..200u8 {
            // Audit mode: a name let through unbound (no rules), on its own address.
            l.record(JOB, &format!("n{i}.example.net"), ip(i), &[], s(60));
        }
        // A CDN address shared by a name bound with ports and one let through unbound.
        l.record(JOB, "a-unbound.example.com", ip(1), &[], s(60));
        l.record(JOB, "z-bound.example.com", ip(1), &[tcp(443)], s(60));
        assert_eq!(l.name_of(JOB, ip(1), s(10)), Some("z-bound.example.com"));
        for i in 2..200u8 {
            let want = format!("n{i}.example.net");
            assert_eq!(l.name_of(JOB, ip(i), s(10)), Some(want.as_str()));
        }
        assert_eq!(
            l.name_of(JobKey(8), ip(2), s(10)),
            None,
            "another job's name"
        );
        assert_eq!(l.name_of(JOB, ip(2), s(60)), None, "ended");
        assert_eq!(l.name_of(JOB, IpAddr::from([198, 51, 100, 1]), s(10)), None);
    }

    #[test]
    fn an_unchanged_policy_changes_nothing() {
        let mut l = BindingLedger::default();
        l.record(JOB, "api.example.com", ip(1), &[tcp(443)], s(100));
        assert!(l.rebind(JOB, s(10), |_| vec![tcp(443)]).is_empty());
        assert_eq!(l.len_of(JOB), 1);
    }

    #[test]
    fn a_removed_name_withdraws_its_address_and_keeps_names_sharing_it() {
        let mut l = BindingLedger::default();
        // Two names on one address (a CDN), one name alone on another.
        l.record(JOB, "a.example.com", ip(1), &[tcp(443)], s(100));
        l.record(JOB, "b.example.com", ip(1), &[tcp(80)], s(50));
        l.record(JOB, "a.example.com", ip(2), &[tcp(443)], s(100));
        let mut r = l.rebind(JOB, s(10), |n| {
            if n == "b.example.com" {
                vec![tcp(80)]
            } else {
                Vec::new()
            }
        });
        r.sort_by_key(|r| r.ip);
        assert_eq!(
            r,
            [
                Rebind {
                    ip: ip(1),
                    install: vec![(vec![tcp(80)], s(40))]
                },
                Rebind {
                    ip: ip(2),
                    install: vec![]
                },
            ]
        );
        assert_eq!(l.len_of(JOB), 1);
    }

    #[test]
    fn changed_ports_reinstall_the_address_with_the_new_rules() {
        let mut l = BindingLedger::default();
        l.record(JOB, "a.example.com", ip(1), &[tcp(443), tcp(80)], s(100));
        let r = l.rebind(JOB, s(0), |_| vec![tcp(443)]);
        assert_eq!(r[0].install, vec![(vec![tcp(443)], s(100))]);
    }

    #[test]
    fn ended_bindings_are_not_reinstalled() {
        let mut l = BindingLedger::default();
        l.record(JOB, "a.example.com", ip(1), &[tcp(443)], s(10));
        assert!(l.rebind(JOB, s(10), |_| Vec::new()).is_empty());
        assert_eq!(l.len_of(JOB), 0);
        l.record(JOB, "a.example.com", ip(1), &[tcp(443)], s(30));
        l.sweep(s(30));
        assert_eq!(l.len_of(JOB), 0);
    }

    #[test]
    fn a_later_answer_extends_a_binding_and_the_bound_drops_the_first_ending() {
        let mut l = BindingLedger::default();
        l.record(JOB, "a.example.com", ip(1), &[tcp(443)], s(10));
        l.record(JOB, "a.example.com", ip(1), &[tcp(443)], s(5));
        assert!(l.rebind(JOB, s(8), |_| vec![tcp(443)]).is_empty());
        assert_eq!(l.len_of(JOB), 1);
        for i in 0..MAX_PER_JOB as u32 {
            let a = IpAddr::from((0xC633_6400u32 + i).to_be_bytes());
            l.record(
                JOB,
                "many.example.com",
                a,
                &[tcp(443)],
                s(1000 + u64::from(i)),
            );
        }
        assert_eq!(l.len_of(JOB), MAX_PER_JOB);
        // The first-ending one (ip(1), until 10 s) went.
        assert!(l
            .rebind(JOB, s(8), |n| if n == "a.example.com" {
                Vec::new()
            } else {
                vec![tcp(443)]
            })
            .is_empty());
        l.forget_job(JOB);
        assert_eq!(l.len_of(JOB), 0);
    }
}
