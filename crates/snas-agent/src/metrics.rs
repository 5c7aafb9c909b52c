//! Agent metrics in the Prometheus text exposition format 0.0.4 (`GET /metrics`), encoded by
//! prometheus-client.
//!
//! Owns [`render`], which encodes one scrape: everything but the job set-up latency is read at
//! scrape time into a [`Snapshot`] (jobs and how many expired, tier-1 drops per job and reason
//! from the pinned counters, DNS outcomes and cache, proxy health, audit queue figures, policy
//! endpoint, job-ended and policy-update notice outcomes, the periodic work, where the listening sockets came
//! from) and written by a prometheus-client `Collector` as constant samples; the set-up latency
//! is a prometheus-client [`Histogram`] the job table observes into
//! (`Agent::setup_latency`).
//!
//! # Choice
//! A collector over a snapshot, not live counters in a registry: the figures already live
//! where they are counted (atomics of the DNS stub, the proxy table, the pinned BPF maps), so
//! nothing on the DNS path takes a registry lock and nothing is counted twice.
//!
//! # Invariants
//! Family names, types and labels are those documented in `docs/agent.md` (counters are
//! registered without their `_total`, which the encoder appends); families are written in a
//! fixed order, and a family without samples still has its `# HELP`/`# TYPE` lines.
//!
//! # Limits
//! Per-job series are emitted only for reasons with a non-zero count, so a node with many jobs
//! does not export `jobs × reasons` zero series.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use snas_proxy::metrics::Families;
use snas_wire::Reason;

use crate::api::types::DnsView;
use crate::proxies::{Health, ProxyTable};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Everything a scrape shows, gathered by the caller.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Jobs (running and expired).
    pub jobs: usize,
    /// Jobs whose policy has expired.
    pub jobs_expired: usize,
    /// Tier-1 drops per job key (hex) and reason.
    pub drops: BTreeMap<String, BTreeMap<Reason, u64>>,
    /// The DNS stub's figures.
    pub dns: Option<DnsView>,
    /// The proxy table.
    pub proxies: Option<ProxyTable>,
    /// Audit records queued.
    pub audit_emitted: u64,
    /// Audit records dropped.
    pub audit_dropped: u64,
    /// Policy endpoint requests by outcome.
    pub policy_requests: BTreeMap<&'static str, u64>,
    /// Job-ended notices to proxies by outcome.
    pub end_notices: BTreeMap<&'static str, u64>,
    /// Policy-update notices to proxies by outcome.
    pub update_notices: BTreeMap<&'static str, u64>,
    /// Periodic work.
    pub upkeep: crate::upkeep::UpkeepCounts,
    /// Listening socket → where it came from at start.
    pub sockets: BTreeMap<&'static str, &'static str>,
}

