//! The signed form of a policy: a compact JWS (JWT) with `alg: EdDSA` (Ed25519, RFC 8037) and
//! `kid`, and its verification against a [`TrustBundle`].
//!
//! # Verification order (every failure names its reason, see [`VerifyError`])
//! 1. size (<= 1 MiB) and shape;
//! 2. header `alg` is `EdDSA`;
//! 3. `kid` present and in the bundle;
//! 4. signature (jsonwebtoken + ring);
//! 5. claims schema and grammar re-checked ([`PolicyClaims`] deserialisation);
//! 6. times against the caller's `now` with a [`CLOCK_SKEW`] allowance:
//!    `nbf - skew <= now < exp + skew`, `iat <= now + skew`, and `exp - iat <= 24 h + skew`.
//!
//! The clock is a parameter; jsonwebtoken's own time checks are switched off so that nothing here
//! reads the system clock.

use crate::authoring::MAX_INPUT;
use crate::bundle::TrustBundle;
use crate::claims::{unix_secs, PolicyClaims};
use crate::keys::PolicyKey;
use crate::matcher::Matcher;
use crate::units::MAX_TTL;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// Clock-skew allowance for `nbf`, `exp` and `iat`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The claims break an invariant (checked before signing so bad tokens are never produced).
    #[error("invalid claims: {0}")]
    Claims(String),
    /// Longer than 24 h.
    #[error("lifetime exp - iat = {0}s is above the maximum of 24h")]
    TtlTooLong(u64),
    /// Key encoding or signing failed.
    #[error("signing failed: {0}")]
    Crypto(String),
    /// The token would exceed 1 MiB.
    #[error("signed token is {0} bytes, above the 1 MiB limit")]
    TooLarge(usize),
}

/// Signs claims with `key`; returns the compact JWS.
pub fn sign(claims: &PolicyClaims, key: &PolicyKey) -> Result<String, SignError> {
    claims.validate().map_err(SignError::Claims)?;
    let life = claims.exp.saturating_sub(claims.iat);
    if life > MAX_TTL.as_secs() {
        return Err(SignError::TtlTooLong(life));
    }
    let der = key
        .pkcs8_der()
        .map_err(|e| SignError::Crypto(e.to_string()))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid().to_owned());
    let token = jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&der))
        .map_err(|e| SignError::Crypto(e.to_string()))?;
    if token.len() > MAX_INPUT {
        return Err(SignError::TooLarge(token.len()));
    }
    Ok(token)
}

