//! A job's destinations: exact addresses learned from DNS (merged per address, each rule with
//! its own expiry, see [`crate::binding`]) and CIDR rules, for IPv4 and IPv6; and its deny CIDR
//! rules ([`Tier1::set_deny`]), which the programs check before any of those.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libbpf_rs::{MapCore, MapHandle};

use super::maps::{delete_where, lookup, update};
use super::{mono_now, Tier1, Tier1Error};
use crate::binding::{self, TimedRule};
use crate::config::{JobKey, PortRule, MAX_PORT_RULES};
use crate::pod::{bytes_of, Pod};
use crate::skel::types;

impl Tier1 {
    /// Allows `ip` for the job on `rules` until `ttl` from now (`None`: until revoked), for new
    /// connections; packets of established flows are never cut by the expiry. DNS answers use
    /// this with the binding lifetime. The address keeps the rules other names installed on it
    /// (each with its own expiry); an identical rule is refreshed to the later expiry. An entry
    /// holds [`MAX_PORT_RULES`]: beyond, the rule that expires first is replaced
    /// ([`Tier1::displaced_port_rules`]). At most [`MAX_PORT_RULES`] rules per call.
    pub fn allow_ip(
        &self,
        job_key: JobKey,
        ip: Ipv4Addr,
        rules: &[PortRule],
        ttl: Option<Duration>,
    ) -> Result<(), Tier1Error> {
        let job_key = job_key.get();
        let key = types::dst_key {
            job_key,
            ip: u32::from_ne_bytes(ip.octets()),
            _pad0: 0,
        };
        self.merge_binding(&self.maps.dst_exact, &key, rules, ttl, "snas_dst_exact")
    }

    /// The read-merge-write of a DNS-learned entry (see [`crate::binding`]).
    fn merge_binding<K: Pod>(
        &self,
        map: &MapHandle,
        key: &K,
        rules: &[PortRule],
        ttl: Option<Duration>,
        name: &'static str,
    ) -> Result<(), Tier1Error> {
        if rules.len() > MAX_PORT_RULES {
            return Err(Tier1Error::TooManyPortRules(rules.len()));
        }
        let now = mono_now()?;
        let now_s = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        let expires_s = ttl.map(|ttl| expiry_seconds(now.saturating_add(ttl)));
        let _w = self.writers();
        let old: Option<types::dst_val> = lookup(map, key, name)?;
        let existing: Vec<TimedRule> = old
            .iter()
            .flat_map(|v| v.rules.iter().take(v.nrules as usize))
            .map(|c| {
                let (rule, expires_s) = PortRule::from_c(c);
                TimedRule { rule, expires_s }
            })
            .collect();
        let merged = binding::merge(&existing, rules, expires_s, now_s);
        self.displaced_rules
            .fetch_add(merged.displaced, Ordering::Relaxed);
        let mut v = types::dst_val {
            nrules: merged.rules.len() as u32,
            flags: 0,
            ..Default::default()
        };
        for (slot, t) in v.rules.iter_mut().zip(&merged.rules) {
            *slot = t.rule.to_c(t.expires_s);
        }
        update(map, key, &v, name)
    }

    /// Live port rules that did not fit an address's entry since this handle was opened
    /// (see [`Tier1::allow_ip`]).
    pub fn displaced_port_rules(&self) -> u64 {
        self.displaced_rules.load(Ordering::Relaxed)
    }

    /// Removes an exact-IP entry.
    pub fn revoke_ip(&self, job_key: JobKey, ip: Ipv4Addr) -> Result<(), Tier1Error> {
        let job_key = job_key.get();
        let key = types::dst_key {
            job_key,
            ip: u32::from_ne_bytes(ip.octets()),
            _pad0: 0,
        };
        let _ = self.maps.dst_exact.delete(bytes_of(&key));
        Ok(())
    }

    /// Allows the CIDR `net` for the job on `rules`. `allow_private` must come from a signed
    /// `allow_private = true` rule: only then may the entry open always-denied ranges.
    pub fn allow_cidr(
        &self,
        job_key: JobKey,
        net: Ipv4Net,
        rules: &[PortRule],
        allow_private: bool,
    ) -> Result<(), Tier1Error> {
        let key = cidr_key(job_key, net);
        let val = dst_val(rules, allow_private)?;
        update(&self.maps.dst_cidr, &key, &val, "snas_dst_cidr")
    }

    /// Removes a CIDR entry.
    pub fn revoke_cidr(&self, job_key: JobKey, net: Ipv4Net) -> Result<(), Tier1Error> {
        let _ = self.maps.dst_cidr.delete(bytes_of(&cidr_key(job_key, net)));
        Ok(())
    }

