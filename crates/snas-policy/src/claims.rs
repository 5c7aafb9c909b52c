//! The policy model: an unsigned [`PolicyDraft`] (what an author wrote) and the [`PolicyClaims`]
//! that are signed and verified.
//!
//! # Invariants
//! - `tenant` matches `[a-z0-9-]{1,63}`; `job` matches `[A-Za-z0-9._-]{1,128}`; `jti` matches
//!   `[A-Za-z0-9_-]{16,128}` (the signer uses 128 random bits, base64url).
//! - At most [`MAX_RULES`] rules (`egress` and `deny` together); `nbf <= exp`; `iat`, `nbf` and `exp` at most
//!   2^53 − 1 (the strict JSON profile of [`crate::json`]: a signer never produces a token the
//!   verifier refuses for its numbers).
//! - Deserialising [`PolicyClaims`] re-checks all of the above plus every rule and limit, and
//!   rejects unknown fields: a verifier never trusts the signer to have validated.
//! - `mode` and `deny` are left out of the claims when they are the defaults (`enforce`, no
//!   deny rules), so a policy that uses neither signs to the same claims as before they existed
//!   and older verifiers accept it; one that uses them is refused by older verifiers (unknown
//!   claim), never silently widened.

use crate::json::MAX_SAFE_INTEGER;
use crate::limits::Limits;
use crate::rules::{DenyRule, EgressRule};
use crate::units::DEFAULT_TTL;
use serde::{Deserialize, Serialize};
use snas_wire::{JobKey, PolicySerial, TenantId};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most egress rules a policy may hold.
pub const MAX_RULES: usize = 16_384;

/// How a policy is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Destinations the rules do not allow are denied (the default).
    #[default]
    Enforce,
    /// Learning mode: public destinations the rules do not allow are let through and audited
    /// `would_deny`; infrastructure, always-denied ranges and `[[deny]]` rules stay denied.
    Audit,
}

impl Mode {
    /// Whether this is the default, [`Mode::Enforce`].
    pub fn is_enforce(&self) -> bool {
        *self == Mode::Enforce
    }

    /// `enforce` or `audit`.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }

    /// Parses `enforce` or `audit`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy as authored, before it gets an id, a serial and validity times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDraft {
    /// Tenant name.
    pub tenant: String,
    /// Job name.
    pub job: String,
    /// Underlay address of the job's node, if pinned.
    pub node: Option<IpAddr>,
    /// Lifetime from signing.
    pub ttl: Duration,
    /// Enforce (default) or audit.
    pub mode: Mode,
    /// Rules, in order (the index is the rule number reported by the matcher).
    pub egress: Vec<EgressRule>,
    /// Deny rules, in order (numbered from 0 on their own: "deny rule N").
    pub deny: Vec<DenyRule>,
    /// Limits (defaults filled in).
    pub limits: Limits,
}

