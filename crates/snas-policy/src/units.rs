//! Quantities with units: bandwidth ([`Bps`]) and policy lifetimes.
//!
//! # Grammar
//! - Bandwidth: the grammar of [`snas_wire::Bps::parse`]: `<integer><unit>`, optional single
//!   space, unit case-insensitive, decimal multipliers (1 Kbit = 1000 bit): `bit`/`bps`,
//!   `Kbit`/`Kbps`, `Mbit`/`Mbps`, `Gbit`/`Gbps`. Byte units (`MB`, `MiB`) are rejected on
//!   purpose: the policy speaks bits. Zero is rejected, and so is anything above [`Bps::MAX`]
//!   (1 Tbit/s).
//! - Lifetimes use humantime (`90s`, `15m`, `1h`, `1h 30m`), whole seconds, 1 s ..= 24 h.

use std::fmt;
use std::time::Duration;

pub use snas_wire::BpsError;

/// Bits per second as a policy's limits carry it: validated `1 ..= Bps::MAX` by [`Bps::parse`]
/// and when the claims are read, with the grammar of [`snas_wire::Bps`].
///
/// Transitional (issue 14): the rate type of the workspace is [`snas_wire::Bps`] (never zero).
/// This wrapper keeps its public `u64` only because snas-proxy still reads `.0`
/// (`tier2.rs`); once it reads [`Bps::rate`], this type becomes `pub use snas_wire::Bps`.
/// Other crates take [`Bps::rate`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Bps(pub u64);

impl Bps {
    /// Largest accepted value: 1 Tbit/s.
    pub const MAX: Bps = Bps(snas_wire::Bps::MAX.get());

    /// Megabits per second.
    pub const fn mbit(n: u64) -> Bps {
        Bps(n * 1_000_000)
    }

    /// The value in bits per second.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The rate as the workspace's rate type; `Err(BpsError::Zero)` for a hand-built zero (a
    /// parsed or verified limit is never zero).
    pub fn rate(self) -> Result<snas_wire::Bps, BpsError> {
        snas_wire::Bps::try_from(self.0)
    }

    /// Parses the grammar of [`snas_wire::Bps::parse`] (1 bit/s ..= 1 Tbit/s).
    pub fn parse(s: &str) -> Result<Bps, BpsError> {
        snas_wire::Bps::parse(s).map(Bps::from)
    }
}

impl From<snas_wire::Bps> for Bps {
    fn from(b: snas_wire::Bps) -> Bps {
        Bps(b.get())
    }
}

impl fmt::Display for Bps {
    /// The largest unit that represents the value exactly: `100Mbit`, `1500Kbit`, `7bit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate() {
            Ok(r) => fmt::Display::fmt(&r, f),
            Err(_) => f.write_str("0bit"),
        }
    }
}

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

    /// The grammar itself is tested where it lives (`snas_wire::types`); this checks that the
    /// policy's `Bps` gives exactly the wire's answer, accepted or refused, for the same texts.
    #[test]
    fn bandwidth_parses_with_the_wire_grammar() {
        for s in [
            "100Mbit",
            "1Gbit",
            "64 kbit",
            "5Mbps",
            "1200bps",
            "7bit",
            "100MB",
            "100MiB",
            "0Mbit",
            "Mbit",
            "1.5Gbit",
            "-1Mbit",
            "100",
            "2000Gbit",
            "99999999999999999999bit",
        ] {
            assert_eq!(
                Bps::parse(s),
                snas_wire::Bps::parse(s).map(Bps::from),
                "{s}"
            );
        }
        assert_eq!(Bps::parse("100Mbit"), Ok(Bps(100_000_000)));
    }

    #[test]
    fn bandwidth_display_round_trips() {
        for s in ["100Mbit", "1500Kbit", "7bit", "1Gbit", "1000Gbit"] {
            let b = Bps::parse(s).expect("valid");
            assert_eq!(b.to_string(), s);
            assert_eq!(Bps::parse(&b.to_string()), Ok(b));
        }
    }

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
