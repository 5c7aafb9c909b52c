//! Fuzz JWS verification with a fixed trust bundle. The input is used four ways:
//! 1. as token text (must never verify: the fuzzer cannot forge Ed25519);
//! 2. as the payload of a token signed by the trusted key (a buggy or hostile signer: the strict
//!    JSON profile and the schema must hold; whatever verifies is valid, strict JSON);
//! 3. as the JWS header of such a token (same, for the header);
//! 4. straight into the strict JSON parser, checked against serde_json: what the strict parser
//!    accepts, serde_json reads as the same value; what it calls a syntax error, serde_json
//!    refuses too (the strict profile only ever narrows serde_json).
//!
//! Any panic is a bug. Seeds with duplicate keys at every depth are in `fuzz/seeds/policy_jws`
//! (checked by `crates/snas-policy/tests/strict_json.rs`), and a dictionary of claim names,
//! duplicate members and ambiguous JSON in `fuzz/dict/policy_jws.dict`:
//! `cargo fuzz run policy_jws fuzz/corpus/policy_jws fuzz/seeds/policy_jws -- -dict=fuzz/dict/policy_jws.dict`
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_policy::json::{parse_strict, StrictJsonError};
use snas_policy::jws::sign_unvalidated_parts;
use snas_policy::{PolicyKey, TrustBundle};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

const HEADER: &[u8] = br#"{"typ":"JWT","alg":"EdDSA","kid":"fuzz"}"#;
const CLAIMS: &[u8] = br#"{"jti":"0123456789abcdef0123","iat":1800000000,"nbf":1800000000,"exp":1800003600,"tenant":"acme","job":"job-42","serial":1,"egress":[{"host":"api.example.com:443","protocol":"tcp"}],"limits":{"egress_bps":100000000,"ingress_bps":100000000,"max_connections":256,"new_connections_per_sec":50,"new_connections_burst":100,"max_ports_per_destination":1024}}"#;

fn keys() -> &'static (PolicyKey, TrustBundle) {
    static K: OnceLock<(PolicyKey, TrustBundle)> = OnceLock::new();
    K.get_or_init(|| {
        let key = PolicyKey::from_seed("fuzz", [42; 32]).expect("key");
        let bundle =
            TrustBundle::from_keys([("fuzz", key.public_pem().expect("pem"))]).expect("bundle");
        (key, bundle)
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, bundle) = keys();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(snas_policy::verify(text, bundle, now).is_err());
    }
    if let Ok(token) = sign_unvalidated_parts(HEADER, data, key) {
        if let Ok(v) = snas_policy::verify(&token, bundle, now) {
            v.claims().validate().expect("verified claims are valid");
            parse_strict(data).expect("verified claims are strict JSON");
            let _ = v.compile();
        }
    }
    if let Ok(token) = sign_unvalidated_parts(data, CLAIMS, key) {
        if snas_policy::verify(&token, bundle, now).is_ok() {
            parse_strict(data).expect("a verified header is strict JSON");
        }
    }
    let lenient = serde_json::from_slice::<serde_json::Value>(data);
    match parse_strict(data) {
        Ok(v) => assert_eq!(
            lenient.ok(),
            Some(v),
            "strict and serde_json read different values"
        ),
        Err(StrictJsonError::Syntax(_) | StrictJsonError::ByteOrderMark) => {
            assert!(
                lenient.is_err(),
                "strict syntax error that serde_json accepts"
            )
        }
        Err(_) => {}
    }
});