    /// [`Tier1::allow_ip`] for an IPv6 address (used only for jobs with IPv6 rules).
    pub fn allow_ip6(
        &self,
        job_key: JobKey,
        ip: Ipv6Addr,
        rules: &[PortRule],
        ttl: Option<Duration>,
    ) -> Result<(), Tier1Error> {
        let job_key = job_key.get();
        let key = types::dst6_key {
            job_key,
            ip: ip.octets(),
        };
        self.merge_binding(&self.maps.dst6_exact, &key, rules, ttl, "snas_dst6_exact")
    }

    /// Removes an exact IPv6 entry.
    pub fn revoke_ip6(&self, job_key: JobKey, ip: Ipv6Addr) -> Result<(), Tier1Error> {
        let job_key = job_key.get();
        let key = types::dst6_key {
            job_key,
            ip: ip.octets(),
        };
        let _ = self.maps.dst6_exact.delete(bytes_of(&key));
        Ok(())
    }

    /// [`Tier1::allow_cidr`] for an IPv6 prefix.
    pub fn allow_cidr6(
        &self,
        job_key: JobKey,
        net: Ipv6Net,
        rules: &[PortRule],
        allow_private: bool,
    ) -> Result<(), Tier1Error> {
        let key = cidr6_key(job_key, net);
        let val = dst_val(rules, allow_private)?;
        update(&self.maps.dst6_cidr, &key, &val, "snas_dst6_cidr")
    }

    /// Sets the job's deny CIDR rules (`[[deny]]` cidr rules: network, protocol, ports),
    /// replacing those it had: new entries are written before the old ones that are no longer
    /// wanted are removed, so a rule present in both sets never lapses. The programs check
    /// them before any allow entry, established flows included, and drop a match as
    /// `deny_rule`. Because an LPM lookup finds only the longest matching prefix, every entry
    /// carries the rules of the job's deny prefixes that contain it ([`deny_entries`]); an
    /// entry that would need more than [`MAX_PORT_RULES`] rules denies every port and protocol
    /// instead (more than asked, never less).
    pub fn set_deny(&self, job_key: JobKey, rules: &[(IpNet, PortRule)]) -> Result<(), Tier1Error> {
        let entries = deny_entries(rules);
        let _w = self.writers();
        let mut keep4 = Vec::new();
        let mut keep6 = Vec::new();
        for (net, rules) in &entries {
            let val = dst_val(rules, false)?;
            match net {
                IpNet::V4(n) => {
                    let key = cidr_key(job_key, *n);
                    update(&self.maps.deny_cidr, &key, &val, "snas_deny_cidr")?;
                    keep4.push(key);
                }
                IpNet::V6(n) => {
                    let key = cidr6_key(job_key, *n);
                    update(&self.maps.deny6_cidr, &key, &val, "snas_deny6_cidr")?;
                    keep6.push(key);
                }
            }
        }
        delete_where::<types::cidr_key>(&self.maps.deny_cidr, |k| {
            cidr_job(k) == job_key && !keep4.iter().any(|x| bytes_of(x) == bytes_of(k))
        });
        delete_where::<types::cidr6_key>(&self.maps.deny6_cidr, |k| {
            cidr6_job(k) == job_key && !keep6.iter().any(|x| bytes_of(x) == bytes_of(k))
        });
        Ok(())
    }

    /// Removes an IPv6 CIDR entry.
    pub fn revoke_cidr6(&self, job_key: JobKey, net: Ipv6Net) -> Result<(), Tier1Error> {
        let _ = self
            .maps
            .dst6_cidr
            .delete(bytes_of(&cidr6_key(job_key, net)));
        Ok(())
    }
}

fn cidr_key(job_key: JobKey, net: Ipv4Net) -> types::cidr_key {
    let (job_key, net) = (job_key.get(), net.trunc());
    types::cidr_key {
        prefixlen: 64 + u32::from(net.prefix_len()),
        job_hi: ((job_key >> 32) as u32).to_be(),
        job_lo: (job_key as u32).to_be(),
        ip: u32::from_ne_bytes(net.network().octets()),
    }
}

fn cidr6_key(job_key: JobKey, net: Ipv6Net) -> types::cidr6_key {
    let (job_key, net) = (job_key.get(), net.trunc());
    types::cidr6_key {
        prefixlen: 64 + u32::from(net.prefix_len()),
        job_hi: ((job_key >> 32) as u32).to_be(),
        job_lo: (job_key as u32).to_be(),
        ip: net.network().octets(),
    }
}

pub(super) fn cidr_job(k: &types::cidr_key) -> JobKey {
    JobKey((u64::from(u32::from_be(k.job_hi)) << 32) | u64::from(u32::from_be(k.job_lo)))
}

