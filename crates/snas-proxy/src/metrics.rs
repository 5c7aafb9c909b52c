//! Proxy metrics in the Prometheus text exposition format (`GET /metrics`).
//!
//! # What it owns
//! The data path's counters (relaxed atomics, bumped once per batch or per event, never
//! locked) and [`render`], which adds gauges read at scrape time from the engine (drops by
//! reason, live flows, NAT utilisation per egress address), the policy cache and the fetcher.
//!
//! # Choice
//! The text format is written by hand (a dozen families, no labels beyond `reason`,
//! `direction`, `egress_ip`, `outcome`), which keeps the data path free of a metrics
//! library's registry locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use snas_wire::Reason;

use crate::tier2::Tier2;

/// Counters bumped by workers, the resolver and the control endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    /// GENEVE datagrams received from nodes.
    pub node_rx_packets: AtomicU64,
    /// Their bytes (UDP payload).
    pub node_rx_bytes: AtomicU64,
    /// Packets written to the TUN device (after segmentation).
    pub internet_tx_packets: AtomicU64,
    /// Their bytes.
    pub internet_tx_bytes: AtomicU64,
    /// Packets read from the TUN device.
    pub internet_rx_packets: AtomicU64,
    /// Their bytes.
    pub internet_rx_bytes: AtomicU64,
    /// GENEVE datagrams sent to nodes (replies and refusals).
    pub node_tx_packets: AtomicU64,
    /// Their bytes.
    pub node_tx_bytes: AtomicU64,
    /// Refusals (RST / ICMP) sent.
    pub refusals: AtomicU64,
    /// Packets held because the job's policy was not cached yet (a fetch was queued).
    pub held_packets: AtomicU64,
    /// Held packets released after their job's policy arrived.
    pub held_released: AtomicU64,
    /// Jobs ended by their node (`POST /v1/jobs/{job_key}/ended`).
    pub jobs_ended: AtomicU64,
    /// TUN writes that failed (queue full, refused).
    pub tun_write_errors: AtomicU64,
    /// GENEVE datagrams to nodes the kernel refused (send buffer still full after a short
    /// wait, no route): dropped, counted here.
    pub node_send_failures: AtomicU64,
    /// TCP super-packets segmented.
    pub gso_segmented: AtomicU64,
    /// DNS queries answered (NOERROR / NXDOMAIN / NODATA).
    pub dns_answered: AtomicU64,
    /// DNS queries refused.
    pub dns_refused: AtomicU64,
    /// DNS queries that failed upstream (SERVFAIL).
    pub dns_failed: AtomicU64,
    /// Bindings received from peers and accepted.
    pub peer_bindings: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Values read outside the engine lock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    /// Policies cached.
    pub policies: usize,
    /// Policy fetches that succeeded.
    pub fetch_ok: u64,
    /// Policy fetches that failed.
    pub fetch_failed: u64,
    /// Audit lines dropped.
    pub audit_dropped: u64,
    /// Audit lines written.
    pub audit_written: u64,
    /// Whether draining.
    pub draining: bool,
    /// What the workers' queues hold.
    pub queues: QueueGauges,
    /// The nftables guard's drops (`None`: no guard, or it could not be read).
    pub guard: Option<crate::guard::GuardCounters>,
}

/// What the workers' pacing and fair queues hold, summed over workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Packets in the pacing queues.
    pub pacing_packets: u64,
    /// Their bytes.
    pub pacing_bytes: u64,
    /// Packets in the fair queues.
    pub fair_packets: u64,
    /// Their bytes.
    pub fair_bytes: u64,
    /// Tenants with something in a fair queue (once per worker and direction).
    pub fair_tenants: u64,
    /// Packets served from the fair queues since start.
    pub fair_served: u64,
    /// Their summed waits in the fair queues, nanoseconds.
    pub fair_waited_ns: u64,
    /// Packets from nodes shed by the fair queues (`tenant_queue_full`).
    pub fair_dropped_from_nodes: u64,
    /// Packets to nodes shed by the fair queues (`tenant_queue_full`).
    pub fair_dropped_to_nodes: u64,
}

impl QueueGauges {
    /// The sum of the workers' gauges.
    pub fn sum(workers: &[crate::shared::WorkerGauges]) -> QueueGauges {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        workers
            .iter()
            .fold(QueueGauges::default(), |a, g| QueueGauges {
                pacing_packets: a.pacing_packets + get(&g.pacing_packets),
                pacing_bytes: a.pacing_bytes + get(&g.pacing_bytes),
                fair_packets: a.fair_packets + get(&g.fair_packets),
                fair_bytes: a.fair_bytes + get(&g.fair_bytes),
                fair_tenants: a.fair_tenants + get(&g.fair_tenants),
                fair_served: a.fair_served + get(&g.fair_served),
                fair_waited_ns: a.fair_waited_ns.saturating_add(get(&g.fair_waited_ns)),
                fair_dropped_from_nodes: a.fair_dropped_from_nodes
                    + get(&g.fair_dropped_from_nodes),
                fair_dropped_to_nodes: a.fair_dropped_to_nodes + get(&g.fair_dropped_to_nodes),
            })
    }
}

