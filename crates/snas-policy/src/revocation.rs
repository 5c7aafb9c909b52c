//! Signed revocations: the control plane's way to cut a job off without trusting its node.
//!
//! A revocation is a compact JWS signed like a policy (EdDSA, `kid` in the trust bundle) whose
//! claims name the policy lineage it revokes (`revokes` = the policy's `jti`, so its job key),
//! the range of serials it covers, and `exp` = the revoked token's `exp`: after that the token
//! is refused anyway, so verifiers forget the revocation ([`RevocationStore::sweep`]).
//!
//! ```json
//! {"iat": 1795454000, "exp": 1795457534, "revokes": "a36ac3f88d8427e536ff52903e36bf61",
//!  "job_key": "9f86d081884c7d65", "tenant": "acme", "job": "job-42",
//!  "serial_min": 0, "serial_max": 4294967295}
//! ```
//!
//! # Invariants
//! - Claims are strict JSON ([`crate::json`]) with exactly the fields above (unknown fields
//!   refused), so a policy token is never read as a revocation nor a revocation as a policy
//!   (each lacks the other's required claims).
//! - `job_key` is `identity::job_key(revokes)`; `serial_min <= serial_max <= u32::MAX`;
//!   `iat <= exp`; `exp - iat <= 24 h` (a policy lives at most 24 h, so no revocation has to be
//!   kept longer); times at most 2^53 − 1.
//! - Verification: signature steps as [`crate::jws::verify`], then `iat <= now + skew` and
//!   `now < exp + skew` (an expired revocation has nothing left to revoke).
//! - [`RevocationStore`] is bounded ([`MAX_REVOCATIONS`]): when full, a new revocation is
//!   refused (the caller reports it) rather than silently forgetting an older one, which would
//!   re-admit a revoked job.
//!
//! # Scope
//! A revocation covering a job's running serial cuts the job off: verifiers refuse every
//! policy of the lineage whose serial is in the range, so an update with a serial inside the
//! range does not bring the job back. The default range (`snas policy revoke`) is every serial,
//! 0..=2^32 − 1: the job stays cut off until the revocation expires with the token. A narrower
//! range (`--serial-only`) revokes one update and lets a later serial replace it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use snas_wire::{JobKey, PolicySerial};

use crate::bundle::TrustBundle;
use crate::claims::{check_job, check_jti, check_tenant, unix_secs, PolicyClaims};
use crate::json::{parse_strict, MAX_SAFE_INTEGER};
use crate::jws::{SignError, VerifyError, CLOCK_SKEW};
use crate::keys::PolicyKey;
use crate::units::MAX_TTL;

/// Most revocations a [`RevocationStore`] holds.
pub const MAX_REVOCATIONS: usize = 65_536;

/// Largest revocation token read (a revocation is a few hundred bytes).
pub const MAX_REVOCATION_TOKEN: usize = 8 * 1024;

/// The claims of a revocation (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRevocation")]
pub struct RevocationClaims {
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Kept until (Unix seconds): the revoked token's `exp`.
    pub exp: u64,
    /// The revoked policy's `jti`.
    pub revokes: String,
    /// `identity::job_key(revokes)`, as 16 lower-case hex digits.
    pub job_key: String,
    /// Tenant of the revoked policy (audit).
    pub tenant: String,
    /// Job of the revoked policy (audit).
    pub job: String,
    /// Lowest serial revoked.
    pub serial_min: u32,
    /// Highest serial revoked.
    pub serial_max: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    iat: u64,
    exp: u64,
    revokes: String,
    job_key: String,
    tenant: String,
    job: String,
    serial_min: u64,
    serial_max: u64,
}

impl TryFrom<RawRevocation> for RevocationClaims {
    type Error = String;
    fn try_from(r: RawRevocation) -> Result<RevocationClaims, String> {
        let serial = |name: &str, v: u64| {
            u32::try_from(v).map_err(|_| format!("{name}: {v} is above 4294967295 (32 bits)"))
        };
        let c = RevocationClaims {
            iat: r.iat,
            exp: r.exp,
            revokes: r.revokes,
            job_key: r.job_key,
            tenant: r.tenant,
            job: r.job,
            serial_min: serial("serial_min", r.serial_min)?,
            serial_max: serial("serial_max", r.serial_max)?,
        };
        c.validate()?;
        Ok(c)
    }
}