/// One scrape: the snapshot and the set-up histogram, encoded in the documented order.
#[derive(Debug)]
struct Scrape {
    snapshot: Snapshot,
    setup: Histogram,
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.snapshot;
        let mut f = Families(encoder);
        f.gauge(
            "snas_agent_jobs",
            "Jobs (running and expired).",
            s.jobs as u64,
        )?;
        f.gauge(
            "snas_agent_jobs_expired",
            "Jobs whose policy has expired (refused until deleted).",
            s.jobs_expired as u64,
        )?;
        f.family(
            "snas_agent_tier1_drops",
            "Packets dropped by tier 1, per job and reason.",
            MetricType::Counter,
            s.drops.iter().flat_map(|(job, reasons)| {
                reasons
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(move |(r, n)| ([("job_key", job.as_str()), ("reason", r.name())], *n))
            }),
        )?;
        if let Some(d) = &s.dns {
            f.family(
                "snas_agent_dns_queries",
                "DNS queries answered by the stub, by outcome.",
                MetricType::Counter,
                d.outcomes
                    .iter()
                    .map(|(k, n)| ([("outcome", k.as_str())], *n)),
            )?;
            for (name, help, v) in [
                (
                    "snas_agent_dns_forwarded",
                    "DNS queries forwarded to a proxy resolver (names not in the cache).",
                    d.forwarded,
                ),
                (
                    "snas_agent_dns_proxy_failures",
                    "Forward attempts that timed out or failed (moved to the next proxy).",
                    d.proxy_failures,
                ),
                (
                    "snas_agent_dns_installed_addrs",
                    "Addresses from DNS answers installed into tier 1.",
                    d.installed_addrs,
                ),
                (
                    "snas_agent_dns_cache_evictions",
                    "DNS cache entries evicted to respect a bound.",
                    d.cache_evictions,
                ),
                (
                    "snas_agent_dns_send_failures",
                    "DNS answers that could not be sent.",
                    d.send_failures,
                ),
                (
                    "snas_agent_audit_suppressed",
                    "DNS refusal audit lines left out by the per-job limit.",
                    d.audit_suppressed,
                ),
            ] {
                f.counter(name, help, v)?;
            }
            f.gauge(
                "snas_agent_dns_cache_entries",
                "DNS answers held in the stub's cache.",
                d.cache_entries as u64,
            )?;
            f.gauge(
                "snas_agent_dns_cache_bytes",
                "Bytes held in the stub's cache.",
                d.cache_bytes as u64,
            )?;
            f.gauge(
                "snas_agent_dns_tcp_connections",
                "TCP connections open to the DNS stub.",
                d.tcp_connections as u64,
            )?;
        }
        f.counter(
            "snas_agent_audit_records",
            "Audit records queued for the audit log.",
            s.audit_emitted,
        )?;
        f.counter(
            "snas_agent_audit_dropped",
            "Audit records dropped (queue full).",
            s.audit_dropped,
        )?;
        f.family(
            "snas_agent_policy_requests",
            "Policy endpoint requests by outcome (forbidden: the caller is not a proxy).",
            MetricType::Counter,
            s.policy_requests
                .iter()
                .map(|(k, n)| ([("outcome", *k)], *n)),
        )?;
        f.family(
            "snas_agent_job_end_notices",
            "Job-ended notices to proxies (one per job and proxy), by outcome.",
            MetricType::Counter,
            s.end_notices.iter().map(|(k, n)| ([("outcome", *k)], *n)),
        )?;
        f.family(
            "snas_agent_job_update_notices",
            "Policy-update notices to proxies (one per update and proxy), by outcome.",
            MetricType::Counter,
            s.update_notices
                .iter()
                .map(|(k, n)| ([("outcome", *k)], *n)),
        )?;
        let u = &s.upkeep;
        for (name, help, v) in [
            (
                "snas_agent_flow_ageing_runs",
                "Tier-1 flow table agings run.",
                u.ageing_runs,
            ),
            (
                "snas_agent_flow_ageing_failures",
                "Tier-1 flow table agings that failed.",
                u.ageing_failures,
            ),
            (
                "snas_agent_infrastructure_updates",
                "Infrastructure sets installed into tier 1.",
                u.infra_updates,
            ),
            (
                "snas_agent_infrastructure_failures",
                "Infrastructure set installs that failed.",
                u.infra_failures,
            ),
            (
                "snas_agent_jobs_expired",
                "Jobs noticed expired.",
                u.jobs_expired,
            ),
        ] {
            f.counter(name, help, v)?;
        }
        f.family(
            "snas_agent_listen_socket",
            "1 per listening socket, labelled with where it came from at start (handover: from the previous agent; systemd: LISTEN_FDS; bound: opened by this agent).",
            MetricType::Gauge,
            s.sockets
                .iter()
                .map(|(name, source)| ([("socket", *name), ("source", *source)], 1u64)),
        )?;
        if let Some(t) = &s.proxies {
            let states = [
                (Health::Alive, "alive"),
                (Health::Draining, "draining"),
                (Health::Dead, "dead"),
            ];
            let ips: Vec<(String, Health)> = t
                .statuses()
                .iter()
                .map(|p| (p.ip.to_string(), p.health))
                .collect();
            f.family(
                "snas_agent_proxy_health",
                "1 for the proxy's current health state (alive, draining, dead).",
                MetricType::Gauge,
                ips.iter().flat_map(|(ip, health)| {
                    states.iter().map(move |(h, label)| {
                        (
                            [("proxy", ip.as_str()), ("state", *label)],
                            u64::from(health == h),
                        )
                    })
                }),
            )?;
            f.counter(
                "snas_agent_proxy_health_changes",
                "Proxy health changes (each rebuilds the Maglev table).",
                t.changes(),
            )?;
        }
        let m = f.0.encode_descriptor(
            "snas_agent_job_setup_seconds",
            "Time from job request to a ready job (verify, network, tier 1, record).",
            None,
            MetricType::Histogram,
        )?;
        self.setup.encode(m)
    }
}

