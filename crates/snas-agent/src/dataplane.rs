//! The production [`Dataplane`]: tier-1 eBPF through `snas_bpf::Tier1`.
//!
//! Owns the translation from a verified policy and a job network to tier 1's job configuration
//! and map entries: identity (job key, tenant id, serial), addresses and MACs of both veth ends,
//! limits (egress rate, new-connection rate and burst, connection cap), the policy's expiry,
//! the node's per-job DNS packet budget (`dns_packets_per_sec`/`dns_packet_burst`), the
//! policy's IPv4 `cidr` rules with their ports, its deny `cidr` rules (IPv4 and IPv6, checked by
//! tier 1 before any allow entry) and its mode (`audit`: tier 1's per-job audit flag); and the
//! node-wide duties: the infrastructure
//! set and the periodic flow ageing ([`snas_bpf::FlowTimeouts`] defaults, tier 2's conntrack
//! timeouts). Programs and maps are pinned under `bpf_pin_dir`, so a restarted agent re-opens
//! them and adopts jobs without resetting their state.
//!
//! # Limits
//! - `host` rules are enforced through the addresses the DNS stub installs
//!   ([`Dataplane::allow_resolved`], with the answer's TTL); a host allowed only by name is
//!   denied until the job resolves it.
//! - Sandboxes get no IPv6 address yet (the job pool is IPv4), so IPv6 `cidr` rules are not
//!   programmed and tier 1 drops the sandbox's IPv6 as `ipv6_denied`.
//! - The DNS stub port is [`DNS_STUB_PORT`] on the gateway address (served by `crate::stub`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use snas_bpf::{FlowTimeouts, JobConfig, NodeConfig, PacketBudget, PortRule, ProxyEntry, Tier1};
use snas_policy::{EgressRule, Mode};
use snas_wire::{JobKey, Reason};

use crate::config::AgentConfig;
use crate::jobnet::JobNetInfo;
use crate::netlink::Rtnl;
use crate::seams::{Dataplane, DataplaneError, JobAttachment};

/// Port of the job's DNS stub on its gateway address.
pub const DNS_STUB_PORT: u16 = 53;

fn err(what: &str) -> impl FnOnce(snas_bpf::Tier1Error) -> DataplaneError + '_ {
    move |e| DataplaneError(format!("{what}: {e}"))
}

/// Tier 1 for this node.
#[derive(Debug)]
pub struct Tier1Dataplane {
    tier1: Mutex<Tier1>,
    /// Every job's DNS packet budget in tier 1 (`None` only for [`Tier1Dataplane::from_tier1`]).
    dns_budget: Option<PacketBudget>,
    /// Idle times of the ageing pass.
    flow_timeouts: FlowTimeouts,
}

impl Tier1Dataplane {
    /// Loads (or re-opens, keeping pinned state) tier 1 for the node described by `config`,
    /// attaches the uplink program and installs the configured proxies.
    pub fn load(config: &AgentConfig) -> Result<Tier1Dataplane, DataplaneError> {
        snas_bpf::ensure_bpffs().map_err(err("mount bpffs"))?;
        let uplink = Rtnl::open()
            .and_then(|mut r| r.link_index(&config.underlay_interface))
            .map_err(|e| DataplaneError(format!("underlay_interface: {e}")))?
            .ok_or_else(|| {
                DataplaneError(format!(
                    "underlay_interface: no interface {}",
                    config.underlay_interface
                ))
            })?;
        let mut node = NodeConfig::new(
            &config.node_name,
            uplink,
            config.underlay_address,
            config.underlay_mtu,
        );
        node.pin_dir = config.bpf_pin_dir.clone();
        let tier1 = Tier1::load(&node).map_err(err("load tier 1"))?;
        let proxies: Vec<ProxyEntry> = config
            .proxy_v4()
            .into_iter()
            .map(ProxyEntry::active)
            .collect();
        tier1.set_proxies(&proxies).map_err(err("set proxies"))?;
        uplink_pacing(config);
        Tier1Dataplane::from_tier1(tier1).with_config(config)
    }

