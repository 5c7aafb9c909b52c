//! Synthetic flow fleets for benchmarks (not part of the API).
//!
//! Owns the one definition of the benchmark flows, so the criterion bench (`benches/core.rs`)
//! and the scale scenario of `snas-bench` (memory per flow) load the same tables.
//! Flows come from 1000 jobs (10 tenants) behind one egress address, in one of two destination
//! mixes: 400 destinations on port 443 (a fleet sharing a few services), or every flow to its own
//! (address, port) (the worst case for the NAT allocator's per-destination state).
//! Limits: at most about 1M distinct flows (source ports run out beyond `1000 × 64,511`, and the
//! distinct mix has 768 addresses × 65,535 ports).

use std::net::{IpAddr, Ipv4Addr};

use crate::clock::Nanos;
use crate::conntrack::TcpFlags;
use crate::conntrack::{Conntrack, ConntrackConfig, ConntrackError, Direction, FlowKey, Open};
use crate::nat::JobLimits;
use snas_wire::L4Proto;

/// The one egress address of the synthetic proxy.
pub const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// Job limits that never refuse, so the tables hold exactly the flows asked for.
pub const WIDE: JobLimits = JobLimits {
    max_connections: u32::MAX,
    max_ports_per_destination: u32::MAX,
};

/// A flow that could not be opened (the tracker refused it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("synthetic flow {index}: open returned {outcome}, not Created")]
pub struct FillError {
    /// Index of the flow in the fleet.
    pub index: u32,
    /// The `Open` outcome, spelt by `Debug`.
    pub outcome: String,
}

/// A documentation-range address by index (768 of them).
pub fn doc_ip(i: u32) -> IpAddr {
    let (net, host) = (i / 256 % 3, (i % 256) as u8);
    IpAddr::V4(match net {
        0 => Ipv4Addr::new(192, 0, 2, host),
        1 => Ipv4Addr::new(198, 51, 100, host),
        _ => Ipv4Addr::new(203, 0, 113, host),
    })
}

/// Flow `i` of the fleet; `distinct_dests` picks the worst-case destination mix.
pub fn flow_key(i: u32, distinct_dests: bool) -> FlowKey {
    let job = u64::from(i % 1000);
    let (dst_ip, dst_port) = if distinct_dests {
        (doc_ip(i % 768), (i / 768) as u16 + 1)
    } else {
        (doc_ip(i % 400), 443)
    };
    FlowKey {
        job: snas_wire::JobKey(job.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        proto: L4Proto::Tcp,
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, (job / 256) as u8, (job % 256) as u8)),
        src_port: (i / 1000) as u16 + 1024,
        dst_ip,
        dst_port,
    }
}

/// An empty tracker for up to `max_flows` flows with unlimited per-job and per-tenant ports.
pub fn tracker(max_flows: u32) -> Result<Conntrack, ConntrackError> {
    let mut cfg = ConntrackConfig::new(vec![EGRESS]);
    cfg.max_flows = max_flows;
    cfg.nat.max_ports_per_job = u32::MAX;
    cfg.nat.max_ports_per_tenant = u32::MAX;
    Conntrack::new(cfg, Nanos::ZERO)
}

/// Opens flows `0..n` and moves each to established (as a SYN-ACK reply would).
pub fn fill(ct: &mut Conntrack, n: u32, distinct_dests: bool) -> Result<(), FillError> {
    for i in 0..n {
        match ct.open(
            flow_key(i, distinct_dests),
            snas_wire::TenantId(i % 10),
            WIDE,
            Nanos::ZERO,
        ) {
            Open::Created { id, .. } => {
                ct.observe(
                    id,
                    Direction::Reply,
                    TcpFlags::SYN | TcpFlags::ACK,
                    60,
                    Nanos::ZERO,
                );
            }
            other => {
                return Err(FillError {
                    index: i,
                    outcome: format!("{other:?}"),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_opens_every_flow_of_both_mixes() {
        for distinct in [false, true] {
            let mut ct = tracker(20_000).unwrap();
            fill(&mut ct, 10_000, distinct).unwrap();
            assert_eq!(ct.len(), 10_000);
            assert!(ct.lookup(&flow_key(9_999, distinct)).is_some());
        }
    }

    #[test]
    fn fill_reports_the_flow_the_tracker_refused() {
        let mut ct = tracker(100).unwrap();
        let err = fill(&mut ct, 101, false).unwrap_err();
        assert_eq!(err.index, 100);
    }
}
