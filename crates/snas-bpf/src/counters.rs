//! Per-job, per-direction, per-reason packet and byte counts read from `snas_counters`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use snas_wire::Reason;

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketCount {
    /// Packets.
    pub packets: u64,
    /// Bytes (frame length as the program saw it).
    pub bytes: u64,
}

/// Counts of one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Forwarded (encapsulated, decapsulated, or DNS handed to the stub).
    pub forwarded: PacketCount,
    /// Drops by reason (reasons with no drops are absent).
    pub drops: BTreeMap<Reason, PacketCount>,
}

impl DirCounters {
    /// Drops of one reason (zero if none).
    pub fn dropped(&self, reason: Reason) -> PacketCount {
        self.drops.get(&reason).copied().unwrap_or_default()
    }
}

/// All counts of one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCounters {
    /// Traffic leaving the sandbox (sandbox-veth ingress).
    pub from_sandbox: DirCounters,
    /// Traffic toward the sandbox (uplink ingress, decapsulation).
    pub to_sandbox: DirCounters,
}

/// Direction index in counter keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Leaving the sandbox.
    FromSandbox = 0,
    /// Toward the sandbox.
    ToSandbox = 1,
}