/// Signs arbitrary bytes as the JWS payload with a proper `EdDSA` + `kid` header, **without any
/// validation**. For fuzzing and tests that play a buggy or hostile signer holding a trusted key;
/// production code uses [`sign`].
#[doc(hidden)]
pub fn sign_unvalidated_payload(payload: &[u8], key: &PolicyKey) -> Result<String, SignError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid().to_owned());
    let header = serde_json::to_vec(&header).map_err(|e| SignError::Crypto(e.to_string()))?;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let der = key
        .pkcs8_der()
        .map_err(|e| SignError::Crypto(e.to_string()))?;
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_ed_der(&der),
        Algorithm::EdDSA,
    )
    .map_err(|e| SignError::Crypto(e.to_string()))?;
    Ok(format!("{message}.{sig}"))
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Above 1 MiB.
    #[error("token is {0} bytes, above the 1 MiB limit")]
    TooLarge(usize),
    /// Not a compact JWS with a JSON header.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Header `alg` other than EdDSA.
    #[error("algorithm {0} not accepted (only EdDSA)")]
    Algorithm(String),
    /// No `kid` in the header.
    #[error("token header has no kid")]
    MissingKid,
    /// `kid` not in the trust bundle.
    #[error("unknown key id `{0}` (not in the trust bundle)")]
    UnknownKid(String),
    /// Signature does not verify.
    #[error("bad signature (key `{0}`)")]
    BadSignature(String),
    /// Claims fail the schema or grammar.
    #[error("invalid claims: {0}")]
    Claims(String),
    /// `now` before `nbf - skew`.
    #[error("policy not valid yet (nbf {nbf}, now {now})")]
    NotYetValid {
        /// Not-before, Unix seconds.
        nbf: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// `iat` after `now + skew`.
    #[error("policy issued in the future (iat {iat}, now {now})")]
    IssuedInFuture {
        /// Issued-at, Unix seconds.
        iat: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// `now` at or after `exp + skew`.
    #[error("policy expired (exp {exp}, now {now})")]
    Expired {
        /// Expiry, Unix seconds.
        exp: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// `exp - iat` above 24 h + skew.
    #[error("policy lifetime {0}s is above the maximum of 24h")]
    TtlTooLong(u64),
}

impl VerifyError {
    /// The drop reason to count when traffic is refused because of this error.
    pub fn reason(&self) -> snas_wire::Reason {
        match self {
            VerifyError::Expired { .. } | VerifyError::NotYetValid { .. } => {
                snas_wire::Reason::PolicyExpired
            }
            _ => snas_wire::Reason::PolicyInvalid,
        }
    }
}

/// A policy whose signature, key, schema and validity window were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPolicy {
    claims: PolicyClaims,
    kid: String,
    token: String,
}

impl VerifiedPolicy {
    /// The claims.
    pub fn claims(&self) -> &PolicyClaims {
        &self.claims
    }

    /// The id of the key that signed it.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The token as received (trimmed), for the agent to serve to proxies.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The 64-bit job key (GENEVE option), derived from `jti`.
    pub fn job_key(&self) -> u64 {
        self.claims.job_key()
    }

    /// The 32-bit tenant id (GENEVE option).
    pub fn tenant_id(&self) -> u32 {
        self.claims.tenant_id()
    }

    /// Expiry as a time.
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.claims.exp)
    }

    /// Re-checks only the validity window at `now` (for caches holding verified policies).
    pub fn check_time(&self, now: SystemTime) -> Result<(), VerifyError> {
        check_times(&self.claims, now)
    }

    /// Whether traffic for this job may come from underlay address `node` (true when the policy
    /// pins no node). A mismatch is drop reason `node_mismatch`.
    pub fn node_matches(&self, node: std::net::IpAddr) -> bool {
        self.claims.node.is_none_or(|n| n == node)
    }

    /// Compiles the rules into a matcher.
    pub fn compile(&self) -> Matcher {
        crate::matcher::compile(&self.claims)
    }

    /// Gives up the claims.
    pub fn into_claims(self) -> PolicyClaims {
        self.claims
    }
}

/// A readable message for jsonwebtoken's terse error kinds.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidToken => "not a compact JWS (expected header.payload.signature)".to_owned(),
        K::Base64(err) => format!("bad base64url: {err}"),
        K::Json(err) => format!("not JSON: {err}"),
        K::Utf8(err) => format!("not UTF-8: {err}"),
        _ => e.to_string(),
    }
}

/// The time checks of [`verify`] (step 6) on already-verified claims.
fn check_times(claims: &PolicyClaims, now: SystemTime) -> Result<(), VerifyError> {
    let now = unix_secs(now);
    let skew = CLOCK_SKEW.as_secs();
    if now.saturating_add(skew) < claims.nbf {
        return Err(VerifyError::NotYetValid {
            nbf: claims.nbf,
            now,
        });
    }
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
    let life = claims.exp.saturating_sub(claims.iat);
    if life > MAX_TTL.as_secs() + skew {
        return Err(VerifyError::TtlTooLong(life));
    }
    Ok(())
}