pub(super) fn cidr6_job(k: &types::cidr6_key) -> JobKey {
    JobKey((u64::from(u32::from_be(k.job_hi)) << 32) | u64::from(u32::from_be(k.job_lo)))
}

/// The deny map entries of a job's deny rules: one per distinct prefix, holding the rules of
/// every given prefix that contains it (itself included), deduplicated; more than
/// [`MAX_PORT_RULES`] become one rule for every port and protocol.
fn deny_entries(rules: &[(IpNet, PortRule)]) -> Vec<(IpNet, Vec<PortRule>)> {
    let mut nets: Vec<IpNet> = rules.iter().map(|(n, _)| n.trunc()).collect();
    nets.sort();
    nets.dedup();
    nets.into_iter()
        .map(|net| {
            let mut out: Vec<PortRule> = Vec::new();
            for (outer, r) in rules {
                if outer.trunc().contains(&net) && !out.contains(r) {
                    out.push(*r);
                }
            }
            if out.len() > MAX_PORT_RULES {
                out = vec![PortRule::all(crate::RuleProtocol::Any)];
            }
            (net, out)
        })
        .collect()
}

/// A CIDR entry: rules without expiry.
fn dst_val(rules: &[PortRule], allow_private: bool) -> Result<types::dst_val, Tier1Error> {
    if rules.len() > MAX_PORT_RULES {
        return Err(Tier1Error::TooManyPortRules(rules.len()));
    }
    let mut v = types::dst_val {
        nrules: rules.len() as u32,
        flags: u32::from(allow_private),
        ..Default::default()
    };
    for (slot, r) in v.rules.iter_mut().zip(rules) {
        *slot = r.to_c(None);
    }
    Ok(v)
}

/// Whole CLOCK_MONOTONIC seconds of an expiry, rounded up (a rule never ends early), at least
/// 1 (0 means "no expiry" to the programs).
fn expiry_seconds(at: Duration) -> u32 {
    let s = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    u32::try_from(s).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::MAX_PORT_RULES;

    #[test]
    fn cidr_key_carries_the_job_and_the_truncated_prefix() {
        let net: Ipv4Net = "203.0.113.77/24".parse().expect("net");
        let k = cidr_key(JobKey(0x0102_0304_0506_0708), net);
        assert_eq!(k.prefixlen, 64 + 24);
        assert_eq!(cidr_job(&k), JobKey(0x0102_0304_0506_0708));
        assert_eq!(k.ip.to_ne_bytes(), [203, 0, 113, 0]);
        assert_eq!(k.job_hi.to_ne_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn too_many_port_rules_are_refused() {
        let rules = vec![PortRule::all(crate::RuleProtocol::Any); MAX_PORT_RULES + 1];
        assert!(matches!(
            dst_val(&rules, false),
            Err(Tier1Error::TooManyPortRules(17))
        ));
        let v = dst_val(&rules[..2], true).expect("fits");
        assert_eq!((v.nrules, v.flags, v.rules[0].expires_s), (2, 1, 0));
    }

    #[test]
    fn rule_expiries_round_up_to_whole_seconds() {
        assert_eq!(expiry_seconds(Duration::from_secs(90)), 90);
        assert_eq!(expiry_seconds(Duration::from_millis(90_001)), 91);
        assert_eq!(expiry_seconds(Duration::ZERO), 1, "0 would mean never");
        assert_eq!(expiry_seconds(Duration::from_secs(u64::MAX / 2)), u32::MAX);
    }

    #[test]
    fn deny_entries_carry_the_rules_of_every_containing_prefix() {
        use crate::RuleProtocol::{Any, Tcp, Udp};
        let n = |s: &str| -> IpNet { s.parse().expect("net") };
        let ssh = PortRule::port(Tcp, 22);
        let dns = PortRule::port(Udp, 53);
        let e = deny_entries(&[
            (n("203.0.113.0/24"), ssh),
            (n("203.0.113.128/25"), dns),
            (n("203.0.113.128/25"), dns),
            (n("2001:db8::/32"), PortRule::all(Any)),
            (n("198.51.100.0/24"), dns),
        ]);
        assert_eq!(
            e,
            vec![
                (n("198.51.100.0/24"), vec![dns]),
                (n("203.0.113.0/24"), vec![ssh]),
                (n("203.0.113.128/25"), vec![ssh, dns]),
                (n("2001:db8::/32"), vec![PortRule::all(Any)]),
            ]
        );
        // Seventeen rules on one prefix: every port of every protocol instead.
        let many: Vec<(IpNet, PortRule)> = (1..=17)
            .map(|p| (n("192.0.2.0/24"), PortRule::port(Tcp, p)))
            .collect();
        assert_eq!(
            deny_entries(&many),
            vec![(n("192.0.2.0/24"), vec![PortRule::all(Any)])]
        );
    }
}