    /// Wraps an already loaded tier 1 (tests and benchmarks). Jobs get no DNS packet budget
    /// in tier 1 unless [`Tier1Dataplane::with_config`] gives the node's.
    pub fn from_tier1(tier1: Tier1) -> Tier1Dataplane {
        Tier1Dataplane {
            tier1: Mutex::new(tier1),
            dns_budget: None,
            flow_timeouts: FlowTimeouts::default(),
        }
    }

    /// Takes the per-job settings of the node's configuration (the DNS packet budget).
    pub fn with_config(mut self, config: &AgentConfig) -> Result<Tier1Dataplane, DataplaneError> {
        self.dns_budget = Some(
            PacketBudget::new(config.dns_packets_per_sec, config.dns_packet_burst).ok_or_else(
                || {
                    DataplaneError(
                        "dns_packets_per_sec: the DNS packet rate and burst must be at least 1"
                            .into(),
                    )
                },
            )?,
        );
        Ok(self)
    }

    fn tier1(&self) -> std::sync::MutexGuard<'_, Tier1> {
        self.tier1.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Puts `fq` on the uplink (where the kernel has it and the configuration asks for it) so that
/// tier 1's EDT stamps pace the job's traffic. Without fq the stamps are carried and ignored:
/// the horizon still bounds each job and the proxies pace, so the agent goes on either way.
fn uplink_pacing(config: &AgentConfig) {
    if !config.install_fq {
        tracing::info!(uplink = %config.underlay_interface, "install_fq = false: the uplink's qdisc is left as it is");
        return;
    }
    match snas_bpf::fq_available() {
        Ok(true) => match snas_bpf::install_fq(&config.underlay_interface) {
            Ok(()) => tracing::info!(uplink = %config.underlay_interface, "fq installed on the uplink: EDT pacing active"),
            Err(e) => tracing::warn!(uplink = %config.underlay_interface, error = %e, "fq could not be installed on the uplink: EDT stamps are not paced here"),
        },
        Ok(false) => tracing::info!("this kernel has no fq qdisc: EDT stamps are carried but not paced on the node (the proxies pace)"),
        Err(e) => tracing::warn!(error = %e, "fq probe failed: EDT stamps are not paced on the node"),
    }
}

/// Tier 1's job configuration for a job, with the node's DNS packet budget.
pub fn job_config(
    job: &JobAttachment<'_>,
    dns_budget: Option<PacketBudget>,
) -> Result<JobConfig, DataplaneError> {
    let claims = job.policy.claims.as_ref().ok_or_else(|| {
        DataplaneError("the policy carries no claims (not verified by snas-policy)".into())
    })?;
    let l = &claims.limits;
    let net: &JobNetInfo = job.net;
    Ok(JobConfig {
        veth_ifindex: net.host_ifindex,
        job_key: job.policy.job_key,
        tenant_id: job.policy.tenant_id,
        policy_serial: job.policy.serial,
        sandbox_ip: net.sandbox,
        sandbox_mac: net.sandbox_mac,
        host_mac: net.host_mac,
        gateway_ip: net.gateway,
        dns_port: DNS_STUB_PORT,
        // A policy's limits are `Bps` (never zero): every job is stamped and policed.
        egress: Some(l.egress_bps),
        ingress: Some(l.ingress_bps),
        horizon: None,
        new_conn_per_sec: u64::from(l.new_connections_per_sec),
        new_conn_burst: u64::from(l.new_connections_burst),
        max_connections: l.max_connections,
        // IPv6 goes through tier 1 for a dual-stack job whose policy can allow an IPv6
        // destination: an IPv6 CIDR rule, or a host rule (its name may have AAAA records,
        // which the DNS stub installs as they are answered).
        ipv6_rules: net.sandbox6.is_some()
            && claims.egress.iter().any(|r| match r {
                EgressRule::Cidr { cidr, .. } => cidr.addr().is_ipv6(),
                EgressRule::Host { .. } => true,
            }),
        sandbox_ip6: net.sandbox6,
        expires_at: Some(job.policy.expires_at()),
        dns_budget,
        audit_mode: claims.mode == Mode::Audit,
    })
}

/// The policy's deny `cidr` rules as tier 1 takes them (IPv4 and IPv6: a deny rule costs
/// nothing to a job whose sandbox has no IPv6).
pub fn deny_rules(job: &JobAttachment<'_>) -> Vec<(ipnet::IpNet, PortRule)> {
    let Some(claims) = job.policy.claims.as_ref() else {
        return Vec::new();
    };
    claims
        .deny
        .iter()
        .filter_map(|d| match d.rule() {
            EgressRule::Cidr {
                cidr,
                ports,
                protocol,
                ..
            } => Some((
                *cidr,
                PortRule {
                    proto: *protocol,
                    lo: ports.lo(),
                    hi: ports.hi(),
                },
            )),
            EgressRule::Host { .. } => None,
        })
        .collect()
}

/// The policy's CIDR rules grouped per (network, allow_private), as tier 1 takes them. IPv6
/// networks only for a dual-stack job: an IPv4-only sandbox cannot use them.
pub fn cidr_rules(job: &JobAttachment<'_>) -> BTreeMap<(ipnet::IpNet, bool), Vec<PortRule>> {
    let mut out: BTreeMap<(ipnet::IpNet, bool), Vec<PortRule>> = BTreeMap::new();
    let Some(claims) = job.policy.claims.as_ref() else {
        return out;
    };
    let ipv6 = job.net.sandbox6.is_some();
    for rule in &claims.egress {
        if let EgressRule::Cidr {
            cidr,
            ports,
            protocol,
            allow_private,
        } = rule
        {
            if cidr.addr().is_ipv6() && !ipv6 {
                continue;
            }
            let proto = *protocol;
            out.entry((*cidr, *allow_private))
                .or_default()
                .push(PortRule {
                    proto,
                    lo: ports.lo(),
                    hi: ports.hi(),
                });
        }
    }
    out
}

/// Writes one CIDR allow entry into the map of its family.
fn allow_net(
    t: &Tier1,
    job_key: JobKey,
    net: ipnet::IpNet,
    rules: &[PortRule],
    allow_private: bool,
) -> Result<(), DataplaneError> {
    match net {
        ipnet::IpNet::V4(n) => t.allow_cidr(job_key, n, rules, allow_private),
        ipnet::IpNet::V6(n) => t.allow_cidr6(job_key, n, rules, allow_private),
    }
    .map_err(err(&format!("allow {net}")))
}

/// Removes one CIDR allow entry from the map of its family.
fn revoke_net(t: &Tier1, job_key: JobKey, net: ipnet::IpNet) -> Result<(), DataplaneError> {
    match net {
        ipnet::IpNet::V4(n) => t.revoke_cidr(job_key, n),
        ipnet::IpNet::V6(n) => t.revoke_cidr6(job_key, n),
    }
    .map_err(err(&format!("revoke {net}")))
}

impl Tier1Dataplane {
    fn program_rules(&self, t: &Tier1, job: &JobAttachment<'_>) -> Result<(), DataplaneError> {
        // Deny rules first: an allow entry never exists without the deny entries that cut it.
        t.set_deny(job.policy.job_key, &deny_rules(job))
            .map_err(err("deny rules"))?;
        for ((net, allow_private), rules) in cidr_rules(job) {
            allow_net(t, job.policy.job_key, net, &rules, allow_private)?;
        }
        Ok(())
    }
}

impl Dataplane for Tier1Dataplane {
    fn attach_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError> {
        let cfg = job_config(job, self.dns_budget)?;
        let t = self.tier1();
        self.program_rules(&t, job)?;
        t.attach_job(&cfg).map_err(err("attach job"))
    }

