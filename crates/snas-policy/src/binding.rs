//! How long an address learnt from a DNS answer stays usable: one rule shared by both tiers.
//!
//! The agent's stub (tier 1) and the proxy's resolver (tier 2) bind every answered address to
//! the job with the same numbers, so the two tiers never disagree about whether an address is
//! still bound:
//! - a TTL is clamped to [[`DNS_TTL_MIN`], [`DNS_TTL_MAX`]]: a floor (a TTL-0 answer must
//!   still serve the connection that follows it) and a ceiling (policy changes and address moves
//!   take effect within minutes); a record is never shortened below its TTL except by the
//!   ceiling;
//! - a binding stays usable for new connections for [`BINDING_GRACE`] after its TTL:
//!   applications use answers a little past their TTL (connection pools, happy eyeballs,
//!   programs that resolve once and connect later);
//! - established flows are never cut by a TTL (both tiers track them in conntrack).
//!
//! Pure constants and arithmetic; the clocks belong to the callers.

use std::time::Duration;

/// Shortest TTL answered and bound.
pub const DNS_TTL_MIN: Duration = Duration::from_secs(5);
/// Longest TTL answered and bound.
pub const DNS_TTL_MAX: Duration = Duration::from_secs(300);
/// How long a binding outlives its (clamped) TTL, in both tiers.
pub const BINDING_GRACE: Duration = Duration::from_secs(30);

/// A record's TTL in seconds, clamped to [[`DNS_TTL_MIN`], [`DNS_TTL_MAX`]].
pub fn clamp_ttl_secs(ttl: u32) -> u32 {
    let lo = u32::try_from(DNS_TTL_MIN.as_secs()).unwrap_or(u32::MAX);
    let hi = u32::try_from(DNS_TTL_MAX.as_secs()).unwrap_or(u32::MAX);
    ttl.clamp(lo, hi)
}

/// A record's TTL clamped to [[`DNS_TTL_MIN`], [`DNS_TTL_MAX`]].
pub fn clamp_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(clamp_ttl_secs(ttl)))
}

/// How long an address answered with `ttl` seconds stays usable for new connections: the
/// clamped TTL plus [`BINDING_GRACE`].
pub fn binding_lifetime(ttl: u32) -> Duration {
    clamp_ttl(ttl) + BINDING_GRACE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_floored_and_capped_but_never_shortened_otherwise() {
        assert_eq!(clamp_ttl(0), DNS_TTL_MIN);
        assert_eq!(clamp_ttl(60), Duration::from_secs(60));
        assert_eq!(clamp_ttl(86_400), DNS_TTL_MAX);
        assert_eq!(clamp_ttl_secs(7), 7);
    }

    #[test]
    fn a_binding_outlives_its_ttl_by_the_grace() {
        assert_eq!(binding_lifetime(60), Duration::from_secs(90));
        assert_eq!(binding_lifetime(1), DNS_TTL_MIN + BINDING_GRACE);
    }
}