impl RevocationClaims {
    /// The revocation of `policy`'s lineage for serials `serials`, issued at `now`, kept until
    /// the policy's `exp`.
    pub fn for_policy(
        policy: &PolicyClaims,
        serials: std::ops::RangeInclusive<PolicySerial>,
        now: SystemTime,
    ) -> RevocationClaims {
        RevocationClaims {
            iat: unix_secs(now),
            exp: policy.exp,
            revokes: policy.jti.clone(),
            job_key: crate::identity::job_key(&policy.jti).to_string(),
            tenant: policy.tenant.clone(),
            job: policy.job.clone(),
            serial_min: serials.start().0,
            serial_max: serials.end().0,
        }
    }

    /// Checks the invariants of the module docs.
    pub fn validate(&self) -> Result<(), String> {
        check_jti(&self.revokes).map_err(|e| format!("revokes: {e}"))?;
        check_tenant(&self.tenant).map_err(|e| format!("tenant: {e}"))?;
        check_job(&self.job).map_err(|e| format!("job: {e}"))?;
        let derived = crate::identity::job_key(&self.revokes).to_string();
        if self.job_key != derived {
            return Err(format!(
                "job_key: `{}` is not the job key of `revokes` ({derived})",
                self.job_key
            ));
        }
        if self.serial_min > self.serial_max {
            return Err(format!(
                "serial_min {} is above serial_max {}",
                self.serial_min, self.serial_max
            ));
        }
        for (name, t) in [("iat", self.iat), ("exp", self.exp)] {
            if t > MAX_SAFE_INTEGER {
                return Err(format!(
                    "{name}: {t} is above 2^53 - 1, the largest integer every JSON reader reads exactly"
                ));
            }
        }
        if self.iat > self.exp {
            return Err(format!(
                "iat {} is after exp {}: the revoked token has expired, there is nothing to revoke",
                self.iat, self.exp
            ));
        }
        if self.exp - self.iat > MAX_TTL.as_secs() {
            return Err(format!(
                "exp - iat = {}s is above 24h (no policy lives longer)",
                self.exp - self.iat
            ));
        }
        Ok(())
    }

    /// The revoked job key.
    pub fn job_key(&self) -> JobKey {
        crate::identity::job_key(&self.revokes)
    }

    /// Whether `serial` is in the revoked range.
    pub fn covers(&self, serial: PolicySerial) -> bool {
        (self.serial_min..=self.serial_max).contains(&serial.0)
    }
}

/// Signs a revocation with `key`.
pub fn sign_revocation(claims: &RevocationClaims, key: &PolicyKey) -> Result<String, SignError> {
    claims.validate().map_err(SignError::Claims)?;
    let payload = serde_json::to_vec(claims).map_err(|e| SignError::Crypto(e.to_string()))?;
    let header = format!(r#"{{"typ":"JWT","alg":"EdDSA","kid":"{}"}}"#, key.kid());
    crate::jws::sign_unvalidated_parts(header.as_bytes(), &payload, key)
}

/// A revocation whose signature, key and claims were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRevocation {
    claims: RevocationClaims,
    kid: String,
}

impl VerifiedRevocation {
    /// The claims.
    pub fn claims(&self) -> &RevocationClaims {
        &self.claims
    }

    /// The signing key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// Verifies a revocation token against `bundle` at `now` (module docs).
pub fn verify_revocation(
    token: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedRevocation, VerifyError> {
    if token.len() > MAX_REVOCATION_TOKEN {
        return Err(VerifyError::TooLarge(token.len()));
    }
    let (_, kid, payload) = crate::jws::verify_signature(token, Some(bundle))?;
    let v = parse_strict(&payload).map_err(|e| VerifyError::Claims(e.to_string()))?;
    let claims: RevocationClaims =
        serde_json::from_value(v).map_err(|e| VerifyError::Claims(e.to_string()))?;
    let now = unix_secs(now);
    let skew = CLOCK_SKEW.as_secs();
    if now.saturating_add(skew) < claims.iat {
        return Err(VerifyError::IssuedInFuture {
            iat: claims.iat,
            now,
        });
    }
    if now >= claims.exp.saturating_add(skew) {
        return Err(VerifyError::Expired {
            exp: claims.exp,
            now,
        });
    }
    Ok(VerifiedRevocation {
        claims,
        kid: kid.unwrap_or_default(),
    })
}

/// What [`RevocationStore::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new revocation.
    New,
    /// The same revocation was held already.
    Known,
}

/// Why [`RevocationStore::insert`] refused a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store holds [`MAX_REVOCATIONS`] unexpired revocations.
    #[error("revocation store full ({0} unexpired revocations); the revocation was not recorded")]
    Full(usize),
}

/// One held revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    serial_min: u32,
    serial_max: u32,
    exp: u64,
}