/// The exposition text of one scrape (Prometheus text format 0.0.4, [`CONTENT_TYPE`]).
pub fn render(snapshot: Snapshot, setup: &Histogram) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        snapshot,
        setup: setup.clone(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail; a collector error would leave a partial text, which
    // is all there is to show.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn setup_histogram() -> Histogram {
        Histogram::new(crate::agent::SETUP_BUCKETS)
    }

    #[test]
    fn render_shows_every_family_and_nonzero_drops_only() {
        let mut drops = BTreeMap::new();
        drops.insert(
            "00000000000000aa".to_owned(),
            BTreeMap::from([(Reason::DestinationDenied, 3), (Reason::PortDenied, 0)]),
        );
        let mut t = ProxyTable::new(&["192.0.2.21".parse().unwrap()]);
        t.observe(0, crate::proxies::Probe::Draining);
        let dns = DnsView {
            queries: 4,
            forwarded: 1,
            cached: 3,
            proxy_failures: 0,
            installed_addrs: 1,
            audit_suppressed: 0,
            send_failures: 0,
            outcomes: BTreeMap::from([("noerror".to_owned(), 4)]),
            jobs: 1,
            cache_entries: 1,
            cache_bytes: 200,
            cache_evictions: 0,
            tcp_connections: 0,
        };
        let s = Snapshot {
            jobs: 1,
            drops,
            dns: Some(dns),
            proxies: Some(t),
            upkeep: crate::upkeep::UpkeepCounts {
                ageing_runs: 7,
                ..Default::default()
            },
            policy_requests: BTreeMap::from([("forbidden", 2)]),
            update_notices: BTreeMap::from([("refetch", 2), ("rate_limited", 1)]),
            sockets: BTreeMap::from([("dns-udp", "handover")]),
            ..Snapshot::default()
        };
        let h = setup_histogram();
        h.observe(Duration::from_millis(30).as_secs_f64());
        let text = render(s, &h);
        assert!(text.contains("snas_agent_jobs 1\n"), "{text}");
        assert!(text.contains(
            "snas_agent_tier1_drops_total{job_key=\"00000000000000aa\",reason=\"destination_denied\"} 3\n"
        ));
        assert!(!text.contains("port_denied"));
        assert!(text.contains("snas_agent_dns_queries_total{outcome=\"noerror\"} 4\n"));
        assert!(
            !text.contains("snas_agent_dns_cached_total"),
            "cached is an outcome"
        );
        assert!(text.contains("snas_agent_flow_ageing_runs_total 7\n"));
        assert!(text.contains("snas_agent_policy_requests_total{outcome=\"forbidden\"} 2\n"));
        assert!(text.contains("snas_agent_job_update_notices_total{outcome=\"refetch\"} 2\n"));
        assert!(text.contains("snas_agent_job_update_notices_total{outcome=\"rate_limited\"} 1\n"));
        assert!(
            text.contains("snas_agent_listen_socket{socket=\"dns-udp\",source=\"handover\"} 1\n")
        );
        assert!(
            text.contains("snas_agent_proxy_health{proxy=\"192.0.2.21\",state=\"draining\"} 1\n")
        );
        assert!(text.contains("snas_agent_proxy_health{proxy=\"192.0.2.21\",state=\"alive\"} 0\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_count 1\n"));
    }

    /// Every family of docs/agent.md, with its type, as `# TYPE` lines; nothing else.
    #[test]
    fn the_documented_families_and_types_are_exactly_those_exported() {
        let s = Snapshot {
            dns: Some(DnsView {
                queries: 0,
                forwarded: 0,
                cached: 0,
                proxy_failures: 0,
                installed_addrs: 0,
                audit_suppressed: 0,
                send_failures: 0,
                outcomes: BTreeMap::new(),
                jobs: 0,
                cache_entries: 0,
                cache_bytes: 0,
                cache_evictions: 0,
                tcp_connections: 0,
            }),
            proxies: Some(ProxyTable::new(&[])),
            ..Snapshot::default()
        };
        let text = render(s, &setup_histogram());
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "snas_agent_jobs gauge",
                "snas_agent_jobs_expired gauge",
                "snas_agent_tier1_drops_total counter",
                "snas_agent_dns_queries_total counter",
                "snas_agent_dns_forwarded_total counter",
                "snas_agent_dns_proxy_failures_total counter",
                "snas_agent_dns_installed_addrs_total counter",
                "snas_agent_dns_cache_evictions_total counter",
                "snas_agent_dns_send_failures_total counter",
                "snas_agent_audit_suppressed_total counter",
                "snas_agent_dns_cache_entries gauge",
                "snas_agent_dns_cache_bytes gauge",
                "snas_agent_dns_tcp_connections gauge",
                "snas_agent_audit_records_total counter",
                "snas_agent_audit_dropped_total counter",
                "snas_agent_policy_requests_total counter",
                "snas_agent_job_end_notices_total counter",
                "snas_agent_job_update_notices_total counter",
                "snas_agent_flow_ageing_runs_total counter",
                "snas_agent_flow_ageing_failures_total counter",
                "snas_agent_infrastructure_updates_total counter",
                "snas_agent_infrastructure_failures_total counter",
                "snas_agent_jobs_expired_total counter",
                "snas_agent_listen_socket gauge",
                "snas_agent_proxy_health gauge",
                "snas_agent_proxy_health_changes_total counter",
                "snas_agent_job_setup_seconds histogram",
            ]
        );
        let docs = include_str!("../../../docs/agent.md");
        for t in &types {
            let name = t.split(' ').next().unwrap_or_default();
            assert!(
                docs.contains(&format!("`{name}")) || docs.contains(&format!("{name}`")),
                "{name} is not documented in docs/agent.md"
            );
        }
    }
}
