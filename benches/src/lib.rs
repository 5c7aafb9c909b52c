//! SNAS benchmarks: SNAS against the paths an operator would otherwise pick (the direct path,
//! nftables + kernel NAT, squid), and SNAS in gVisor against gVisor alone, side by side on the
//! local testbed, plus scale figures.
//!
//! # Layout
//! - [`results`]: the data every scenario produces (tables, charts, goals, raw samples).
//! - [`stats`]: percentiles, medians, Jain's index.
//! - [`client`]: the workload programs (TCP_RR, TCP_CRR, bulk, UDP flood, connection loops),
//!   run on every path.
//! - [`paths`]: the baseline namespaces, nftables, squid, and starting clients on each path.
//! - [`sandbox`]: gvisor-direct's sandbox (the client in gVisor on a plain veth, no SNAS).
//! - [`scenarios`]: the network scenarios, alternating between paths.
//! - [`ipv6`]: TCP_RR and bulk over IPv4 and IPv6 side by side (direct and SNAS).
//! - [`workload`]: ordinary programs' loops under the policy defaults, and fresh jobs' first
//!   connections.
//! - [`tier1_edt`]: tier 1's departure stamps at 10M/100M/1G (BPF_PROG_TEST_RUN).
//! - [`scale`]: job set-up at 1/100/1000 jobs, proxy memory, the 10k-rule policy.
//! - [`steering`]: the proxies' receive processing on a CPU of its own, and per-CPU time and
//!   packets (the proxy packet rate per core).
//! - [`machine`]: what machine the figures come from.
//! - [`report`]: JSON, PNG charts, text and markdown tables.
//! - [`orchestrate`]: one whole run: testbed up, paths, scenarios, results, teardown.
//! - [`publish`]: a run's tables and charts into docs/benchmarks.md.
pub mod client;
pub mod first_payload;
pub mod ipv6;
pub mod machine;
pub mod orchestrate;
pub mod paths;
pub mod publish;
pub mod report;
pub mod results;
pub mod sandbox;
pub mod scale;
pub mod scenarios;
pub mod stats;
pub mod steering;
pub mod tier1_edt;
pub mod workload;
