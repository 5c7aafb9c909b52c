//! Tier-2 drop counters by tenant and reason (`snas_proxy_drops_total{tenant,reason}`,
//! `GET /v1/drops`).
//!
//! # What it owns
//! [`DropTally`]: one count per (tenant, [`Reason`]) for every drop and refusal of the engine.
//! Pure bookkeeping; the engine ([`crate::tier2`]) decides whom a drop is charged to.
//!
//! # Who a drop is charged to ([`DropTenant`])
//! - [`DropTenant::Tenant`]: the tenant of a *verified* job — the packet's job has a verified
//!   policy and the overlay option's tenant id is that policy's (or, from the internet side,
//!   the packet belongs to a flow the engine admitted).
//! - [`DropTenant::Unknown`]: everything before that point (untrusted source, malformed
//!   datagram, unknown job, a policy that failed to verify, a tenant id that does not match
//!   the job's policy, packets held for a policy that never came) and drops the caller counts
//!   without naming a verified tenant.
//! - [`DropTenant::Other`]: drops of verified tenants beyond the first [`MAX_TENANT_SERIES`].
//!
//! # Invariants and limits
//! - The label set is bounded: a tenant gets its own series only once a verified policy of
//!   that tenant was matched by the engine, so a node (or anyone spoofing GENEVE) cannot mint
//!   series with made-up tenant ids; and at most [`MAX_TENANT_SERIES`] tenants get one. Per-job
//!   series are never made (jobs come and go; the per-job detail is in the audit log).
//! - Series are never removed while the proxy runs (Prometheus counters only grow); a proxy
//!   serving more than [`MAX_TENANT_SERIES`] tenants in its lifetime counts the rest as
//!   `other`. Memory: one `[u64; Reason::COUNT]` per series (about 300 bytes).
//! - [`DropTally::by_reason`] is the sum over tenants: the figures `snas_proxy_drops_total`
//!   had before it was split.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use snas_wire::{Reason, TenantId};

/// Most tenants with a series of their own (the rest are `other`).
pub const MAX_TENANT_SERIES: usize = 1024;

/// Who a drop is charged to; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropTenant {
    /// A drop before the packet was tied to a verified job.
    Unknown,
    /// Verified tenants beyond [`MAX_TENANT_SERIES`].
    Other,
    /// The tenant of a verified job.
    Tenant(TenantId),
}

impl fmt::Display for DropTenant {
    /// The label value: `unknown`, `other`, or the tenant id in decimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropTenant::Unknown => f.write_str("unknown"),
            DropTenant::Other => f.write_str("other"),
            DropTenant::Tenant(t) => fmt::Display::fmt(t, f),
        }
    }
}

/// A label value that is neither `unknown`, `other` nor a decimal tenant id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a drop tenant: expected `unknown`, `other` or a decimal tenant id")]
pub struct DropTenantError(pub String);

impl FromStr for DropTenant {
    type Err = DropTenantError;
    fn from_str(s: &str) -> Result<DropTenant, DropTenantError> {
        match s {
            "unknown" => Ok(DropTenant::Unknown),
            "other" => Ok(DropTenant::Other),
            _ if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse()
                .map(|t| DropTenant::Tenant(TenantId(t)))
                .map_err(|_| DropTenantError(s.to_owned())),
            _ => Err(DropTenantError(s.to_owned())),
        }
    }
}

/// JSON map keys and values: the label text.
impl serde::Serialize for DropTenant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DropTenant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DropTenant, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Counts per reason code.
pub type ReasonCounts = [u64; Reason::COUNT];

/// Drop counters by tenant and reason. See the module documentation.
#[derive(Debug, Clone)]
pub struct DropTally {
    unknown: ReasonCounts,
    other: ReasonCounts,
    tenants: HashMap<TenantId, ReasonCounts>,
}

impl Default for DropTally {
    fn default() -> DropTally {
        DropTally {
            unknown: [0; Reason::COUNT],
            other: [0; Reason::COUNT],
            tenants: HashMap::new(),
        }
    }
}

impl DropTally {
    /// Counts `n` drops for `r` not tied to a verified job.
    pub fn unknown(&mut self, r: Reason, n: u64) {
        self.unknown[usize::from(r.code())] += n;
    }

    /// Counts `n` drops for `r` of a verified job of `tenant` (gives the tenant a series if
    /// there is room).
    pub fn verified(&mut self, tenant: TenantId, r: Reason, n: u64) {
        let room = self.tenants.len() < MAX_TENANT_SERIES;
        let row = match self.tenants.get_mut(&tenant) {
            Some(row) => row,
            None if room => self.tenants.entry(tenant).or_insert([0; Reason::COUNT]),
            None => &mut self.other,
        };
        row[usize::from(r.code())] += n;
    }