/// Verifies a compact JWS against `bundle` at time `now` (see module docs for the order).
pub fn verify(
    token: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedPolicy, VerifyError> {
    if token.len() > MAX_INPUT {
        return Err(VerifyError::TooLarge(token.len()));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(VerifyError::Malformed("empty token".into()));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| VerifyError::Malformed(describe(&e)))?;
    if header.alg != Algorithm::EdDSA {
        return Err(VerifyError::Algorithm(format!("{:?}", header.alg)));
    }
    let kid = header.kid.ok_or(VerifyError::MissingKid)?;
    let raw = bundle
        .get(&kid)
        .ok_or_else(|| VerifyError::UnknownKid(kid.clone()))?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let key =
        DecodingKey::from_ed_components(&x).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    let data =
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                VerifyError::BadSignature(kid.clone())
            }
            _ => VerifyError::Malformed(describe(&e)),
        })?;
    let claims: PolicyClaims =
        serde_json::from_value(data.claims).map_err(|e| VerifyError::Claims(e.to_string()))?;
    check_times(&claims, now)?;
    Ok(VerifiedPolicy {
        claims,
        kid,
        token: token.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::PolicyDraft;
    use crate::rules::EgressRule;

    const T0: u64 = 1_800_000_000;
    const JTI: &str = "abcdefghijklmnopqrstuv";

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn key(kid: &str, seed: u8) -> PolicyKey {
        PolicyKey::from_seed(kid, [seed; 32]).expect("key")
    }

    fn bundle(keys: &[&PolicyKey]) -> TrustBundle {
        TrustBundle::from_keys(
            keys.iter()
                .map(|k| (k.kid().to_owned(), k.public_pem().expect("pem"))),
        )
        .expect("bundle")
    }

    fn claims() -> PolicyClaims {
        let mut d = PolicyDraft::new("acme", "job-42");
        d.egress.push(
            EgressRule::from_parts(Some("api.example.com"), None, None, None, None).expect("rule"),
        );
        d.to_claims(JTI, 3, at(T0))
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(v).expect("json"))
    }

    #[test]
    fn sign_then_verify_gives_back_the_claims_and_job_key() {
        let k = key("k1", 1);
        let token = sign(&claims(), &k).expect("sign");
        let v = verify(&format!("  {token}\n"), &bundle(&[&k]), at(T0 + 10)).expect("verify");
        assert_eq!(v.claims(), &claims());
        assert_eq!(v.kid(), "k1");
        assert_eq!(v.token(), token);
        assert_eq!(v.job_key(), crate::identity::job_key(JTI));
    }

    #[test]
    fn rotation_accepts_any_key_in_the_bundle() {
        let (old, new) = (key("old", 1), key("new", 2));
        let b = bundle(&[&old, &new]);
        for k in [&old, &new] {
            assert!(verify(&sign(&claims(), k).expect("sign"), &b, at(T0)).is_ok());
        }
        let retired = bundle(&[&new]);
        assert_eq!(
            verify(&sign(&claims(), &old).expect("sign"), &retired, at(T0)),
            Err(VerifyError::UnknownKid("old".into()))
        );
    }

    #[test]
    fn validity_window_has_a_sixty_second_skew_allowance() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let t = sign(&claims(), &k).expect("sign");
        assert!(verify(&t, &b, at(T0 - 60)).is_ok());
        assert!(matches!(
            verify(&t, &b, at(T0 - 61)),
            Err(VerifyError::NotYetValid { .. })
        ));
        assert!(verify(&t, &b, at(T0 + 3600 + 59)).is_ok());
        let e = verify(&t, &b, at(T0 + 3600 + 60)).expect_err("expired");
        assert!(matches!(e, VerifyError::Expired { .. }));
        assert_eq!(e.reason(), snas_wire::Reason::PolicyExpired);
    }

    #[test]
    fn cached_policy_can_be_rechecked_and_pins_its_node() {
        let k = key("k1", 1);
        let mut c = claims();
        c.node = Some("192.0.2.7".parse().expect("ip"));
        let v = verify(&sign(&c, &k).expect("sign"), &bundle(&[&k]), at(T0)).expect("verify");
        assert!(v.check_time(at(T0 + 100)).is_ok());
        assert!(matches!(
            v.check_time(at(T0 + 7200)),
            Err(VerifyError::Expired { .. })
        ));
        assert!(v.node_matches("192.0.2.7".parse().expect("ip")));
        assert!(!v.node_matches("192.0.2.8".parse().expect("ip")));
    }

    #[test]
    fn signature_by_another_key_with_same_kid_fails() {
        let t = sign(&claims(), &key("k1", 1)).expect("sign");
        let e = verify(&t, &bundle(&[&key("k1", 2)]), at(T0)).expect_err("bad sig");
        assert_eq!(e, VerifyError::BadSignature("k1".into()));
        assert_eq!(e.reason(), snas_wire::Reason::PolicyInvalid);
    }

    #[test]
    fn tampered_payload_fails_signature() {
        let k = key("k1", 1);
        let t = sign(&claims(), &k).expect("sign");
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = serde_json::to_value(claims()).expect("json");
        c["egress"][0]["host"] = "evil.example.net:443".into();
        let forged = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
        assert_eq!(
            verify(&forged, &bundle(&[&k]), at(T0)),
            Err(VerifyError::BadSignature("k1".into()))
        );
    }

    #[test]
    fn non_eddsa_and_kidless_headers_are_rejected() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let t = sign(&claims(), &k).expect("sign");
        let rest = t.split_once('.').map(|(_, r)| r).expect("dot");
        let hs = b64(&serde_json::json!({"alg": "HS256", "kid": "k1", "typ": "JWT"}));
        assert!(matches!(
            verify(&format!("{hs}.{rest}"), &b, at(T0)),
            Err(VerifyError::Algorithm(_))
        ));
        let none = b64(&serde_json::json!({"alg": "none", "typ": "JWT"}));
        assert!(matches!(
            verify(&format!("{none}.{rest}"), &b, at(T0)),
            Err(VerifyError::Malformed(_))
        ));
        let nokid = b64(&serde_json::json!({"alg": "EdDSA", "typ": "JWT"}));
        assert_eq!(
            verify(&format!("{nokid}.{rest}"), &b, at(T0)),
            Err(VerifyError::MissingKid)
        );
        assert!(matches!(
            verify("not a token", &b, at(T0)),
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            verify("", &b, at(T0)),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn signed_but_invalid_claims_are_rejected_by_schema() {
        // Sign raw JSON directly to simulate a buggy or malicious signer holding a trusted key.
        let k = key("k1", 1);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let der = k.pkcs8_der().expect("der");
        let mut c = serde_json::to_value(claims()).expect("json");
        c["egress"][0]["host"] = "*.com".into();
        let t = jsonwebtoken::encode(&header, &c, &EncodingKey::from_ed_der(&der)).expect("encode");
        let e = verify(&t, &bundle(&[&k]), at(T0)).expect_err("schema");
        assert!(
            matches!(e, VerifyError::Claims(ref m) if m.contains("wildcard")),
            "{e}"
        );
        c = serde_json::to_value(claims()).expect("json");
        c["exp"] = (T0 + 2 * 86_400).into();
        let t = jsonwebtoken::encode(&header, &c, &EncodingKey::from_ed_der(&der)).expect("encode");
        assert_eq!(
            verify(&t, &bundle(&[&k]), at(T0)),
            Err(VerifyError::TtlTooLong(2 * 86_400))
        );
    }

    #[test]
    fn unvalidated_payloads_are_signed_but_rejected_by_verify() {
        let k = key("k1", 1);
        let t = sign_unvalidated_payload(b"{\"hello\":1}", &k).expect("sign");
        assert!(matches!(
            verify(&t, &bundle(&[&k]), at(T0)),
            Err(VerifyError::Claims(_))
        ));
        let t = sign_unvalidated_payload(&serde_json::to_vec(&claims()).expect("json"), &k)
            .expect("sign");
        assert_eq!(
            verify(&t, &bundle(&[&k]), at(T0)).map(VerifiedPolicy::into_claims),
            Ok(claims())
        );
    }

    #[test]
    fn signer_refuses_overlong_lifetimes() {
        let mut c = claims();
        c.exp = c.iat + 86_401;
        assert_eq!(sign(&c, &key("k1", 1)), Err(SignError::TtlTooLong(86_401)));
    }

    #[test]
    fn serials_beyond_the_overlay_option_are_refused() {
        let mut c = claims();
        c.serial = u64::from(u32::MAX);
        assert!(sign(&c, &key("k1", 1)).is_ok());
        c.serial += 1;
        match sign(&c, &key("k1", 1)) {
            Err(SignError::Claims(m)) => assert!(m.contains("serial"), "{m}"),
            other => panic!("expected a serial error, got {other:?}"),
        }
    }
}
