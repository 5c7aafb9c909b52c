//! Agent metrics in the Prometheus text exposition format (`GET /metrics`).
//!
//! Owns the job set-up latency histogram and [`render`], which reads everything else at scrape
//! time: jobs, tier-1 drops per job and reason (from the pinned counters), DNS outcomes, proxy
//! health, audit queue figures.
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
    /// Running jobs.
    pub jobs: usize,
    /// Tier-1 drops per job key (hex) and reason.
    pub drops: BTreeMap<String, BTreeMap<Reason, u64>>,
    /// DNS outcomes by label.
    pub dns_outcomes: BTreeMap<String, u64>,
    /// DNS queries forwarded to proxies.
    pub dns_forwarded: u64,
    /// Forward attempts that failed over.
    pub dns_proxy_failures: u64,
    /// Addresses installed into tier 1 from DNS answers.
    pub dns_installed: u64,
    /// The proxy table.
    pub proxies: Option<ProxyTable>,
    /// Audit records queued.
    pub audit_emitted: u64,
    /// Audit records dropped.
    pub audit_dropped: u64,
    /// DNS refusal audit lines left out by the per-job limit.
    pub audit_suppressed: u64,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(s: &Snapshot, setup: &Histogram) -> String {
    let mut o = String::new();
    family(&mut o, "snas_agent_jobs", "gauge", "Running jobs.");
    let _ = writeln!(o, "snas_agent_jobs {}", s.jobs);
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
    family(
        &mut o,
        "snas_agent_dns_queries_total",
        "counter",
        "DNS queries answered by the stub, by outcome.",
    );
    for (k, n) in &s.dns_outcomes {
        let _ = writeln!(o, "snas_agent_dns_queries_total{{outcome=\"{k}\"}} {n}");
    }
    for (name, help, v) in [
        (
            "snas_agent_dns_forwarded_total",
            "DNS queries forwarded to a proxy resolver.",
            s.dns_forwarded,
        ),
        (
            "snas_agent_dns_proxy_failures_total",
            "Forward attempts that timed out or failed (moved to the next proxy).",
            s.dns_proxy_failures,
        ),
        (
            "snas_agent_dns_installed_addrs_total",
            "Addresses from DNS answers installed into tier 1.",
            s.dns_installed,
        ),
        (
            "snas_agent_audit_records_total",
            "Audit records queued for the audit log.",
            s.audit_emitted,
        ),
        (
            "snas_agent_audit_dropped_total",
            "Audit records dropped (queue full).",
            s.audit_dropped,
        ),
        (
            "snas_agent_audit_suppressed_total",
            "DNS refusal audit lines left out by the per-job limit.",
            s.audit_suppressed,
        ),
    ] {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
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
        family(
            &mut o,
            "snas_agent_proxy_health_changes_total",
            "counter",
            "Proxy health changes (each rebuilds the Maglev table).",
        );
        let _ = writeln!(o, "snas_agent_proxy_health_changes_total {}", t.changes());
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
        let s = Snapshot {
            jobs: 1,
            drops,
            dns_outcomes: BTreeMap::from([("noerror".to_owned(), 4)]),
            proxies: Some(t),
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
            text.contains("snas_agent_proxy_health{proxy=\"192.0.2.21\",state=\"draining\"} 1\n")
        );
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("snas_agent_job_setup_seconds_count 1\n"));
    }
}