    fn adopt_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError> {
        let cfg = job_config(job, self.dns_budget)?;
        let t = self.tier1();
        self.program_rules(&t, job)?;
        t.adopt_job(&cfg).map_err(err("adopt job"))
    }

    fn update_job(
        &self,
        old: &JobAttachment<'_>,
        new: &JobAttachment<'_>,
    ) -> Result<(), DataplaneError> {
        let cfg = job_config(new, self.dns_budget)?;
        let (before, after) = (cidr_rules(old), cidr_rules(new));
        let t = self.tier1();
        // The new deny rules first (nothing the new policy denies stays open while the rest
        // changes), then added and changed CIDR rules, then the configuration (serial, limits,
        // expiry, the audit flag: the job's state is kept), then the removed CIDR rules: a
        // destination both policies allow is never closed in between.
        t.set_deny(new.policy.job_key, &deny_rules(new))
            .map_err(err("deny rules"))?;
        for (key @ (net, allow_private), rules) in &after {
            if before.get(key) != Some(rules) {
                allow_net(&t, new.policy.job_key, *net, rules, *allow_private)?;
            }
        }
        t.configure_job(&cfg).map_err(err("configure job"))?;
        for (net, allow_private) in before.keys() {
            // One LPM entry per network: the same network with the other `allow_private`
            // flag was rewritten above and must stay.
            if !after.contains_key(&(*net, *allow_private))
                && !after.contains_key(&(*net, !*allow_private))
            {
                revoke_net(&t, new.policy.job_key, *net)?;
            }
        }
        Ok(())
    }

