//! Audit events from the `snas_audit` ring buffer.
//!
//! Events are rate limited in BPF per job (`NodeConfig::audit_per_sec`); what the limit or a
//! full ring suppresses is counted (`Tier1::audit_suppressed`).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use snas_wire::Reason;

use crate::pod::from_bytes;
use crate::skel::types;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    /// A packet was denied by policy.
    Deny(Reason),
    /// A new flow was admitted.
    NewFlow,
    /// Audit mode: the first packet of a flow no rule allows (the reason it would have been
    /// denied for) was let through.
    WouldDeny(Reason),
}

/// One audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditEvent {
    /// CLOCK_MONOTONIC time of the decision.
    pub at_mono: Duration,
    /// Job key.
    pub job_key: crate::JobKey,
    /// Kind and reason.
    pub kind: AuditKind,
    /// IP protocol number.
    pub proto: u8,
    /// Sandbox address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
}

fn addr(family: u8, b: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(*b))),
        _ => None,
    }
}

impl AuditEvent {
    /// Parses one ring-buffer record; `None` if its size or kind is unknown.
    pub fn parse(bytes: &[u8]) -> Option<AuditEvent> {
        let e: types::audit_event = from_bytes(bytes)?;
        let kind = match e.kind {
            1 => AuditKind::Deny(Reason::from_code(u8::try_from(e.reason).ok()?)?),
            2 => AuditKind::NewFlow,
            3 => AuditKind::WouldDeny(Reason::from_code(u8::try_from(e.reason).ok()?)?),
            _ => return None,
        };
        Some(AuditEvent {
            at_mono: Duration::from_nanos(e.ts_ns),
            job_key: crate::JobKey(e.job_key),
            kind,
            proto: e.proto,
            src: SocketAddr::new(addr(e.family, &e.saddr)?, e.sport),
            dst: SocketAddr::new(addr(e.family, &e.daddr)?, e.dport),
        })
    }
}