    /// Counts `n` drops for `r` claimed for `tenant` by an unverified source (a GENEVE option
    /// read before any check): charged to the tenant only if it already has a series, else to
    /// `unknown` — so unverified ids never add series.
    pub fn claimed(&mut self, tenant: Option<TenantId>, r: Reason, n: u64) {
        match tenant.and_then(|t| self.tenants.get_mut(&t)) {
            Some(row) => row[usize::from(r.code())] += n,
            None => self.unknown(r, n),
        }
    }

    /// Every drop by reason code, all tenants together.
    pub fn by_reason(&self) -> ReasonCounts {
        let mut sum = self.unknown;
        for row in self.tenants.values().chain([&self.other]) {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
        }
        sum
    }

    /// The series: `unknown`, `other`, then each tenant (in no particular order), with their
    /// counts by reason code.
    pub fn series(&self) -> impl Iterator<Item = (DropTenant, &ReasonCounts)> + '_ {
        [
            (DropTenant::Unknown, &self.unknown),
            (DropTenant::Other, &self.other),
        ]
        .into_iter()
        .chain(
            self.tenants
                .iter()
                .map(|(t, c)| (DropTenant::Tenant(*t), c)),
        )
    }

    /// The counts of one tenant's series (all zero if it has none).
    pub fn of(&self, who: DropTenant) -> ReasonCounts {
        match who {
            DropTenant::Unknown => self.unknown,
            DropTenant::Other => self.other,
            DropTenant::Tenant(t) => self.tenants.get(&t).copied().unwrap_or([0; Reason::COUNT]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: &ReasonCounts, r: Reason) -> u64 {
        c[usize::from(r.code())]
    }

    #[test]
    fn verified_drops_are_counted_under_their_tenant_and_summed_by_reason() {
        let mut t = DropTally::default();
        t.verified(TenantId(7), Reason::PortDenied, 2);
        t.verified(TenantId(8), Reason::PortDenied, 1);
        t.unknown(Reason::UntrustedSource, 5);
        assert_eq!(
            at(&t.of(DropTenant::Tenant(TenantId(7))), Reason::PortDenied),
            2
        );
        assert_eq!(at(&t.of(DropTenant::Unknown), Reason::UntrustedSource), 5);
        let sum = t.by_reason();
        assert_eq!(at(&sum, Reason::PortDenied), 3);
        assert_eq!(at(&sum, Reason::UntrustedSource), 5);
        assert_eq!(t.series().count(), 4);
    }

    #[test]
    fn unverified_tenant_ids_never_add_series() {
        let mut t = DropTally::default();
        for id in 0..10_000u32 {
            t.claimed(Some(TenantId(id)), Reason::TenantQueueFull, 1);
        }
        assert_eq!(t.series().count(), 2, "only unknown and other");
        assert_eq!(
            at(&t.of(DropTenant::Unknown), Reason::TenantQueueFull),
            10_000
        );
        t.verified(TenantId(3), Reason::PortDenied, 1);
        t.claimed(Some(TenantId(3)), Reason::TenantQueueFull, 1);
        assert_eq!(
            at(
                &t.of(DropTenant::Tenant(TenantId(3))),
                Reason::TenantQueueFull
            ),
            1,
            "a tenant with a series is charged its claimed drops"
        );
    }

    #[test]
    fn tenants_beyond_the_bound_share_the_other_series() {
        let mut t = DropTally::default();
        let n = MAX_TENANT_SERIES as u32 + 500;
        for id in 0..n {
            t.verified(TenantId(id), Reason::DestinationDenied, 1);
        }
        assert_eq!(t.series().count(), MAX_TENANT_SERIES + 2);
        assert_eq!(at(&t.of(DropTenant::Other), Reason::DestinationDenied), 500);
        assert_eq!(
            at(&t.by_reason(), Reason::DestinationDenied),
            u64::from(n),
            "nothing is lost"
        );
    }

    #[test]
    fn drop_tenants_round_trip_through_their_label_text() {
        for d in [
            DropTenant::Unknown,
            DropTenant::Other,
            DropTenant::Tenant(TenantId(0)),
            DropTenant::Tenant(TenantId(u32::MAX)),
        ] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        for bad in ["", "Unknown", "-1", "4294967296", "0x10", " 7"] {
            assert!(bad.parse::<DropTenant>().is_err(), "{bad}");
        }
    }
}
