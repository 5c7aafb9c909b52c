//! The signed form of a policy: a compact JWS (JWT) with `alg: EdDSA` (Ed25519, RFC 8037) and
//! `kid`, and its verification against a [`TrustBundle`].
//!
//! # Verification order (every failure names its reason, see [`VerifyError`])
//! 1. size (<= 1 MiB) and shape (three base64url parts); the header is strict JSON
//!    ([`crate::json`]: no duplicate keys, integers only, ...) holding only `alg`, `kid` and
//!    `typ` (a `crit`, `b64`, `jwk` or any other parameter that changes how a token is read
//!    elsewhere is refused);
//! 2. header `alg` is `EdDSA`;
//! 3. `kid` present and in the bundle;
//! 4. signature (jsonwebtoken's Ed25519 over ring);
//! 5. claims are strict JSON ([`crate::json`]), then schema and grammar re-checked
//!    ([`PolicyClaims`] deserialisation);
//! 6. times against the caller's `now` with a [`CLOCK_SKEW`] allowance:
//!    `nbf - skew <= now < exp + skew`, `iat <= now + skew`, and `exp - iat <= 24 h + skew`.
//!
//! The clock is a parameter; jsonwebtoken's own time checks are switched off so that nothing here
//! reads the system clock.

use crate::authoring::MAX_INPUT;
use crate::bundle::TrustBundle;
use crate::claims::{unix_secs, PolicyClaims};
use crate::json::parse_strict;
use crate::keys::PolicyKey;
use crate::matcher::Matcher;
use crate::units::MAX_TTL;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Deserialize;
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
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid().to_owned());
    let header = serde_json::to_vec(&header).map_err(|e| SignError::Crypto(e.to_string()))?;
    sign_unvalidated_parts(&header, payload, key)
}

/// Signs arbitrary bytes as the JWS header and payload, **without any validation** (the header
/// may even lack `alg`). For fuzzing and tests of a hostile signer; production code uses
/// [`sign`].
#[doc(hidden)]
pub fn sign_unvalidated_parts(
    header: &[u8],
    payload: &[u8],
    key: &PolicyKey,
) -> Result<String, SignError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
            // A key id no trust bundle holds: never trusted, or removed since (rotation).
            VerifyError::UnknownKid(_) => snas_wire::Reason::KeyUntrusted,
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
    pub fn job_key(&self) -> snas_wire::JobKey {
        self.claims.job_key()
    }

    /// The 32-bit tenant id (GENEVE option).
    pub fn tenant_id(&self) -> snas_wire::TenantId {
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

/// The JOSE header SNAS accepts: the parameters [`sign`] writes and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoseHeader {
    alg: Algorithm,
    #[serde(default)]
    kid: Option<String>,
    // Read only so that it is accepted: RFC 7519 makes it advisory.
    #[serde(default, rename = "typ")]
    _typ: Option<String>,
}

/// Verifies a compact JWS against `bundle` at time `now` (see module docs for the order).
pub fn verify(
    token: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedPolicy, VerifyError> {
    let (token, kid, claims) = verify_claims(token, Some(bundle))?;
    check_times(&claims, now)?;
    Ok(VerifiedPolicy {
        claims,
        kid: kid.unwrap_or_default(),
        token: token.to_owned(),
    })
}

/// Steps 1–5 of [`verify`] without the time checks: for the signer of an update
/// (`snas policy sign --update-of`), whose previous token may have expired. Returns the claims
/// and the signing key id.
pub fn verify_ignoring_time(
    token: &str,
    bundle: &TrustBundle,
) -> Result<(PolicyClaims, String), VerifyError> {
    let (_, kid, claims) = verify_claims(token, Some(bundle))?;
    Ok((claims, kid.unwrap_or_default()))
}

/// Reads the claims of a token **without checking its signature or times**: shape, strict
/// JSON and schema only (steps 1, 2 and 5). For the signer of an update when no trust bundle
/// is given: the lineage (`jti`, tenant, job, serial) is taken from a token the signer's
/// operator vouches for. Never use it to admit traffic.
pub fn decode_unverified(token: &str) -> Result<PolicyClaims, VerifyError> {
    let (_, _, claims) = verify_claims(token, None)?;
    Ok(claims)
}

fn verify_claims<'t>(
    token: &'t str,
    bundle: Option<&TrustBundle>,
) -> Result<(&'t str, Option<String>, PolicyClaims), VerifyError> {
    let (token, kid, payload) = verify_signature(token, bundle)?;
    let claims = parse_strict(&payload).map_err(|e| VerifyError::Claims(e.to_string()))?;
    let claims: PolicyClaims =
        serde_json::from_value(claims).map_err(|e| VerifyError::Claims(e.to_string()))?;
    Ok((token, kid, claims))
}

