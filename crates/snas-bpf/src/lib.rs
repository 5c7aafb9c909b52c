//! snas-bpf: the tier-1 host eBPF dataplane of SNAS (and the egress proxy's fast path) (C programs under `bpf/`, loaded with
//! libbpf-rs skeletons) and the typed Rust API the node agent uses to drive it.
//!
//! # Layout
//! - `bpf/sandbox_ingress.bpf.c`: TC ingress of each sandbox veth (traffic leaving the
//!   sandbox): validation, DNS capture, policy, flow admission, EDT, GENEVE encap.
//! - `bpf/sandbox_egress.bpf.c`: TC egress of each sandbox veth: restores the resolver
//!   address on DNS answers to captured queries.
//! - `bpf/uplink_ingress.bpf.c`: TC ingress of the underlay: GENEVE decap into the job.
//! - `bpf/lib/*.h`: one header per concern (parse, policy, conntrack, ratelimit, edt,
//!   geneve, maglev, audit, csum, maps, drop_reasons).
//! - `bpf/lib/reply.h`: RSTs and ICMP unreachables sent back into the sandbox.
//! - [`tier1`]: [`Tier1`] — load, pin, attach, per-job map programming, the infrastructure
//!   set, flow ageing, counters, audit.
//! - [`config`]: typed node/job/rule/proxy configuration.
//! - [`flows`]: flow states and idle timeouts of the ageing pass (pure).
//! - `binding`: the union of port rules a DNS-learned address holds (pure).
//! - [`maglev`]: pure Maglev table computation.
//! - [`counters`], [`audit`]: what the dataplane reports.
//! - [`fq`]: detection of the fq qdisc.
//! - [`fastpath`]: the egress proxy's in-kernel fast path (`bpf/proxy_fastpath.bpf.c`):
//!   load, attach, and the flow, clock and statistics maps its daemon mirrors decisions into.
//! - [`testing`]: BPF_PROG_TEST_RUN driver for the programs (root).
//! - [`skel`]: generated skeletons and BTF types.
//!
//! Operator documentation: `docs/tier1.md`.

pub mod audit;
mod binding;
pub mod config;
pub mod counters;
pub mod fastpath;
pub mod flows;
pub mod fq;
pub mod maglev;
mod pod;
pub mod skel;
pub mod testing;
pub mod tier1;

pub use audit::{AuditEvent, AuditKind};
pub use config::{
    Bps, JobConfig, JobKey, NodeConfig, PacketBudget, PolicySerial, PortRule, ProxyEntry,
    RuleProtocol, TenantId,
};
pub use counters::{DirCounters, JobCounters, PacketCount};
pub use flows::{FlowState, FlowTimeouts};
pub use fq::{fq_available, install_fq};
pub use tier1::{
    ensure_bpffs, mono_now, remove_pins, AgeingReport, AuditReader, DebugRecord, Tier1, Tier1Error,
};

/// Bytes GENEVE encapsulation adds: outer IPv4 20 + UDP 8 + GENEVE 8 + option 20 (the
/// overlay's constants are snas-wire's; `bpf/lib/geneve.h` is checked against them by
/// `tests/c_constants.rs`).
pub use snas_wire::geneve::OVERLAY_OVERHEAD;

/// The C header of the overlay (checked by `tests/c_constants.rs`).
pub const GENEVE_H: &str = include_str!("../bpf/lib/geneve.h");

/// The C header of the maps (checked by `tests/c_constants.rs`).
pub const MAPS_H: &str = include_str!("../bpf/lib/maps.h");

/// The C header that mirrors `snas_wire::Reason` (checked by `tests/drop_reasons.rs`).
pub const DROP_REASONS_H: &str = include_str!("../bpf/lib/drop_reasons.h");
