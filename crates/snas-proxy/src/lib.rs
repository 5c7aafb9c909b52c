//! Egress proxy (tier 2). This crate currently holds the sans-IO core: no sockets, no threads,
//! no clock reads — every call takes the current time as a [`clock::Nanos`] from the caller.
//!
//! # Layout
//! - [`clock`]: the injected monotonic time ([`clock::Nanos`], [`clock::Clock`],
//!   [`clock::ManualClock`], [`clock::MonotonicClock`]).
//! - [`conntrack`]: flows ↔ NAT tuples, TCP/UDP/ICMP states and idle expiry; owns the allocator.
//! - [`nat`]: SNAT port allocator with per-job/per-tenant quotas, per-destination caps,
//!   quarantine and gauges.
//! - [`token_bucket`]: pure token bucket (per-job `new_connections_per_sec`).
//! - [`pacer`]: EDT pacing per job and tenant with a bounded horizon, and a queue that releases
//!   packets when due.
//! - [`wheel`]: the hashed timer wheel under conntrack expiry and the pacer queue.
//! - [`bindings`]: (job, address) → names learnt by the proxy's resolver, with expiry.
//! - [`tier2`]: the per-packet pipeline in both directions — GENEVE receive rules, the job's
//!   verified policy, new-flow admission, NAT, pacing, refusals and audit records.
//!
//! Operator topics (timeouts, quotas, quarantine, horizon, memory): `docs/proxy-core.md`.
#![forbid(unsafe_code)]

pub mod bindings;
pub mod clock;
pub mod conntrack;
pub mod nat;
pub mod pacer;
pub mod tier2;
pub mod token_bucket;
pub mod wheel;