/// Destinations listed by `snas_proxy_destination_flows`.
pub const HOTTEST: usize = 10;

/// The `n` destinations (address, port) with the most live flows, most first.
pub fn hottest(engine: &Tier2, n: usize) -> Vec<((std::net::IpAddr, u16), u64)> {
    let mut count: std::collections::HashMap<(std::net::IpAddr, u16), u64> =
        std::collections::HashMap::new();
    for (_, f) in engine.conntrack().iter() {
        *count.entry((f.key.dst_ip, f.key.dst_port)).or_default() += 1;
    }
    let mut v: Vec<_> = count.into_iter().collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// The exposition text.
pub fn render(m: &Metrics, engine: &Tier2, extra: Extra) -> String {
    let mut o = String::with_capacity(4096);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    family(
        &mut o,
        "snas_proxy_packets_total",
        "counter",
        "Packets by direction.",
    );
    for (dir, c) in [
        ("node_rx", &m.node_rx_packets),
        ("internet_tx", &m.internet_tx_packets),
        ("internet_rx", &m.internet_rx_packets),
        ("node_tx", &m.node_tx_packets),
    ] {
        let _ = writeln!(
            o,
            "snas_proxy_packets_total{{direction=\"{dir}\"}} {}",
            get(c)
        );
    }
    family(
        &mut o,
        "snas_proxy_bytes_total",
        "counter",
        "Bytes by direction.",
    );
    for (dir, c) in [
        ("node_rx", &m.node_rx_bytes),
        ("internet_tx", &m.internet_tx_bytes),
        ("internet_rx", &m.internet_rx_bytes),
        ("node_tx", &m.node_tx_bytes),
    ] {
        let _ = writeln!(
            o,
            "snas_proxy_bytes_total{{direction=\"{dir}\"}} {}",
            get(c)
        );
    }
    family(
        &mut o,
        "snas_proxy_drops_total",
        "counter",
        "Tier-2 drops and refusals by reason.",
    );
    let drops = engine.drops();
    for r in Reason::ALL {
        let n = drops.get(usize::from(r.code())).copied().unwrap_or(0);
        if n > 0 {
            let _ = writeln!(o, "snas_proxy_drops_total{{reason=\"{}\"}} {n}", r.name());
        }
    }
    let simple: [(&str, &str, u64); 9] = [
        (
            "snas_proxy_refusals_sent_total",
            "RST/ICMP refusals sent to nodes.",
            get(&m.refusals),
        ),
        (
            "snas_proxy_held_packets_total",
            "Packets held while their job's policy was fetched.",
            get(&m.held_packets),
        ),
        (
            "snas_proxy_held_released_total",
            "Held packets processed after their job's policy arrived.",
            get(&m.held_released),
        ),
        (
            "snas_proxy_jobs_ended_total",
            "Jobs ended by their node.",
            get(&m.jobs_ended),
        ),
        (
            "snas_proxy_tun_write_errors_total",
            "Failed TUN writes.",
            get(&m.tun_write_errors),
        ),
        (
            "snas_proxy_node_send_failures_total",
            "GENEVE datagrams to nodes the kernel refused (dropped).",
            get(&m.node_send_failures),
        ),
        (
            "snas_proxy_gso_segmented_total",
            "TCP super-packets segmented.",
            get(&m.gso_segmented),
        ),
        (
            "snas_proxy_policy_fetch_failures_total",
            "Failed policy fetches.",
            extra.fetch_failed,
        ),
        (
            "snas_proxy_policy_fetches_total",
            "Successful policy fetches.",
            extra.fetch_ok,
        ),
    ];
    for (name, help, v) in simple {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        &mut o,
        "snas_proxy_audit_lines_total",
        "counter",
        "Audit lines by outcome.",
    );
    let _ = writeln!(
        o,
        "snas_proxy_audit_lines_total{{outcome=\"written\"}} {}",
        extra.audit_written
    );
    let _ = writeln!(
        o,
        "snas_proxy_audit_lines_total{{outcome=\"dropped\"}} {}",
        extra.audit_dropped
    );
    let _ = writeln!(
        o,
        "snas_proxy_audit_lines_total{{outcome=\"suppressed\"}} {}",
        engine.audit_suppressed()
    );
    family(
        &mut o,
        "snas_proxy_dns_queries_total",
        "counter",
        "DNS queries by outcome.",
    );
    for (outcome, c) in [
        ("answered", &m.dns_answered),
        ("refused", &m.dns_refused),
        ("failed", &m.dns_failed),
    ] {
        let _ = writeln!(
            o,
            "snas_proxy_dns_queries_total{{outcome=\"{outcome}\"}} {}",
            get(c)
        );
    }
    family(
        &mut o,
        "snas_proxy_peer_bindings_total",
        "counter",
        "Bindings accepted from peers.",
    );
    let _ = writeln!(
        o,
        "snas_proxy_peer_bindings_total {}",
        get(&m.peer_bindings)
    );
    if let Some(g) = extra.guard {
        family(
            &mut o,
            "snas_proxy_guard_drops_total",
            "counter",
            "Packets from the TUN device the namespace guard dropped (a tier-2 bug if not 0).",
        );
        let _ = writeln!(
            o,
            "snas_proxy_guard_drops_total{{hook=\"input\"}} {}",
            g.local
        );
        let _ = writeln!(
            o,
            "snas_proxy_guard_drops_total{{hook=\"forward\"}} {}",
            g.infrastructure
        );
    }
    family(&mut o, "snas_proxy_flows", "gauge", "Live flows.");
    let _ = writeln!(o, "snas_proxy_flows {}", engine.conntrack().len());
    let (held_packets, held_bytes) = engine.held();
    let gauges = [
        (
            "snas_proxy_hold_queue_packets",
            "Packets held while their job's policy is fetched.",
            u64::from(held_packets),
        ),
        (
            "snas_proxy_hold_queue_bytes",
            "Bytes held while their job's policy is fetched.",
            held_bytes,
        ),
        (
            "snas_proxy_pacing_queue_packets",
            "Packets waiting in the workers' pacing queues.",
            extra.queues.pacing_packets,
        ),
        (
            "snas_proxy_pacing_queue_bytes",
            "Bytes waiting in the workers' pacing queues.",
            extra.queues.pacing_bytes,
        ),
        (
            "snas_proxy_fair_queue_packets",
            "Packets waiting for their turn in the workers' fair queues.",
            extra.queues.fair_packets,
        ),
        (
            "snas_proxy_fair_queue_bytes",
            "Bytes waiting for their turn in the workers' fair queues.",
            extra.queues.fair_bytes,
        ),
        (
            "snas_proxy_fair_queue_tenants",
            "Tenants with packets in a fair queue (once per worker and direction).",
            extra.queues.fair_tenants,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        &mut o,
        "snas_proxy_fair_queue_served_total",
        "counter",
        "Packets served from the workers' fair queues.",
    );
    let _ = writeln!(
        o,
        "snas_proxy_fair_queue_served_total {}",
        extra.queues.fair_served
    );
    family(
        &mut o,
        "snas_proxy_fair_queue_dropped_total",
        "counter",
        "Packets the workers' fair queues shed (tenant_queue_full), by direction.",
    );
    for (dir, v) in [
        ("from_nodes", extra.queues.fair_dropped_from_nodes),
        ("to_nodes", extra.queues.fair_dropped_to_nodes),
    ] {
        let _ = writeln!(
            o,
            "snas_proxy_fair_queue_dropped_total{{direction=\"{dir}\"}} {v}"
        );
    }
    family(
        &mut o,
        "snas_proxy_fair_queue_wait_seconds_total",
        "counter",
        "Time served packets waited in the fair queues (divide by served for the mean).",
    );
    let _ = writeln!(
        o,
        "snas_proxy_fair_queue_wait_seconds_total {}",
        extra.queues.fair_waited_ns as f64 / 1e9
    );
    family(
        &mut o,
        "snas_proxy_policies",
        "gauge",
        "Verified policies cached.",
    );
    let _ = writeln!(o, "snas_proxy_policies {}", extra.policies);
    family(&mut o, "snas_proxy_draining", "gauge", "1 while draining.");
    let _ = writeln!(o, "snas_proxy_draining {}", u8::from(extra.draining));
    family(
        &mut o,
        "snas_proxy_nat_ports_live",
        "gauge",
        "Live NAT ports per egress address.",
    );
    let usage = engine.conntrack().nat().egress_usage();
    for u in &usage {
        let _ = writeln!(
            o,
            "snas_proxy_nat_ports_live{{egress_ip=\"{}\"}} {}",
            u.ip, u.live
        );
    }
    family(
        &mut o,
        "snas_proxy_nat_busiest_destination_utilisation",
        "gauge",
        "Highest fraction of ports used toward one destination, per egress address.",
    );
    for u in &usage {
        let _ = writeln!(
            o,
            "snas_proxy_nat_busiest_destination_utilisation{{egress_ip=\"{}\"}} {}",
            u.ip, u.busiest_destination_utilisation
        );
    }
    o
}
