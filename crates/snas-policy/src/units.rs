//! Quantities with units: bandwidth ([`Bps`]) and policy lifetimes.
//!
//! # Grammar
//! - Bandwidth: the grammar of [`snas_wire::Bps::parse`]: `<integer><unit>`, optional single
//!   space, unit case-insensitive, decimal multipliers (1 Kbit = 1000 bit): `bit`/`bps`,
//!   `Kbit`/`Kbps`, `Mbit`/`Mbps`, `Gbit`/`Gbps`. Byte units (`MB`, `MiB`) are rejected on
//!   purpose: the policy speaks bits. Zero is rejected, and so is anything above [`Bps::MAX`]
//!   (1 Tbit/s). The grammar and its tests live with the type, in `snas_wire::types`.
//! - Lifetimes use humantime (`90s`, `15m`, `1h`, `1h 30m`), whole seconds, 1 s ..= 24 h.

use std::time::Duration;

/// The workspace's one rate type (never zero); the policy's limits carry it.
pub use snas_wire::{Bps, BpsError};

/// Default policy lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest policy lifetime, enforced when authoring and again when verifying.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a lifetime string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    /// Not a humantime duration.
    #[error("`{0}` is not a duration (examples: \"90s\", \"15m\", \"1h\")")]
    Syntax(String),
    /// Zero or sub-second.
    #[error("ttl must be at least 1s")]
    TooShort,
    /// Above 24 h.
    #[error("ttl {0} is above the maximum of 24h")]
    TooLong(String),
}

/// Parses a policy lifetime (humantime syntax, 1 s ..= 24 h, fractions of a second dropped).
pub fn parse_ttl(s: &str) -> Result<Duration, TtlError> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| TtlError::Syntax(s.to_owned()))?;
    let d = Duration::from_secs(d.as_secs());
    if d.is_zero() {
        return Err(TtlError::TooShort);
    }
    if d > MAX_TTL {
        return Err(TtlError::TooLong(s.trim().to_owned()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds_are_enforced() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("24h"), Ok(MAX_TTL));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert!(matches!(parse_ttl("25h"), Err(TtlError::TooLong(_))));
        assert_eq!(parse_ttl("0s"), Err(TtlError::TooShort));
        assert!(matches!(parse_ttl("soon"), Err(TtlError::Syntax(_))));
    }
}
