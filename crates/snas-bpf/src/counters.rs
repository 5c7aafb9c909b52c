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

impl JobCounters {
    /// Dropped packets by reason, both directions summed (the agent's metrics view).
    pub fn drops_by_reason(&self) -> BTreeMap<Reason, u64> {
        let mut out = BTreeMap::new();
        for d in [&self.from_sandbox, &self.to_sandbox] {
            for (r, c) in &d.drops {
                *out.entry(*r).or_insert(0) += c.packets;
            }
        }
        out
    }
}

/// Direction index in counter keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Leaving the sandbox.
    FromSandbox = 0,
    /// Toward the sandbox.
    ToSandbox = 1,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_by_reason_sums_both_directions() {
        let mut c = JobCounters::default();
        let pc = |packets| PacketCount { packets, bytes: 0 };
        c.from_sandbox.drops.insert(Reason::Malformed, pc(2));
        c.to_sandbox.drops.insert(Reason::Malformed, pc(3));
        c.to_sandbox.drops.insert(Reason::GeneveOption, pc(1));
        let m = c.drops_by_reason();
        assert_eq!(m.get(&Reason::Malformed), Some(&5));
        assert_eq!(m.get(&Reason::GeneveOption), Some(&1));
        assert_eq!(m.len(), 2);
    }
}