impl PolicyDraft {
    /// A draft with the default TTL and limits and no rules.
    pub fn new(tenant: &str, job: &str) -> PolicyDraft {
        PolicyDraft {
            tenant: tenant.to_owned(),
            job: job.to_owned(),
            node: None,
            ttl: DEFAULT_TTL,
            mode: Mode::Enforce,
            egress: Vec::new(),
            deny: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// The claims to sign: `iat = nbf = now`, `exp = now + ttl`.
    pub fn to_claims(&self, jti: &str, serial: PolicySerial, now: SystemTime) -> PolicyClaims {
        let iat = unix_secs(now);
        PolicyClaims {
            jti: jti.to_owned(),
            iat,
            nbf: iat,
            exp: iat.saturating_add(self.ttl.as_secs()),
            tenant: self.tenant.clone(),
            job: self.job.clone(),
            node: self.node,
            serial,
            mode: self.mode,
            egress: self.egress.clone(),
            deny: self.deny.clone(),
            limits: self.limits,
        }
    }
}

/// Seconds since the Unix epoch (0 for earlier times).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The signed claims of a policy (JWT payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawClaims")]
pub struct PolicyClaims {
    /// Random policy id; the job key is derived from it.
    pub jti: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Tenant name.
    pub tenant: String,
    /// Job name.
    pub job: String,
    /// Underlay address of the job's node, if pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<IpAddr>,
    /// Increases on live update. 32 bits because the overlay option carries 32: a token whose
    /// `serial` claim is above `u32::MAX` is refused when it is read (never truncated).
    pub serial: PolicySerial,
    /// Enforce or audit; left out when `enforce`.
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// Rules in order.
    pub egress: Vec<EgressRule>,
    /// Deny rules in order; left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<DenyRule>,
    /// Limits.
    pub limits: Limits,
}

impl PolicyClaims {
    /// Checks the invariants in the module docs (rules and limits are checked by their types).
    pub fn validate(&self) -> Result<(), String> {
        check_tenant(&self.tenant).map_err(|e| format!("tenant: {e}"))?;
        check_job(&self.job).map_err(|e| format!("job: {e}"))?;
        check_jti(&self.jti).map_err(|e| format!("jti: {e}"))?;
        if self.egress.len() + self.deny.len() > MAX_RULES {
            return Err(format!(
                "egress: {} rules and {} deny rules, at most {MAX_RULES} allowed together",
                self.egress.len(),
                self.deny.len()
            ));
        }
        for (name, t) in [("iat", self.iat), ("nbf", self.nbf), ("exp", self.exp)] {
            if t > MAX_SAFE_INTEGER {
                return Err(format!(
                    "{name}: {t} is above 2^53 - 1, the largest integer every JSON reader reads exactly"
                ));
            }
        }
        if self.nbf > self.exp {
            return Err(format!("nbf {} is after exp {}", self.nbf, self.exp));
        }
        Ok(())
    }

    /// The 32-bit tenant id (overlay option).
    pub fn tenant_id(&self) -> TenantId {
        crate::identity::tenant_id(&self.tenant)
    }

    /// The 64-bit job key (overlay option), derived from `jti`.
    pub fn job_key(&self) -> JobKey {
        crate::identity::job_key(&self.jti)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaims {
    jti: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    tenant: String,
    job: String,
    #[serde(default)]
    node: Option<IpAddr>,
    /// Read wide so that a serial the overlay cannot carry is refused by name, not as a type
    /// error.
    serial: u64,
    #[serde(default)]
    mode: Mode,
    egress: Vec<EgressRule>,
    #[serde(default)]
    deny: Vec<DenyRule>,
    limits: Limits,
}

impl TryFrom<RawClaims> for PolicyClaims {
    type Error = String;
    fn try_from(r: RawClaims) -> Result<PolicyClaims, String> {
        let c = PolicyClaims {
            jti: r.jti,
            iat: r.iat,
            nbf: r.nbf,
            exp: r.exp,
            tenant: r.tenant,
            job: r.job,
            node: r.node,
            serial: PolicySerial::try_from(r.serial)
                .map_err(|e| format!("serial: {e}; the overlay option carries 32 bits"))?,
            mode: r.mode,
            egress: r.egress,
            deny: r.deny,
            limits: r.limits,
        };
        c.validate()?;
        Ok(c)
    }
}

/// Why a policy is not the next policy of a running job (its *lineage*: same `jti`, so the
/// same job key; same tenant and job; a higher serial).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineageError {
    /// Another `jti`: another job key, so another job.
    #[error("jti: `{new}` is not the running policy's `{old}` (a different job key: a new job, not an update)")]
    Jti {
        /// The running policy's `jti`.
        old: String,
        /// The new policy's `jti`.
        new: String,
    },
    /// Another tenant.
    #[error("tenant: `{new}` is not the running policy's `{old}`")]
    Tenant {
        /// The running policy's tenant.
        old: String,
        /// The new policy's tenant.
        new: String,
    },
    /// Another job name.
    #[error("job: `{new}` is not the running policy's `{old}`")]
    Job {
        /// The running policy's job.
        old: String,
        /// The new policy's job.
        new: String,
    },
    /// A serial that does not increase.
    #[error("serial: {new} is not above the running policy's {old}")]
    Serial {
        /// The running policy's serial.
        old: PolicySerial,
        /// The new policy's serial.
        new: PolicySerial,
    },
}

impl LineageError {
    /// The claim the error is about (`jti`, `tenant`, `job` or `serial`).
    pub fn field(&self) -> &'static str {
        match self {
            LineageError::Jti { .. } => "jti",
            LineageError::Tenant { .. } => "tenant",
            LineageError::Job { .. } => "job",
            LineageError::Serial { .. } => "serial",
        }
    }
}

/// Checks that `new` may replace `old` on a running job (live update or renewal): the same
/// `jti` (so the same job key), tenant and job, and a strictly higher serial. Identity is
/// checked before the serial, so a token of another job is reported as such whatever its
/// serial. Everything else (rules, limits, `exp`, `node`) may change.
pub fn check_lineage(old: &PolicyClaims, new: &PolicyClaims) -> Result<(), LineageError> {
    if old.jti != new.jti {
        return Err(LineageError::Jti {
            old: old.jti.clone(),
            new: new.jti.clone(),
        });
    }
    if old.tenant != new.tenant {
        return Err(LineageError::Tenant {
            old: old.tenant.clone(),
            new: new.tenant.clone(),
        });
    }
    if old.job != new.job {
        return Err(LineageError::Job {
            old: old.job.clone(),
            new: new.job.clone(),
        });
    }
    if new.serial <= old.serial {
        return Err(LineageError::Serial {
            old: old.serial,
            new: new.serial,
        });
    }
    Ok(())
}

/// The serial of the policy that follows `old`: `old + 1`, or `requested` when it is larger.
/// `None` when `requested` is not above `old`, or `old` is already the largest serial.
pub fn next_serial(old: PolicySerial, requested: Option<PolicySerial>) -> Option<PolicySerial> {
    match requested {
        Some(r) if r > old => Some(r),
        Some(_) => None,
        None => old.0.checked_add(1).map(PolicySerial),
    }
}

/// Checks a tenant name: `[a-z0-9-]{1,63}`.
pub fn check_tenant(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 63
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!("`{s}` must be 1-63 characters of a-z, 0-9 and '-'"));
    }
    Ok(())
}

