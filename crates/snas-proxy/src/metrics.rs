//! Proxy metrics in the Prometheus text exposition format 0.0.4 (`GET /metrics`), encoded by
//! prometheus-client.
//!
//! # What it owns
//! The data path's counters ([`Metrics`]: relaxed atomics, bumped once per batch or per event,
//! never locked) and one scrape: [`Scrape::take`] copies those counters, the engine's figures
//! (drops by reason, live flows, held packets, NAT utilisation per egress address) and the
//! daemon's ([`Extra`]: policy cache, fetcher, audit, draining, queues, guard) — the engine
//! locked only for the copy — and [`Scrape::render`] writes them through a prometheus-client
//! `Collector` as constant samples.
//!
//! # Choice
//! A collector over a snapshot, not live metrics in a registry (as the agent does): the
//! figures already live where they are counted (the workers' atomics, the engine's drop
//! array, the NAT allocator), so the data path takes no registry lock and nothing is counted
//! twice.
//!
//! # Invariants
//! Family names, types and labels are those documented in `docs/proxy.md` (counters are
//! registered without their `_total`, which the encoder appends; a test pins the list to the
//! doc); families are written in a fixed order; `snas_proxy_drops_total` has samples only for
//! (tenant, reason) pairs with drops — its `tenant` label is bounded as [`crate::drops`] says
//! (verified tenants, at most [`crate::drops::MAX_TENANT_SERIES`], plus `unknown` and
//! `other`), never a job — and `snas_proxy_guard_drops_total` only when the guard could be
//! read.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use snas_wire::Reason;

use crate::drops::DropTally;
use crate::nat::EgressUsage;
use crate::tier2::Tier2;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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
    /// Packets held ([`crate::tier2::Verdict::Held`]): the job's policy was not cached yet (a
    /// fetch was queued) or its serial is being refetched, or the name check holds a first
    /// payload that was not complete in one packet.
    pub held_packets: AtomicU64,
    /// Held packets processed again: their job's policy arrived, or their flow's name check
    /// passed (and the name check's RSTs to servers).
    pub held_released: AtomicU64,
    /// Jobs ended by their node (`POST /v1/jobs/{job_key}/ended`).
    pub jobs_ended: AtomicU64,
    /// Policy-update notices that started a refetch (`POST /v1/jobs/{job_key}/updated/{serial}`).
    pub update_notices: AtomicU64,
    /// TUN writes that failed (queue full, refused).
    pub tun_write_errors: AtomicU64,
    /// GENEVE datagrams to nodes the kernel refused (send buffer still full after a short
    /// wait, no route): dropped, counted here.
    pub node_send_failures: AtomicU64,
    /// TCP super-packets from the internet that the proxy segmented for a node.
    pub gso_segmented: AtomicU64,
    /// TCP super-packets from nodes handed to the kernel whole, to be segmented there (TSO).
    pub tso_to_kernel: AtomicU64,
    /// Packets read from the TUN device whose virtio-net header could not be honoured.
    pub tun_read_refused: AtomicU64,
    /// TCP super-packets from the internet sent to a node whole through the overlay-GSO
    /// device (segmented by the kernel or the NIC).
    pub gso_whole_to_nodes: AtomicU64,
    /// DNS queries answered (NOERROR / NXDOMAIN / NODATA).
    pub dns_answered: AtomicU64,
    /// DNS queries refused.
    pub dns_refused: AtomicU64,
    /// DNS queries that failed upstream (SERVFAIL).
    pub dns_failed: AtomicU64,
    /// Bindings received from peers and accepted.
    pub peer_bindings: AtomicU64,
    /// The in-kernel fast path's figures (published by the workers' housekeeping).
    pub fast_path: FastPathMetrics,
}

/// The in-kernel fast path's figures, copied from its maps about once a second.
#[derive(Debug, Default)]
pub struct FastPathMetrics {
    /// 1 while the programs are attached.
    pub available: AtomicU64,
    /// Flows installed.
    pub flows: AtomicU64,
    /// Packets from nodes the fast path sent to the internet.
    pub to_internet_packets: AtomicU64,
    /// Their wire bytes.
    pub to_internet_bytes: AtomicU64,
    /// Packets from the internet the fast path sent to nodes.
    pub to_nodes_packets: AtomicU64,
    /// Their wire bytes.
    pub to_nodes_bytes: AtomicU64,
    /// Packets left to userspace, in `snas_bpf::fastpath::DivertReason::ALL` order.
    pub diverted: [AtomicU64; 6],
    /// Map updates that failed and packets dropped after a failed rewrite.
    pub errors: AtomicU64,
}