    fn revoke_resolved(&self, job_key: JobKey, ip: IpAddr) -> Result<(), DataplaneError> {
        let t = self.tier1();
        match ip {
            IpAddr::V4(v4) => t.revoke_ip(job_key, v4),
            IpAddr::V6(v6) => t.revoke_ip6(job_key, v6),
        }
        .map_err(err(&format!("revoke {ip}")))
    }

    fn detach_job(&self, job_key: JobKey, _net: &JobNetInfo) -> Result<(), DataplaneError> {
        match self.tier1().detach_job_by_key(job_key) {
            Ok(_) | Err(snas_bpf::Tier1Error::UnknownJobKey(_)) => Ok(()),
            Err(e) => Err(DataplaneError(format!("detach job: {e}"))),
        }
    }

    fn allow_resolved(
        &self,
        job_key: JobKey,
        ip: IpAddr,
        rules: &[PortRule],
        ttl: Duration,
    ) -> Result<(), DataplaneError> {
        let t = self.tier1();
        match ip {
            IpAddr::V4(v4) => t
                .allow_ip(job_key, v4, rules, Some(ttl))
                .map_err(err(&format!("allow {ip}"))),
            IpAddr::V6(v6) => t
                .allow_ip6(job_key, v6, rules, Some(ttl))
                .map_err(err(&format!("allow {ip}"))),
        }
    }

    fn set_proxies(&self, proxies: &[ProxyEntry]) -> Result<(), DataplaneError> {
        self.tier1()
            .set_proxies(proxies)
            .map_err(err("set proxies"))
    }

    fn set_infrastructure(&self, nets: &[ipnet::IpNet]) -> Result<(), DataplaneError> {
        self.tier1()
            .set_infrastructure(nets)
            .map_err(err("set infrastructure"))
    }

    fn age_flows(&self) -> Result<(), DataplaneError> {
        self.tier1()
            .age_flows(&self.flow_timeouts)
            .map(|_| ())
            .map_err(err("age flows"))
    }

    fn run_audit(
        &self,
        on_event: Box<dyn FnMut(snas_bpf::AuditEvent) + Send>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), DataplaneError> {
        // The ring buffer keeps its own mapping: the tier-1 lock is held only to build it.
        let reader = self
            .tier1()
            .audit_reader(on_event)
            .map_err(err("audit reader"))?;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            reader
                .poll(Duration::from_millis(200))
                .map_err(err("audit poll"))?;
        }
        Ok(())
    }

    fn counters(&self, job_key: JobKey) -> Result<BTreeMap<Reason, u64>, DataplaneError> {
        let c = self.tier1().counters(job_key).map_err(err("counters"))?;
        let mut out: BTreeMap<Reason, u64> = Reason::ALL.iter().map(|r| (*r, 0)).collect();
        for dir in [&c.from_sandbox, &c.to_sandbox] {
            for (r, n) in &dir.drops {
                *out.entry(*r).or_default() += n.packets;
            }
        }
        Ok(out)
    }
}