/// Checks a job name: `[A-Za-z0-9._-]{1,128}`.
pub fn check_job(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "`{s}` must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a policy id: `[A-Za-z0-9_-]{16,128}`.
pub fn check_jti(s: &str) -> Result<(), String> {
    if s.len() < 16
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
    {
        return Err("must be 16-128 characters of A-Z, a-z, 0-9, '_' and '-'".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleFields;

    fn claims() -> PolicyClaims {
        let mut d = PolicyDraft::new("acme", "job-42");
        d.egress
            .push(EgressRule::from_fields(RuleFields::host("api.example.com")).expect("rule"));
        d.to_claims(
            "AAAAAAAAAAAAAAAAAAAAAA",
            PolicySerial(1),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
    }

    #[test]
    fn draft_to_claims_sets_validity_window_from_ttl() {
        let c = claims();
        assert_eq!(
            (c.iat, c.nbf, c.exp),
            (1_700_000_000, 1_700_000_000, 1_700_003_600)
        );
        assert_eq!(
            c.job_key(),
            crate::identity::job_key("AAAAAAAAAAAAAAAAAAAAAA")
        );
    }

    #[test]
    fn claims_json_round_trips_and_is_rechecked() {
        let c = claims();
        let j = serde_json::to_value(&c).expect("ser");
        assert!(j.get("node").is_none());
        assert_eq!(
            serde_json::from_value::<PolicyClaims>(j.clone()).expect("de"),
            c
        );
        let mut bad = j.clone();
        bad["tenant"] = "ACME".into();
        assert!(serde_json::from_value::<PolicyClaims>(bad)
            .expect_err("tenant")
            .to_string()
            .contains("tenant"));
        let mut bad = j.clone();
        bad["extra"] = 1.into();
        assert!(serde_json::from_value::<PolicyClaims>(bad).is_err());
        let mut bad = j;
        bad["nbf"] = (c.exp + 1).into();
        assert!(serde_json::from_value::<PolicyClaims>(bad).is_err());
    }

    #[test]
    fn times_beyond_what_json_readers_read_exactly_are_invalid() {
        let mut c = claims();
        c.exp = MAX_SAFE_INTEGER;
        c.nbf = MAX_SAFE_INTEGER;
        c.iat = MAX_SAFE_INTEGER;
        assert_eq!(c.validate(), Ok(()));
        c.exp += 1;
        assert!(c.validate().expect_err("exp").starts_with("exp: "));
    }

    #[test]
    fn an_update_keeps_jti_tenant_and_job_and_raises_the_serial() {
        let old = claims();
        let mut new = old.clone();
        new.serial = PolicySerial(2);
        new.exp += 7200;
        new.egress.clear();
        assert_eq!(check_lineage(&old, &new), Ok(()));
        let mut same = new.clone();
        same.serial = old.serial;
        let e = check_lineage(&old, &same).expect_err("equal serial");
        assert_eq!(e.field(), "serial");
        same.serial = PolicySerial(0);
        assert_eq!(
            check_lineage(&old, &same).expect_err("lower").field(),
            "serial"
        );
        let mut other = new.clone();
        other.jti = "BBBBBBBBBBBBBBBBBBBBBB".into();
        other.serial = PolicySerial(1);
        // Identity first: a token of another job is named as such, whatever its serial.
        assert_eq!(check_lineage(&old, &other).expect_err("jti").field(), "jti");
        let mut other = new.clone();
        other.tenant = "globex".into();
        let e = check_lineage(&old, &other).expect_err("tenant");
        assert_eq!(e.field(), "tenant");
        assert!(
            e.to_string().contains("`globex`") && e.to_string().contains("`acme`"),
            "{e}"
        );
        let mut other = new;
        other.job = "job-43".into();
        assert_eq!(check_lineage(&old, &other).expect_err("job").field(), "job");
    }

    #[test]
    fn next_serial_is_one_more_unless_a_larger_one_is_asked_for() {
        assert_eq!(next_serial(PolicySerial(3), None), Some(PolicySerial(4)));
        assert_eq!(
            next_serial(PolicySerial(3), Some(PolicySerial(10))),
            Some(PolicySerial(10))
        );
        assert_eq!(next_serial(PolicySerial(3), Some(PolicySerial(3))), None);
        assert_eq!(next_serial(PolicySerial(3), Some(PolicySerial(2))), None);
        assert_eq!(next_serial(PolicySerial(u32::MAX), None), None);
    }

    #[test]
    fn name_grammars() {
        assert!(check_tenant("acme-1").is_ok());
        assert!(check_tenant("").is_err());
        assert!(check_tenant(&"a".repeat(64)).is_err());
        assert!(check_tenant("a_b").is_err());
        assert!(check_job("Job_42.x").is_ok());
        assert!(check_job("job 42").is_err());
        assert!(check_jti("short").is_err());
    }

    #[test]
    fn mode_and_deny_are_left_out_when_default_and_read_back_when_set() {
        let c = claims();
        let j = serde_json::to_value(&c).expect("ser");
        assert!(j.get("mode").is_none() && j.get("deny").is_none(), "{j}");
        let mut audit = c.clone();
        audit.mode = Mode::Audit;
        audit.deny.push(
            DenyRule::from_fields(RuleFields::cidr("198.51.100.0/24").ports("22")).expect("deny"),
        );
        let j = serde_json::to_value(&audit).expect("ser");
        assert_eq!(j["mode"], "audit");
        assert_eq!(j["deny"][0]["cidr"], "198.51.100.0/24");
        assert_eq!(
            serde_json::from_value::<PolicyClaims>(j.clone()).expect("de"),
            audit
        );
        let mut bad = j;
        bad["mode"] = "learn".into();
        assert!(serde_json::from_value::<PolicyClaims>(bad).is_err());
    }
}