/// Verified revocations by job key, kept until their `exp` (+ [`CLOCK_SKEW`]). Pure: callers pass
/// the time in.
#[derive(Debug, Clone)]
pub struct RevocationStore {
    by_job: BTreeMap<JobKey, Vec<Held>>,
    len: usize,
    max: usize,
}

impl Default for RevocationStore {
    fn default() -> Self {
        RevocationStore::new(MAX_REVOCATIONS)
    }
}

impl RevocationStore {
    /// An empty store holding at most `max` revocations.
    pub fn new(max: usize) -> RevocationStore {
        RevocationStore {
            by_job: BTreeMap::new(),
            len: 0,
            max,
        }
    }

    /// Records a verified revocation. Expired ones are swept first when the store is full.
    pub fn insert(&mut self, r: &RevocationClaims, now_unix: u64) -> Result<Inserted, StoreError> {
        let held = Held {
            serial_min: r.serial_min,
            serial_max: r.serial_max,
            exp: r.exp,
        };
        let key = r.job_key();
        if self.by_job.get(&key).is_some_and(|v| v.contains(&held)) {
            return Ok(Inserted::Known);
        }
        if self.len >= self.max {
            self.sweep(now_unix);
            if self.len >= self.max {
                return Err(StoreError::Full(self.len));
            }
        }
        self.by_job.entry(key).or_default().push(held);
        self.len += 1;
        Ok(Inserted::New)
    }

    /// Whether a held, unexpired revocation covers `serial` of `job`.
    pub fn covers(&self, job: JobKey, serial: PolicySerial, now_unix: u64) -> bool {
        self.by_job.get(&job).is_some_and(|v| {
            v.iter().any(|h| {
                (h.serial_min..=h.serial_max).contains(&serial.0) && !expired(h.exp, now_unix)
            })
        })
    }

    /// Whether any unexpired revocation names `job`.
    pub fn names(&self, job: JobKey, now_unix: u64) -> bool {
        self.by_job
            .get(&job)
            .is_some_and(|v| v.iter().any(|h| !expired(h.exp, now_unix)))
    }

    /// Forgets revocations whose `exp` (+ skew) has passed. Returns how many.
    pub fn sweep(&mut self, now_unix: u64) -> usize {
        let before = self.len;
        self.by_job.retain(|_, v| {
            v.retain(|h| !expired(h.exp, now_unix));
            !v.is_empty()
        });
        self.len = self.by_job.values().map(Vec::len).sum();
        before - self.len
    }

    /// Revocations held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The job keys with a held revocation.
    pub fn jobs(&self) -> impl Iterator<Item = JobKey> + '_ {
        self.by_job.keys().copied()
    }
}