/// Steps 1–4 shared by policies and revocations ([`crate::revocation`]): size, shape, strict
/// header, `alg`, `kid` in `bundle` and the signature (all skipped but the shape and header when
/// `bundle` is `None`). Returns the trimmed token, the key id and the decoded payload bytes.
pub(crate) fn verify_signature<'t>(
    token: &'t str,
    bundle: Option<&TrustBundle>,
) -> Result<(&'t str, Option<String>, Vec<u8>), VerifyError> {
    if token.len() > MAX_INPUT {
        return Err(VerifyError::TooLarge(token.len()));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(VerifyError::Malformed("empty token".into()));
    }
    let mut parts = token.split('.');
    let (Some(header64), Some(payload64), Some(signature64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed(
            "not a compact JWS (expected header.payload.signature)".into(),
        ));
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64
        .decode(header64)
        .map_err(|e| VerifyError::Malformed(format!("header: bad base64url: {e}")))?;
    let header =
        parse_strict(&header).map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    let header: JoseHeader = serde_json::from_value(header)
        .map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    if header.alg != Algorithm::EdDSA {
        return Err(VerifyError::Algorithm(format!("{:?}", header.alg)));
    }
    let kid = header.kid.ok_or(VerifyError::MissingKid)?;
    if let Some(bundle) = bundle {
        let raw = bundle
            .get(&kid)
            .ok_or_else(|| VerifyError::UnknownKid(kid.clone()))?;
        let x = b64.encode(raw);
        let key = DecodingKey::from_ed_components(&x)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        // The signing input is the header and payload exactly as received.
        let message = &token[..header64.len() + 1 + payload64.len()];
        match jsonwebtoken::crypto::verify(signature64, message.as_bytes(), &key, Algorithm::EdDSA)
        {
            Ok(true) => {}
            Ok(false) => return Err(VerifyError::BadSignature(kid)),
            Err(e) => {
                return Err(VerifyError::Malformed(format!(
                    "signature: {}",
                    describe(&e)
                )))
            }
        }
    }
    let payload = b64
        .decode(payload64)
        .map_err(|e| VerifyError::Malformed(format!("payload: bad base64url: {e}")))?;
    Ok((token, Some(kid), payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::PolicyDraft;
    use crate::rules::{EgressRule, RuleFields};
    use snas_wire::PolicySerial;

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
        d.egress
            .push(EgressRule::from_fields(RuleFields::host("api.example.com")).expect("rule"));
        d.to_claims(JTI, PolicySerial(3), at(T0))
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

    /// The claims as canonical JSON text, with `member` spliced in right after the opening brace
    /// of the object that `marker` (a unique `"key":` in it) belongs to.
    fn claims_text_with(member: &str, marker: &str) -> String {
        let text = serde_json::to_string(&claims()).expect("json");
        let at = text.find(marker).expect("marker");
        let open = text[..at].rfind('{').expect("object");
        format!("{}{member},{}", &text[..=open], &text[open + 1..])
    }

    #[test]
    fn signed_claims_with_a_duplicate_key_are_refused_naming_the_key() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let cases = [
            (
                r#""tenant":"evil""#,
                r#""jti":"#,
                "`tenant` in the object at $",
            ),
            (
                r#""tenant":"evil""#,
                r#""jti":"#,
                "`tenant` in the object at $",
            ),
            (
                r#""host":"evil.example.net:443""#,
                r#""host":"#,
                "`host` in the object at $.egress[0]",
            ),
            (
                r#""max_connections":1000000"#,
                r#""max_connections":"#,
                "`max_connections` in the object at $.limits",
            ),
        ];
        for (member, marker, expected) in cases {
            let text = claims_text_with(member, marker);
            // The hazard: a lenient reader takes one of the two values without a word.
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
            let t = sign_unvalidated_payload(text.as_bytes(), &k).expect("sign");
            let e = verify(&t, &b, at(T0)).expect_err(member);
            assert_eq!(e.reason(), snas_wire::Reason::PolicyInvalid);
            assert!(
                matches!(&e, VerifyError::Claims(m) if m.contains("duplicate key") && m.contains(expected)),
                "{member}: {e}"
            );
        }
    }

    #[test]
    fn headers_with_duplicate_keys_or_extra_parameters_are_refused() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let payload = serde_json::to_vec(&claims()).expect("json");
        let good = br#"{"typ":"JWT","alg":"EdDSA","kid":"k1"}"#;
        let t = sign_unvalidated_parts(good, &payload, &k).expect("sign");
        assert!(verify(&t, &b, at(T0)).is_ok());
        for (header, expected) in [
            (
                &br#"{"alg":"EdDSA","kid":"k1","kid":"k2"}"#[..],
                "duplicate key `kid`",
            ),
            (
                br#"{"alg":"HS256","kid":"k1","alg":"EdDSA"}"#,
                "duplicate key `alg`",
            ),
            (
                br#"{"alg":"EdDSA","kid":"k1","crit":["exp"],"exp":1}"#,
                "unknown field `crit`",
            ),
            (
                br#"{"alg":"EdDSA","kid":"k1","b64":false}"#,
                "unknown field `b64`",
            ),
            (
                br#"{"alg":"EdDSA","kid":"k1","jwk":{"kty":"OKP"}}"#,
                "unknown field `jwk`",
            ),
            (
                b"\xEF\xBB\xBF{\"alg\":\"EdDSA\",\"kid\":\"k1\"}",
                "byte-order mark",
            ),
            (br#"{"alg":"EdDSA","kid":"k1"} {}"#, "trailing characters"),
        ] {
            let t = sign_unvalidated_parts(header, &payload, &k).expect("sign");
            match verify(&t, &b, at(T0)) {
                Err(VerifyError::Malformed(m)) => assert!(m.contains(expected), "{m}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(header)),
            }
        }
    }

    #[test]
    fn signed_claims_that_readers_could_read_differently_are_refused() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let canonical = serde_json::to_string(&claims()).expect("json");
        let serial = "\"serial\":3";
        assert!(canonical.contains(serial));
        let mut latin1 = canonical.clone().into_bytes();
        latin1[canonical.find("job-42").expect("job") + 5] = 0xff;
        let cases: [(Vec<u8>, &str); 8] = [
            (
                canonical.replace(serial, "\"serial\":3.0").into_bytes(),
                "number 3.0 at $.serial",
            ),
            (
                canonical.replace(serial, "\"serial\":3e0").into_bytes(),
                "number 3.0 at $.serial",
            ),
            (
                canonical
                    .replace(serial, "\"serial\":9007199254740995")
                    .into_bytes(),
                "number 9007199254740995 at $.serial",
            ),
            (
                canonical
                    .replace("\"job-42\"", "\"job-42\\ufdd0\"")
                    .into_bytes(),
                "noncharacter U+FDD0 in a string at $.job",
            ),
            (
                [&b"\xEF\xBB\xBF"[..], canonical.as_bytes()].concat(),
                "byte-order mark",
            ),
            (
                format!("{canonical}{canonical}").into_bytes(),
                "trailing characters",
            ),
            (
                canonical
                    .replace("\"job-42\"", "\"job-42\\ud800\"")
                    .into_bytes(),
                "hex escape",
            ),
            (latin1, "invalid unicode code point"),
        ];
        for (payload, expected) in cases {
            let t = sign_unvalidated_payload(&payload, &k).expect("sign");
            match verify(&t, &b, at(T0)) {
                Err(VerifyError::Claims(m)) => assert!(m.contains(expected), "{expected}: {m}"),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn signer_refuses_overlong_lifetimes() {
        let mut c = claims();
        c.exp = c.iat + 86_401;
        assert_eq!(sign(&c, &key("k1", 1)), Err(SignError::TtlTooLong(86_401)));
    }

    #[test]
    fn a_token_whose_serial_the_overlay_cannot_carry_is_refused_by_name() {
        let k = key("k1", 1);
        let b = bundle(&[&k]);
        let mut c = claims();
        c.serial = PolicySerial(u32::MAX);
        let t = sign(&c, &k).expect("the largest 32-bit serial signs");
        assert_eq!(
            verify(&t, &b, at(T0)).map(|v| v.claims().serial),
            Ok(PolicySerial(u32::MAX))
        );
        let canonical = serde_json::to_string(&c).expect("json");
        for wide in [u64::from(u32::MAX) + 1, 1 << 40] {
            let payload = canonical.replace("\"serial\":4294967295", &format!("\"serial\":{wide}"));
            assert_ne!(payload, canonical);
            let t = sign_unvalidated_payload(payload.as_bytes(), &k).expect("sign");
            match verify(&t, &b, at(T0)) {
                Err(VerifyError::Claims(m)) => {
                    assert!(m.contains("serial") && m.contains("4294967295"), "{m}")
                }
                other => panic!("{wide}: expected a serial error, got {other:?}"),
            }
        }
    }
}