/// Labels of `snas_proxy_fastpath_diverted_total`, in [`FastPathMetrics::diverted`] order.
const DIVERT_REASONS: [&str; 6] = ["no_entry", "flags", "serial", "paced", "route", "other"];

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
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

/// The counters of [`Metrics`], read once.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    packets: [(&'static str, u64); 4],
    bytes: [(&'static str, u64); 4],
    refusals: u64,
    held_packets: u64,
    held_released: u64,
    jobs_ended: u64,
    update_notices: u64,
    tun_write_errors: u64,
    node_send_failures: u64,
    gso_segmented: u64,
    tso_to_kernel: u64,
    tun_read_refused: u64,
    gso_whole_to_nodes: u64,
    dns: [(&'static str, u64); 3],
    peer_bindings: u64,
    fast: [u64; 13],
}

impl Counters {
    fn read(m: &Metrics) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            packets: [
                ("node_rx", get(&m.node_rx_packets)),
                ("internet_tx", get(&m.internet_tx_packets)),
                ("internet_rx", get(&m.internet_rx_packets)),
                ("node_tx", get(&m.node_tx_packets)),
            ],
            bytes: [
                ("node_rx", get(&m.node_rx_bytes)),
                ("internet_tx", get(&m.internet_tx_bytes)),
                ("internet_rx", get(&m.internet_rx_bytes)),
                ("node_tx", get(&m.node_tx_bytes)),
            ],
            refusals: get(&m.refusals),
            held_packets: get(&m.held_packets),
            held_released: get(&m.held_released),
            jobs_ended: get(&m.jobs_ended),
            update_notices: get(&m.update_notices),
            tun_write_errors: get(&m.tun_write_errors),
            node_send_failures: get(&m.node_send_failures),
            gso_segmented: get(&m.gso_segmented),
            tso_to_kernel: get(&m.tso_to_kernel),
            tun_read_refused: get(&m.tun_read_refused),
            gso_whole_to_nodes: get(&m.gso_whole_to_nodes),
            dns: [
                ("answered", get(&m.dns_answered)),
                ("refused", get(&m.dns_refused)),
                ("failed", get(&m.dns_failed)),
            ],
            peer_bindings: get(&m.peer_bindings),
            fast: {
                let f = &m.fast_path;
                let mut v = [0u64; 13];
                v[0] = get(&f.available);
                v[1] = get(&f.flows);
                v[2] = get(&f.to_internet_packets);
                v[3] = get(&f.to_internet_bytes);
                v[4] = get(&f.to_nodes_packets);
                v[5] = get(&f.to_nodes_bytes);
                for (i, d) in f.diverted.iter().enumerate() {
                    v[6 + i] = get(d);
                }
                v[12] = get(&f.errors);
                v
            },
        }
    }
}

/// Everything one scrape shows.
#[derive(Debug, Clone)]
pub struct Scrape {
    counters: Counters,
    drops: DropTally,
    audit_suppressed: u64,
    flows: usize,
    held_packets: u32,
    held_bytes: u64,
    names: crate::names::NameStats,
    name_held_bytes: u64,
    nat: Vec<EgressUsage>,
    resets: crate::resets::ResetStats,
    closing_flows: usize,
    extra: Extra,
}

impl Scrape {
    /// Copies the counters, the engine's figures and `extra` (call with the engine locked;
    /// the copy is all that happens under the lock).
    pub fn take(m: &Metrics, engine: &Tier2, extra: Extra) -> Scrape {
        let (held_packets, held_bytes) = engine.held();
        Scrape {
            counters: Counters::read(m),
            drops: engine.drop_tally().clone(),
            audit_suppressed: engine.audit_suppressed(),
            flows: engine.conntrack().len(),
            held_packets,
            held_bytes,
            names: engine.name_stats(),
            name_held_bytes: engine.name_held_bytes(),
            nat: engine.conntrack().nat().egress_usage(),
            resets: engine.reset_stats(),
            closing_flows: engine.closing_flows(),
            extra,
        }
    }

    /// The exposition text (Prometheus text format 0.0.4, [`CONTENT_TYPE`]).
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail; a collector error would leave a partial text,
        // which is all there is to show.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The exposition text of the counters, the engine and `extra` (see [`Scrape`]).
pub fn render(m: &Metrics, engine: &Tier2, extra: Extra) -> String {
    Scrape::take(m, engine, extra).render()
}

/// Writes families of one collector (a `prometheus_client` `Collector::encode`); counters are
/// named without `_total`. The agent's metrics use it too.
#[allow(missing_debug_implementations)] // DescriptorEncoder has no Debug
pub struct Families<'a>(pub DescriptorEncoder<'a>);

impl Families<'_> {
    fn one<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        v: M,
    ) -> std::fmt::Result {
        let m = self.0.encode_descriptor(name, help, None, kind)?;
        v.encode(m)
    }

    /// One counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.one(name, help, MetricType::Counter, ConstCounter::new(v))
    }

    /// One gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.one(name, help, MetricType::Gauge, ConstGauge::new(v))
    }

    /// A family of `kind` with one sample per label set.
    pub fn family<L: EncodeLabelSet, V: Copy>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> std::fmt::Result
    where
        ConstCounter<V>: EncodeMetric,
        ConstGauge<V>: EncodeMetric,
    {
        let mut m = self.0.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in samples {
            let s = m.encode_family(&labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(v).encode(s)?,
                _ => ConstGauge::new(v).encode(s)?,
            }
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let c = &self.counters;
        let x = &self.extra;
        let q = &x.queues;
        let mut f = Families(encoder);
        f.family(
            "snas_proxy_packets",
            "Packets by direction.",
            MetricType::Counter,
            c.packets.map(|(d, v)| ([("direction", d)], v)),
        )?;
        f.family(
            "snas_proxy_bytes",
            "Bytes by direction.",
            MetricType::Counter,
            c.bytes.map(|(d, v)| ([("direction", d)], v)),
        )?;
        let mut series: Vec<_> = self.drops.series().collect();
        series.sort_by_key(|(who, _)| *who);
        f.family(
            "snas_proxy_drops",
            "Tier-2 drops and refusals by tenant and reason.",
            MetricType::Counter,
            series.iter().flat_map(|(who, counts)| {
                let tenant = who.to_string();
                Reason::ALL.iter().filter_map(move |r| {
                    let n = counts.get(usize::from(r.code())).copied().unwrap_or(0);
                    (n > 0).then(|| {
                        (
                            [("tenant", tenant.clone()), ("reason", r.name().to_owned())],
                            n,
                        )
                    })
                })
            }),
        )?;
        for (name, help, v) in [
            (
                "snas_proxy_refusals_sent",
                "RST/ICMP refusals sent to nodes.",
                c.refusals,
            ),
            (
                "snas_proxy_held_packets",
                "Packets held while their job's policy was fetched, or by the name check while a \
                 flow's first payload was not complete in one packet.",
                c.held_packets,
            ),
            (
                "snas_proxy_held_released",
                "Held packets processed after their job's policy arrived or their flow's name \
                 check passed (and the name check's RSTs to servers).",
                c.held_released,
            ),
            (
                "snas_proxy_jobs_ended",
                "Jobs ended by their node.",
                c.jobs_ended,
            ),
            (
                "snas_proxy_job_update_notices",
                "Policy-update notices from nodes that started a refetch.",
                c.update_notices,
            ),
            (
                "snas_proxy_tun_write_errors",
                "Failed TUN writes.",
                c.tun_write_errors,
            ),
            (
                "snas_proxy_node_send_failures",
                "GENEVE datagrams to nodes the kernel refused (dropped).",
                c.node_send_failures,
            ),
            (
                "snas_proxy_gso_segmented",
                "TCP super-packets from the internet segmented by the proxy for a node.",
                c.gso_segmented,
            ),
            (
                "snas_proxy_tso_to_kernel",
                "TCP super-packets from nodes written whole to the TUN device (segmented by the kernel).",
                c.tso_to_kernel,
            ),
            (
                "snas_proxy_gso_whole_to_nodes",
                "TCP super-packets sent to nodes whole through the overlay-GSO device.",
                c.gso_whole_to_nodes,
            ),
            (
                "snas_proxy_tun_read_refused",
                "Packets read from the TUN device whose virtio-net header could not be honoured.",
                c.tun_read_refused,
            ),
            (
                "snas_proxy_policy_fetch_failures",
                "Failed policy fetches.",
                x.fetch_failed,
            ),
            (
                "snas_proxy_policy_fetches",
                "Successful policy fetches.",
                x.fetch_ok,
            ),
        ] {
            f.counter(name, help, v)?;
        }
        let r = &self.resets;
        f.family(
            "snas_proxy_resets",
            "RSTs sent to end flows the proxy ended on its own (policy update, revocation, key removed), by the end they went to.",
            MetricType::Counter,
            [
                ([("to", "job")], r.resets_to_job),
                ([("to", "remote")], r.resets_to_remote),
            ],
        )?;
        for (name, help, v) in [
            (
                "snas_proxy_reset_flows",
                "TCP flows the proxy ended on its own and started resetting.",
                r.flows,
            ),
            (
                "snas_proxy_reset_probes",
                "Probes (ACKs asking for sequence numbers) sent to ends of flows being reset.",
                r.probes,
            ),
            (
                "snas_proxy_reset_unanswered",
                "Ends of flows being reset that never answered a probe (not reset).",
                r.unanswered,
            ),
            (
                "snas_proxy_reset_skipped",
                "Flows ended without RSTs because the table of flows being reset was full.",
                r.skipped,
            ),
            (
                "snas_proxy_reset_control_dropped",
                "Probes and RSTs dropped because their queue was full.",
                r.dropped,
            ),
        ] {
            f.counter(name, help, v)?;
        }
        f.gauge(
            "snas_proxy_reset_closing_flows",
            "Flows being reset now.",
            self.closing_flows as u64,
        )?;
        f.family(
            "snas_proxy_audit_lines",
            "Audit lines by outcome.",
            MetricType::Counter,
            [
                ([("outcome", "written")], x.audit_written),
                ([("outcome", "dropped")], x.audit_dropped),
                ([("outcome", "suppressed")], self.audit_suppressed),
            ],
        )?;
        f.family(
            "snas_proxy_dns_queries",
            "DNS queries by outcome.",
            MetricType::Counter,
            c.dns.map(|(o, v)| ([("outcome", o)], v)),
        )?;
        f.counter(
            "snas_proxy_peer_bindings",
            "Bindings accepted from peers.",
            c.peer_bindings,
        )?;
        if let Some(g) = x.guard {
            f.family(
                "snas_proxy_guard_drops",
                "Packets from the TUN device the namespace guard dropped (a tier-2 bug if not 0).",
                MetricType::Counter,
                [
                    ([("hook", "input")], g.local),
                    ([("hook", "forward")], g.infrastructure),
                ],
            )?;
        }
        f.gauge("snas_proxy_flows", "Live flows.", self.flows as u64)?;
        let fp = &c.fast;
        f.gauge(
            "snas_proxy_fastpath_available",
            "1 while the in-kernel fast path is attached.",
            fp[0],
        )?;
        f.gauge(
            "snas_proxy_fastpath_flows",
            "Flows installed in the in-kernel fast path.",
            fp[1],
        )?;
        f.family(
            "snas_proxy_fastpath_packets",
            "Packets the in-kernel fast path carried, by direction.",
            MetricType::Counter,
            [
                ([("direction", "to_internet")], fp[2]),
                ([("direction", "to_nodes")], fp[4]),
            ],
        )?;
        f.family(
            "snas_proxy_fastpath_bytes",
            "Wire bytes the in-kernel fast path carried, by direction.",
            MetricType::Counter,
            [
                ([("direction", "to_internet")], fp[3]),
                ([("direction", "to_nodes")], fp[5]),
            ],
        )?;
        f.family(
            "snas_proxy_fastpath_diverted",
            "Packets the fast path looked at and left to userspace, by reason.",
            MetricType::Counter,
            DIVERT_REASONS
                .iter()
                .enumerate()
                .map(|(i, r)| ([("reason", *r)], fp[6 + i])),
        )?;
        f.counter(
            "snas_proxy_fastpath_errors",
            "Fast-path map updates that failed, and packets dropped after a failed rewrite.",
            fp[12],
        )?;
        let n = &self.names;
        f.family(
            "snas_proxy_name_checks",
            "Flows whose first payload the name check decided, by outcome (inspected counts every \
             flow looked at; held: flows whose first payload was held across packets, the rest \
             were decided in place).",
            MetricType::Counter,
            [
                ([("outcome", "inspected")], n.inspected),
                ([("outcome", "passed")], n.passed),
                ([("outcome", "mismatched")], n.mismatched),
                ([("outcome", "timed_out")], n.timed_out),
                ([("outcome", "other")], n.other),
                ([("outcome", "held")], n.held),
            ],
        )?;
        f.gauge(
            "snas_proxy_name_check_held_bytes",
            "Client bytes held while the name check waits for a flow's first payload.",
            self.name_held_bytes,
        )?;
        for (name, help, v) in [
            (
                "snas_proxy_hold_queue_packets",
                "Packets held while their job's policy is fetched.",
                u64::from(self.held_packets),
            ),
            (
                "snas_proxy_hold_queue_bytes",
                "Bytes held while their job's policy is fetched.",
                self.held_bytes,
            ),
            (
                "snas_proxy_pacing_queue_packets",
                "Packets waiting in the workers' pacing queues.",
                q.pacing_packets,
            ),
            (
                "snas_proxy_pacing_queue_bytes",
                "Bytes waiting in the workers' pacing queues.",
                q.pacing_bytes,
            ),
            (
                "snas_proxy_fair_queue_packets",
                "Packets waiting for their turn in the workers' fair queues.",
                q.fair_packets,
            ),
            (
                "snas_proxy_fair_queue_bytes",
                "Bytes waiting for their turn in the workers' fair queues.",
                q.fair_bytes,
            ),
            (
                "snas_proxy_fair_queue_tenants",
                "Tenants with packets in a fair queue (once per worker and direction).",
                q.fair_tenants,
            ),
        ] {
            f.gauge(name, help, v)?;
        }
        f.counter(
            "snas_proxy_fair_queue_served",
            "Packets served from the workers' fair queues.",
            q.fair_served,
        )?;
        f.family(
            "snas_proxy_fair_queue_dropped",
            "Packets the workers' fair queues shed (tenant_queue_full), by direction.",
            MetricType::Counter,
            [
                ([("direction", "from_nodes")], q.fair_dropped_from_nodes),
                ([("direction", "to_nodes")], q.fair_dropped_to_nodes),
            ],
        )?;
        f.one(
            "snas_proxy_fair_queue_wait_seconds",
            "Time served packets waited in the fair queues (divide by served for the mean).",
            MetricType::Counter,
            ConstCounter::new(std::time::Duration::from_nanos(q.fair_waited_ns).as_secs_f64()),
        )?;
        f.gauge(
            "snas_proxy_policies",
            "Verified policies cached.",
            x.policies as u64,
        )?;
        f.gauge(
            "snas_proxy_draining",
            "1 while draining.",
            u64::from(x.draining),
        )?;
        let ips: Vec<String> = self.nat.iter().map(|u| u.ip.to_string()).collect();
        f.family(
            "snas_proxy_nat_ports_live",
            "Live NAT ports per egress address.",
            MetricType::Gauge,
            ips.iter()
                .zip(&self.nat)
                .map(|(ip, u)| ([("egress_ip", ip.as_str())], u64::from(u.live))),
        )?;
        f.family(
            "snas_proxy_nat_busiest_destination_utilisation",
            "Highest fraction of ports used toward one destination, per egress address.",
            MetricType::Gauge,
            ips.iter().zip(&self.nat).map(|(ip, u)| {
                (
                    [("egress_ip", ip.as_str())],
                    u.busiest_destination_utilisation,
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Nanos;
    use crate::guard::GuardCounters;
    use crate::tier2::Tier2Config;

    fn engine() -> Tier2 {
        let cfg = Tier2Config::new(
            "192.0.2.1".parse().unwrap(),
            vec!["192.0.2.11".parse().unwrap()],
            vec!["198.51.100.64".parse().unwrap()],
        );
        Tier2::new(cfg, Nanos::ZERO).unwrap()
    }

    fn extra() -> Extra {
        Extra {
            guard: Some(GuardCounters::default()),
            ..Extra::default()
        }
    }

    /// Every family of docs/proxy.md, with its type, as `# TYPE` lines; nothing else.
    #[test]
    fn the_documented_families_and_types_are_exactly_those_exported() {
        let text = render(&Metrics::default(), &engine(), extra());
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "snas_proxy_packets_total counter",
                "snas_proxy_bytes_total counter",
                "snas_proxy_drops_total counter",
                "snas_proxy_refusals_sent_total counter",
                "snas_proxy_held_packets_total counter",
                "snas_proxy_held_released_total counter",
                "snas_proxy_jobs_ended_total counter",
                "snas_proxy_job_update_notices_total counter",
                "snas_proxy_tun_write_errors_total counter",
                "snas_proxy_node_send_failures_total counter",
                "snas_proxy_gso_segmented_total counter",
                "snas_proxy_tso_to_kernel_total counter",
                "snas_proxy_gso_whole_to_nodes_total counter",
                "snas_proxy_tun_read_refused_total counter",
                "snas_proxy_policy_fetch_failures_total counter",
                "snas_proxy_policy_fetches_total counter",
                "snas_proxy_resets_total counter",
                "snas_proxy_reset_flows_total counter",
                "snas_proxy_reset_probes_total counter",
                "snas_proxy_reset_unanswered_total counter",
                "snas_proxy_reset_skipped_total counter",
                "snas_proxy_reset_control_dropped_total counter",
                "snas_proxy_reset_closing_flows gauge",
                "snas_proxy_audit_lines_total counter",
                "snas_proxy_dns_queries_total counter",
                "snas_proxy_peer_bindings_total counter",
                "snas_proxy_guard_drops_total counter",
                "snas_proxy_flows gauge",
                "snas_proxy_fastpath_available gauge",
                "snas_proxy_fastpath_flows gauge",
                "snas_proxy_fastpath_packets_total counter",
                "snas_proxy_fastpath_bytes_total counter",
                "snas_proxy_fastpath_diverted_total counter",
                "snas_proxy_fastpath_errors_total counter",
                "snas_proxy_name_checks_total counter",
                "snas_proxy_name_check_held_bytes gauge",
                "snas_proxy_hold_queue_packets gauge",
                "snas_proxy_hold_queue_bytes gauge",
                "snas_proxy_pacing_queue_packets gauge",
                "snas_proxy_pacing_queue_bytes gauge",
                "snas_proxy_fair_queue_packets gauge",
                "snas_proxy_fair_queue_bytes gauge",
                "snas_proxy_fair_queue_tenants gauge",
                "snas_proxy_fair_queue_served_total counter",
                "snas_proxy_fair_queue_dropped_total counter",
                "snas_proxy_fair_queue_wait_seconds_total counter",
                "snas_proxy_policies gauge",
                "snas_proxy_draining gauge",
                "snas_proxy_nat_ports_live gauge",
                "snas_proxy_nat_busiest_destination_utilisation gauge",
            ]
        );
        let docs = include_str!("../../../docs/proxy.md");
        for t in &types {
            let name = t.split(' ').next().unwrap_or_default();
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not documented in docs/proxy.md"
            );
        }
    }

    #[test]
    fn samples_carry_their_labels_and_only_reasons_with_drops_appear() {
        let m = Metrics::default();
        add(&m.node_rx_packets, 7);
        add(&m.dns_refused, 2);
        let mut eng = engine();
        eng.count_drop(Reason::PortDenied);
        eng.count_drop(Reason::PortDenied);
        let x = Extra {
            draining: true,
            queues: QueueGauges {
                fair_waited_ns: 1_500_000_000,
                fair_dropped_to_nodes: 3,
                ..QueueGauges::default()
            },
            ..extra()
        };
        let text = render(&m, &eng, x);
        for want in [
            "snas_proxy_packets_total{direction=\"node_rx\"} 7\n",
            "snas_proxy_packets_total{direction=\"node_tx\"} 0\n",
            "snas_proxy_drops_total{tenant=\"unknown\",reason=\"port_denied\"} 2\n",
            "snas_proxy_dns_queries_total{outcome=\"refused\"} 2\n",
            "snas_proxy_audit_lines_total{outcome=\"suppressed\"} 0\n",
            "snas_proxy_guard_drops_total{hook=\"forward\"} 0\n",
            "snas_proxy_fair_queue_dropped_total{direction=\"to_nodes\"} 3\n",
            "snas_proxy_fair_queue_wait_seconds_total 1.5\n",
            "snas_proxy_draining 1\n",
            "snas_proxy_flows 0\n",
            "snas_proxy_nat_ports_live{egress_ip=\"198.51.100.64\"} 0\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
        assert_eq!(text.matches("snas_proxy_drops_total{").count(), 1, "{text}");
        // A verified tenant's drops are a series of their own.
        let mut tally = DropTally::default();
        tally.verified(
            snas_wire::TenantId(287_346_201),
            Reason::DestinationDenied,
            3,
        );
        tally.unknown(Reason::UntrustedSource, 1);
        let scrape = Scrape {
            drops: tally,
            ..Scrape::take(&m, &eng, Extra::default())
        };
        let text = scrape.render();
        for want in [
            "snas_proxy_drops_total{tenant=\"unknown\",reason=\"untrusted_source\"} 1\n",
            "snas_proxy_drops_total{tenant=\"287346201\",reason=\"destination_denied\"} 3\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
        assert_eq!(text.matches("snas_proxy_drops_total{").count(), 2, "{text}");
        let without_guard = render(&m, &eng, Extra::default());
        assert!(!without_guard.contains("snas_proxy_guard_drops_total"));
    }
}
