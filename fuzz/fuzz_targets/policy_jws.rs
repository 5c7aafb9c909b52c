//! Fuzz JWS verification with a fixed trust bundle: the input as token text (must never verify:
//! the fuzzer cannot forge Ed25519), and the input as the payload of a token signed by the trusted
//! key (a buggy or hostile signer: verification must re-check the schema). Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_policy::{PolicyKey, TrustBundle};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

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
    if let Ok(token) = snas_policy::jws::sign_unvalidated_payload(data, key) {
        if let Ok(v) = snas_policy::verify(&token, bundle, now) {
            v.claims().validate().expect("verified claims are valid");
            let _ = v.compile();
        }
    }
});
