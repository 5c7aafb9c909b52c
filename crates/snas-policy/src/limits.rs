//! Per-job resource limits and their defaults.
//!
//! # Defaults (nothing is unlimited by accident)
//! | limit | default | accepted |
//! |---|---|---|
//! | `egress_bps` | 100 Mbit/s | 1 bit/s ..= 1 Tbit/s |
//! | `ingress_bps` | 100 Mbit/s | 1 bit/s ..= 1 Tbit/s |
//! | `max_connections` | 256 | 1 ..= 1,000,000 |
//! | `new_connections_per_sec` | 50 | 1 ..= 1,000,000 |
//! | `new_connections_burst` | 100 | 1 ..= 1,000,000 |
//! | `max_ports_per_destination` | 1024 | 1 ..= 65,535 |
//!
//! In the signed claims bandwidths are integers in bits per second.

use crate::units::Bps;
use serde::{Deserialize, Serialize};

/// Default bandwidth each way: 100 Mbit/s.
pub const DEFAULT_BPS: Bps = match Bps::mbit(100) {
    Some(b) => b,
    None => panic!("100 Mbit/s is not zero"),
};

/// Upper bound of the connection counts.
pub const MAX_COUNT: u64 = 1_000_000;
/// Upper bound of `max_ports_per_destination`.
pub const MAX_PORTS_PER_DESTINATION: u64 = 65_535;

/// Validated limits of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawLimits", into = "RawLimits")]
pub struct Limits {
    /// Bandwidth sandbox → world.
    pub egress_bps: Bps,
    /// Bandwidth world → sandbox (enforced by the proxy).
    pub ingress_bps: Bps,
    /// Concurrent flows.
    pub max_connections: u32,
    /// New flows per second (token bucket rate).
    pub new_connections_per_sec: u32,
    /// New-flow token bucket depth.
    pub new_connections_burst: u32,
    /// NAT ports one job may hold towards one destination.
    pub max_ports_per_destination: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            egress_bps: DEFAULT_BPS,
            ingress_bps: DEFAULT_BPS,
            max_connections: 256,
            new_connections_per_sec: 50,
            new_connections_burst: 100,
            max_ports_per_destination: 1024,
        }
    }
}

/// A count outside its accepted range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value} is out of range 1..={max}")]
pub struct CountError {
    /// The value given.
    pub value: i64,
    /// The largest accepted value.
    pub max: u64,
}

/// Checks a count against `1..=max`.
pub fn check_count(value: i64, max: u64) -> Result<u32, CountError> {
    if value >= 1 && (value as u64) <= max {
        u32::try_from(value).map_err(|_| CountError { value, max })
    } else {
        Err(CountError { value, max })
    }
}

/// The names of the limit keys, for field paths in errors.
pub const FIELDS: [&str; 6] = [
    "egress_bps",
    "ingress_bps",
    "max_connections",
    "new_connections_per_sec",
    "new_connections_burst",
    "max_ports_per_destination",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    egress_bps: u64,
    ingress_bps: u64,
    max_connections: i64,
    new_connections_per_sec: i64,
    new_connections_burst: i64,
    max_ports_per_destination: i64,
}

impl From<Limits> for RawLimits {
    fn from(l: Limits) -> RawLimits {
        RawLimits {
            egress_bps: l.egress_bps.get(),
            ingress_bps: l.ingress_bps.get(),
            max_connections: l.max_connections.into(),
            new_connections_per_sec: l.new_connections_per_sec.into(),
            new_connections_burst: l.new_connections_burst.into(),
            max_ports_per_destination: l.max_ports_per_destination.into(),
        }
    }
}

impl TryFrom<RawLimits> for Limits {
    type Error = String;
    fn try_from(r: RawLimits) -> Result<Limits, String> {
        let bps = |v: u64, name: &str| {
            Bps::checked(v)
                .map_err(|_| format!("{name}: {v} bit/s out of range 1..={}", Bps::MAX.get()))
        };
        let count =
            |v: i64, max: u64, name: &str| check_count(v, max).map_err(|e| format!("{name}: {e}"));
        Ok(Limits {
            egress_bps: bps(r.egress_bps, "egress_bps")?,
            ingress_bps: bps(r.ingress_bps, "ingress_bps")?,
            max_connections: count(r.max_connections, MAX_COUNT, "max_connections")?,
            new_connections_per_sec: count(
                r.new_connections_per_sec,
                MAX_COUNT,
                "new_connections_per_sec",
            )?,
            new_connections_burst: count(
                r.new_connections_burst,
                MAX_COUNT,
                "new_connections_burst",
            )?,
            max_ports_per_destination: count(
                r.max_ports_per_destination,
                MAX_PORTS_PER_DESTINATION,
                "max_ports_per_destination",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_finite_and_round_trip_json() {
        let l = Limits::default();
        let j = serde_json::to_value(l).expect("ser");
        assert_eq!(j["egress_bps"], 100_000_000);
        assert_eq!(serde_json::from_value::<Limits>(j).expect("de"), l);
    }

    #[test]
    fn out_of_range_claims_are_rejected() {
        let mut j = serde_json::to_value(Limits::default()).expect("ser");
        j["max_connections"] = 0.into();
        let e = serde_json::from_value::<Limits>(j.clone()).expect_err("zero");
        assert!(e.to_string().contains("max_connections"), "{e}");
        j["max_connections"] = 5.into();
        j["max_ports_per_destination"] = 70_000.into();
        assert!(serde_json::from_value::<Limits>(j).is_err());
    }

    #[test]
    fn check_count_bounds() {
        assert_eq!(check_count(1, 10), Ok(1));
        assert_eq!(check_count(10, 10), Ok(10));
        assert!(check_count(11, 10).is_err());
        assert!(check_count(-1, 10).is_err());
    }
}