/// A revocation is kept while its token could still verify somewhere (`exp` + skew).
fn expired(exp: u64, now_unix: u64) -> bool {
    now_unix >= exp.saturating_add(CLOCK_SKEW.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::PolicyDraft;
    use std::time::Duration;

    const T0: u64 = 1_800_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn key(kid: &str, seed: u8) -> PolicyKey {
        PolicyKey::from_seed(kid, [seed; 32]).expect("key")
    }

    fn bundle(k: &PolicyKey) -> TrustBundle {
        TrustBundle::from_keys([(k.kid().to_owned(), k.public_pem().expect("pem"))])
            .expect("bundle")
    }

    fn policy(jti: &str) -> PolicyClaims {
        PolicyDraft::new("acme", "job-42").to_claims(jti, PolicySerial(3), at(T0))
    }

    fn all() -> std::ops::RangeInclusive<PolicySerial> {
        PolicySerial(0)..=PolicySerial(u32::MAX)
    }

    #[test]
    fn a_signed_revocation_verifies_and_names_the_job_key() {
        let k = key("k1", 1);
        let p = policy("abcdefghijklmnopqrstuv");
        let r = RevocationClaims::for_policy(&p, all(), at(T0 + 10));
        let t = sign_revocation(&r, &k).expect("sign");
        let v = verify_revocation(&t, &bundle(&k), at(T0 + 20)).expect("verify");
        assert_eq!(v.claims(), &r);
        assert_eq!(v.kid(), "k1");
        assert_eq!(v.claims().job_key(), p.job_key());
        assert_eq!(v.claims().exp, p.exp);
        assert!(v.claims().covers(PolicySerial(3)) && v.claims().covers(PolicySerial(u32::MAX)));
    }

    #[test]
    fn revocations_signed_by_unknown_keys_or_expired_are_refused() {
        let k = key("k1", 1);
        let r = RevocationClaims::for_policy(&policy("abcdefghijklmnopqrstuv"), all(), at(T0));
        let t = sign_revocation(&r, &k).expect("sign");
        let e = verify_revocation(&t, &bundle(&key("k2", 2)), at(T0)).expect_err("kid");
        assert_eq!(e, VerifyError::UnknownKid("k1".into()));
        let e = verify_revocation(&t, &bundle(&k), at(r.exp + 60)).expect_err("expired");
        assert!(matches!(e, VerifyError::Expired { .. }), "{e}");
        let e = verify_revocation(&t, &bundle(&k), at(T0 - 61)).expect_err("future");
        assert!(matches!(e, VerifyError::IssuedInFuture { .. }), "{e}");
    }

    #[test]
    fn a_policy_token_is_not_a_revocation_and_a_revocation_is_not_a_policy() {
        let k = key("k1", 1);
        let b = bundle(&k);
        let p = policy("abcdefghijklmnopqrstuv");
        let pt = crate::jws::sign(&p, &k).expect("sign");
        assert!(matches!(
            verify_revocation(&pt, &b, at(T0)),
            Err(VerifyError::Claims(_))
        ));
        let rt =
            sign_revocation(&RevocationClaims::for_policy(&p, all(), at(T0)), &k).expect("sign");
        assert!(matches!(
            crate::jws::verify(&rt, &b, at(T0)),
            Err(VerifyError::Claims(_))
        ));
    }

    #[test]
    fn claims_that_contradict_themselves_are_refused() {
        let p = policy("abcdefghijklmnopqrstuv");
        let mut r = RevocationClaims::for_policy(&p, all(), at(T0));
        r.job_key = "0000000000000000".into();
        assert!(r.validate().expect_err("key").starts_with("job_key"));
        let mut r = RevocationClaims::for_policy(&p, PolicySerial(5)..=PolicySerial(4), at(T0));
        assert!(r.validate().expect_err("range").starts_with("serial_min"));
        r.serial_min = 4;
        r.iat = r.exp + 1;
        assert!(r
            .validate()
            .expect_err("late")
            .contains("nothing to revoke"));
        let k = key("k1", 1);
        assert!(matches!(sign_revocation(&r, &k), Err(SignError::Claims(_))));
    }

    #[test]
    fn the_store_keeps_revocations_until_exp_and_then_forgets_them() {
        let mut s = RevocationStore::new(8);
        let p = policy("abcdefghijklmnopqrstuv");
        let r = RevocationClaims::for_policy(&p, PolicySerial(2)..=PolicySerial(3), at(T0));
        assert_eq!(s.insert(&r, T0), Ok(Inserted::New));
        assert_eq!(s.insert(&r, T0), Ok(Inserted::Known));
        assert_eq!(s.len(), 1);
        let job = p.job_key();
        assert!(s.covers(job, PolicySerial(3), T0));
        assert!(s.covers(job, PolicySerial(2), T0));
        // A later update outside the range is not revoked.
        assert!(!s.covers(job, PolicySerial(4), T0));
        assert!(!s.covers(job, PolicySerial(1), T0));
        assert!(!s.covers(
            policy("zyxwvutsrqponmlkjihgfe").job_key(),
            PolicySerial(3),
            T0
        ));
        // Kept through the skew allowance after exp, gone after.
        let last = r.exp + CLOCK_SKEW.as_secs() - 1;
        assert!(s.covers(job, PolicySerial(3), last));
        assert_eq!(s.sweep(last), 0);
        assert!(!s.covers(job, PolicySerial(3), last + 1));
        assert_eq!(s.sweep(last + 1), 1);
        assert!(s.is_empty() && s.jobs().next().is_none());
    }

    #[test]
    fn a_full_store_refuses_new_revocations_rather_than_forget_live_ones() {
        let mut s = RevocationStore::new(3);
        let mut jtis = (0..4).map(|i| format!("job-lineage-{i:010}"));
        let mut rev = |exp_offset: u64| {
            let mut p = policy(&jtis.next().expect("jti"));
            p.exp = T0 + exp_offset;
            RevocationClaims::for_policy(&p, all(), at(T0))
        };
        let (a, b, c, d) = (rev(100), rev(3600), rev(3600), rev(3600));
        for r in [&a, &b, &c] {
            assert_eq!(s.insert(r, T0), Ok(Inserted::New));
        }
        assert_eq!(s.insert(&d, T0 + 10), Err(StoreError::Full(3)));
        assert!(s.covers(a.job_key(), PolicySerial(0), T0 + 10));
        // Once one has expired there is room again.
        assert_eq!(s.insert(&d, T0 + 100 + 60), Ok(Inserted::New));
        assert!(!s.names(a.job_key(), T0 + 160));
        assert!(s.names(d.job_key(), T0 + 160));
        assert_eq!(s.len(), 3);
    }
}
