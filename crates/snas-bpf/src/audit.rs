//! Audit events from the `snas_audit` ring buffer.
//!
//! Events are rate limited in BPF per job (`NodeConfig::audit_per_sec`); what the limit or a
//! full ring suppresses is counted (`Tier1::audit_suppressed`).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddrV4};
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
}

/// One audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditEvent {
    /// CLOCK_MONOTONIC time of the decision.
    pub at_mono: Duration,
    /// Job key.
    pub job_key: u64,
    /// Kind and reason.
    pub kind: AuditKind,
    /// IP protocol number.
    pub proto: u8,
    /// Sandbox address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
}

impl AuditEvent {
    /// Parses one ring-buffer record; `None` if its size or kind is unknown.
    pub fn parse(bytes: &[u8]) -> Option<AuditEvent> {
        let e: types::audit_event = from_bytes(bytes)?;
        let kind = match e.kind {
            1 => AuditKind::Deny(Reason::from_code(u8::try_from(e.reason).ok()?)?),
            2 => AuditKind::NewFlow,
            _ => return None,
        };
        Some(AuditEvent {
            at_mono: Duration::from_nanos(e.ts_ns),
            job_key: e.job_key,
            kind,
            proto: e.proto,
            src: SocketAddrV4::new(Ipv4Addr::from(e.saddr.to_ne_bytes()), e.sport),
            dst: SocketAddrV4::new(Ipv4Addr::from(e.daddr.to_ne_bytes()), e.dport),
        })
    }
}
