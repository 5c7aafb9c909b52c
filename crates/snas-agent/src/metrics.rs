//! Agent metrics in the Prometheus text exposition format (`GET /metrics`).
//!
//! Owns the job set-up latency histogram and [`render`], which reads everything else at scrape
//! time: jobs (and how many expired), tier-1 drops per job and reason (from the pinned
//! counters), DNS outcomes and cache, proxy health, audit queue figures, policy endpoint and
//! job-ended notice outcomes, the periodic work, and where the listening sockets came from.
//!
//! # Choice
//! The text format is written by hand, like the proxy's: a dozen families with fixed labels,
//! no registry locks on the DNS path.
//!
//! # Limits
//! Per-job series are emitted only for reasons with a non-zero count, so a node with many jobs
//! does not export `jobs × reasons` zero series.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use snas_wire::Reason;

use crate::proxies::{Health, ProxyTable};

/// Upper bounds (seconds) of the job set-up histogram buckets.
pub const SETUP_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; SETUP_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in SETUP_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str) {
        for (i, b) in SETUP_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

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
    pub dns: Option<crate::stub::DnsView>,
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
    /// Periodic work.
    pub upkeep: crate::upkeep::UpkeepCounts,
    /// Listening socket → where it came from at start.
    pub sockets: BTreeMap<&'static str, &'static str>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    family(o, name, "counter", help);
    let _ = writeln!(o, "{name} {v}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: u64) {
    family(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {v}");
}

fn labelled(o: &mut String, name: &str, label: &str, values: &BTreeMap<&'static str, u64>) {
    for (k, n) in values {
        let _ = writeln!(o, "{name}{{{label}=\"{k}\"}} {n}");
    }
}

/// The exposition text.
pub fn render(s: &Snapshot, setup: &Histogram) -> String {
    let mut o = String::new();
    gauge(
        &mut o,
        "snas_agent_jobs",
        "Jobs (running and expired).",
        s.jobs as u64,
    );
    gauge(
        &mut o,
        "snas_agent_jobs_expired",
        "Jobs whose policy has expired (refused until deleted).",
        s.jobs_expired as u64,
    );
    family(
        &mut o,
        "snas_agent_tier1_drops_total",
        "counter",
        "Packets dropped by tier 1, per job and reason.",
    );
    for (job, reasons) in &s.drops {
        for (r, n) in reasons.iter().filter(|(_, n)| **n > 0) {
            let _ = writeln!(
                o,
                "snas_agent_tier1_drops_total{{job_key=\"{job}\",reason=\"{}\"}} {n}",
                r.name()
            );
        }
    }
    if let Some(d) = &s.dns {
        family(
            &mut o,
            "snas_agent_dns_queries_total",
            "counter",
            "DNS queries answered by the stub, by outcome.",
        );
        for (k, n) in &d.outcomes {
            let _ = writeln!(o, "snas_agent_dns_queries_total{{outcome=\"{k}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "snas_agent_dns_forwarded_total",
                "DNS queries forwarded to a proxy resolver (names not in the cache).",
                d.forwarded,
            ),
            (
                "snas_agent_dns_proxy_failures_total",
                "Forward attempts that timed out or failed (moved to the next proxy).",
                d.proxy_failures,
            ),
            (
                "snas_agent_dns_installed_addrs_total",
                "Addresses from DNS answers installed into tier 1.",
                d.installed_addrs,
            ),
            (
                "snas_agent_dns_cache_evictions_total",
                "DNS cache entries evicted to respect a bound.",
                d.cache_evictions,
            ),
            (
                "snas_agent_dns_send_failures_total",
                "DNS answers that could not be sent.",
                d.send_failures,
            ),
            (
                "snas_agent_audit_suppressed_total",
                "DNS refusal audit lines left out by the per-job limit.",
                d.audit_suppressed,
            ),
        ] {
            counter(&mut o, name, help, v);
        }
        gauge(
            &mut o,
            "snas_agent_dns_cache_entries",
            "DNS answers held in the stub's cache.",
            d.cache_entries as u64,
        );
        gauge(
            &mut o,
            "snas_agent_dns_cache_bytes",
            "Bytes held in the stub's cache.",
            d.cache_bytes as u64,
        );
        gauge(
            &mut o,
            "snas_agent_dns_tcp_connections",
            "TCP connections open to the DNS stub.",
            d.tcp_connections as u64,
        );
    }
    counter(
        &mut o,
        "snas_agent_audit_records_total",
        "Audit records queued for the audit log.",
        s.audit_emitted,
    );
    counter(
        &mut o,
        "snas_agent_audit_dropped_total",
        "Audit records dropped (queue full).",
        s.audit_dropped,
    );
    family(
        &mut o,
        "snas_agent_policy_requests_total",
        "counter",
        "Policy endpoint requests by outcome (forbidden: the caller is not a proxy).",
    );
    labelled(
        &mut o,
        "snas_agent_policy_requests_total",
        "outcome",
        &s.policy_requests,
    );
    family(
        &mut o,
        "snas_agent_job_end_notices_total",
        "counter",
        "Job-ended notices to proxies (one per job and proxy), by outcome.",
    );
    labelled(
        &mut o,
        "snas_agent_job_end_notices_total",
        "outcome",
        &s.end_notices,
    );
    let u = &s.upkeep;
    for (name, help, v) in [
        (
            "snas_agent_flow_ageing_runs_total",
            "Tier-1 flow table agings run.",
            u.ageing_runs,
        ),
        (
            "snas_agent_flow_ageing_failures_total",
            "Tier-1 flow table agings that failed.",
            u.ageing_failures,
        ),
        (
            "snas_agent_infrastructure_updates_total",
            "Infrastructure sets installed into tier 1.",
            u.infra_updates,
        ),
        (
            "snas_agent_infrastructure_failures_total",
            "Infrastructure set installs that failed.",
            u.infra_failures,
        ),
        (
            "snas_agent_jobs_expired_total",
            "Jobs noticed expired.",
            u.jobs_expired,
        ),
    ] {
        counter(&mut o, name, help, v);
    }
    family(
        &mut o,
        "snas_agent_listen_socket",
        "gauge",
        "1 per listening socket, labelled with where it came from at start (handover: from the previous agent; systemd: LISTEN_FDS; bound: opened by this agent).",
    );
    for (name, source) in &s.sockets {
        let _ = writeln!(
            o,
            "snas_agent_listen_socket{{socket=\"{name}\",source=\"{source}\"}} 1"
        );
    }
    if let Some(t) = &s.proxies {
        family(
            &mut o,
            "snas_agent_proxy_health",
            "gauge",
            "1 for the proxy's current health state (alive, draining, dead).",
        );
        for p in t.statuses() {
            for (h, label) in [
                (Health::Alive, "alive"),
                (Health::Draining, "draining"),
                (Health::Dead, "dead"),
            ] {
                let _ = writeln!(
                    o,
                    "snas_agent_proxy_health{{proxy=\"{}\",state=\"{label}\"}} {}",
                    p.ip,
                    u8::from(p.health == h)
                );
            }
        }
        counter(
            &mut o,
            "snas_agent_proxy_health_changes_total",
            "Proxy health changes (each rebuilds the Maglev table).",
            t.changes(),
        );
    }
    family(
        &mut o,
        "snas_agent_job_setup_seconds",
        "histogram",
        "Time from job request to a ready job (verify, network, tier 1, record).",
    );
    setup.render(&mut o, "snas_agent_job_setup_seconds");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_every_family_and_nonzero_drops_only() {
        let mut drops = BTreeMap::new();
        drops.insert(
            "00000000000000aa".to_owned(),
            BTreeMap::from([(Reason::DestinationDenied, 3), (Reason::PortDenied, 0)]),
        );
        let mut t = ProxyTable::new(&["192.0.2.21".parse().unwrap()]);
        t.observe(0, crate::proxies::Probe::Draining);
        let dns = crate::stub::DnsView {
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
            sockets: BTreeMap::from([("dns-udp", "handover")]),
            ..Snapshot::default()
        };
        let h = Histogram::default();
        h.observe(Duration::from_millis(30));
        let text = render(&s, &h);
        assert!(text.contains("snas_agent_jobs 1\n"));
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
        assert!(
            text.contains("snas_agent_listen_socket{socket=\"dns-udp\",source=\"handover\"} 1\n")
        );
        assert!(
            text.contains("snas_agent_proxy_health{proxy=\"192.0.2.21\",state=\"draining\"} 1\n")
        );
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_count 1\n"));
    }
}
