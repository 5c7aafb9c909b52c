//! Port-exhaustion safeguards seen from the conntrack API: quotas refuse one tenant's new flows
//! with a reason while another tenant still gets ports, and the pool recovers after flows close
//! and quarantine ends.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use snas_proxy::clock::Nanos;
use snas_proxy::conntrack::{Conntrack, ConntrackConfig, FlowId, FlowKey, Open};
use snas_proxy::nat::JobLimits;
use snas_wire::L4Proto;
use snas_wire::Reason;

const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 80));
const TENANT_A: u32 = 0xA;
const TENANT_B: u32 = 0xB;

fn secs(s: u64) -> Nanos {
    Nanos::from_nanos(s * 1_000_000_000)
}

fn key(job: u64, sport: u16) -> FlowKey {
    FlowKey {
        job: snas_wire::JobKey(job),
        proto: L4Proto::Tcp,
        src_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, (job % 200) as u8 + 1)),
        src_port: sport,
        dst_ip: SERVER,
        dst_port: 443,
    }
}

fn tracker(tenant_quota: u32, job_ports: u32) -> Conntrack {
    let mut cfg = ConntrackConfig::new(vec![EGRESS]);
    cfg.nat.max_ports_per_tenant = tenant_quota;
    cfg.nat.max_ports_per_job = job_ports;
    cfg.nat.quarantine = Duration::from_secs(60);
    Conntrack::new(cfg, secs(0)).expect("valid config")
}

/// Opens flows for `job` until refused; returns the flows and the refusal.
fn open_until_refused(
    ct: &mut Conntrack,
    job: u64,
    tenant: u32,
    limits: JobLimits,
    now: Nanos,
) -> (Vec<FlowId>, Reason) {
    let mut ids = Vec::new();
    for sport in 1..=u16::MAX {
        match ct.open(key(job, sport), snas_wire::TenantId(tenant), limits, now) {
            Open::Created { id, .. } => ids.push(id),
            Open::Refused(r) => return (ids, r),
            Open::Existing(_) => panic!("fresh key reported as existing"),
        }
    }
    panic!("never refused");
}

#[test]
fn job_hitting_max_connections_is_refused_while_another_tenant_connects() {
    let mut ct = tracker(100_000, 100_000);
    let limits = JobLimits {
        max_connections: 500,
        max_ports_per_destination: 10_000,
    };
    let (ids, reason) = open_until_refused(&mut ct, 1, TENANT_A, limits, secs(0));
    assert_eq!(reason, Reason::ConnectionLimit);
    assert_eq!(ids.len(), 500);
    assert!(matches!(
        ct.open(key(2, 1), snas_wire::TenantId(TENANT_B), limits, secs(0)),
        Open::Created { .. }
    ));
}

#[test]
fn tenant_port_quota_stops_all_its_jobs_but_not_another_tenant() {
    let mut ct = tracker(1_000, 100_000);
    let limits = JobLimits {
        max_connections: 10_000,
        max_ports_per_destination: 10_000,
    };
    let (first, r1) = open_until_refused(&mut ct, 1, TENANT_A, limits, secs(0));
    assert_eq!(r1, Reason::TenantPortQuota);
    assert_eq!(first.len(), 1_000);
    // A sibling job of the same tenant is refused too.
    assert_eq!(
        ct.open(key(3, 1), snas_wire::TenantId(TENANT_A), limits, secs(0)),
        Open::Refused(Reason::TenantPortQuota)
    );
    // Another tenant, same destination, still connects.
    let (other, r2) = open_until_refused(&mut ct, 2, TENANT_B, limits, secs(0));
    assert_eq!(other.len(), 1_000);
    assert_eq!(r2, Reason::TenantPortQuota);
}

#[test]
fn job_port_quota_counts_quarantined_ports() {
    let mut ct = tracker(100_000, 300);
    let limits = JobLimits {
        max_connections: 10_000,
        max_ports_per_destination: 10_000,
    };
    // Churn: open and close; the closed ports stay charged while quarantined.
    for sport in 1..=300u16 {
        let Open::Created { id, .. } = ct.open(
            key(1, sport),
            snas_wire::TenantId(TENANT_A),
            limits,
            secs(1),
        ) else {
            panic!("refused early at {sport}");
        };
        assert!(ct.remove(id, secs(1)).is_some());
    }
    assert_eq!(
        ct.open(key(1, 1000), snas_wire::TenantId(TENANT_A), limits, secs(2)),
        Open::Refused(Reason::PortQuota)
    );
    assert!(matches!(
        ct.open(
            key(1, 1000),
            snas_wire::TenantId(TENANT_A),
            limits,
            secs(61)
        ),
        Open::Created { .. }
    ));
}

#[test]
fn destination_cap_limits_one_job_to_one_destination() {
    let mut ct = tracker(100_000, 100_000);
    let limits = JobLimits {
        max_connections: 10_000,
        max_ports_per_destination: 50,
    };
    let (ids, reason) = open_until_refused(&mut ct, 1, TENANT_A, limits, secs(0));
    assert_eq!((ids.len(), reason), (50, Reason::DestinationPortCap));
    let elsewhere = FlowKey {
        dst_port: 80,
        ..key(1, 60_000)
    };
    assert!(matches!(
        ct.open(elsewhere, snas_wire::TenantId(TENANT_A), limits, secs(0)),
        Open::Created { .. }
    ));
}

#[test]
fn exhausted_pool_recovers_after_close_and_quarantine() {
    let mut cfg = ConntrackConfig::new(vec![EGRESS]);
    cfg.nat.ports = 40_000..=40_099;
    let mut ct = Conntrack::new(cfg, secs(0)).unwrap();
    let limits = JobLimits {
        max_connections: 10_000,
        max_ports_per_destination: 10_000,
    };
    let (ids, reason) = open_until_refused(&mut ct, 1, TENANT_A, limits, secs(0));
    assert_eq!((ids.len(), reason), (100, Reason::PortsExhausted));
    // Another tenant hits the same physical limit: the pool, not a quota.
    assert_eq!(
        ct.open(key(2, 1), snas_wire::TenantId(TENANT_B), limits, secs(0)),
        Open::Refused(Reason::PortsExhausted)
    );
    // The flows were never answered: they expire after the SYN timeout (30 s)...
    assert_eq!(ct.expire(secs(31)).count(), 100);
    assert!(ct.is_empty());
    // ...and their ports stay quarantined for 60 s more.
    assert_eq!(
        ct.open(key(2, 1), snas_wire::TenantId(TENANT_B), limits, secs(90)),
        Open::Refused(Reason::PortsExhausted)
    );
    assert_eq!(ct.expire(secs(92)).count(), 0);
    assert_eq!(ct.nat().quarantined(), 0);
    let (again, reason) = open_until_refused(&mut ct, 2, TENANT_B, limits, secs(92));
    assert_eq!((again.len(), reason), (100, Reason::PortsExhausted));
}
