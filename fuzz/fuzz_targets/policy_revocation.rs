//! Fuzz revocation verification with a fixed trust bundle. The input is used two ways:
//! 1. as token text (must never verify: the fuzzer cannot forge Ed25519);
//! 2. as the payload of a revocation signed by the trusted key (a buggy or hostile signer):
//!    whatever verifies is valid and strict JSON, and a store accepts it and answers for it.
//!
//! Any panic is a bug. `cargo fuzz run policy_revocation`
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_policy::json::parse_strict;
use snas_policy::jws::sign_unvalidated_parts;
use snas_policy::revocation::{verify_revocation, RevocationStore};
use snas_policy::{PolicyKey, TrustBundle};
use snas_wire::PolicySerial;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

const HEADER: &[u8] = br#"{"typ":"JWT","alg":"EdDSA","kid":"fuzz"}"#;

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
    let now_unix = 1_800_000_000;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_unix);
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(verify_revocation(text, bundle, now).is_err());
    }
    if let Ok(token) = sign_unvalidated_parts(HEADER, data, key) {
        if let Ok(v) = verify_revocation(&token, bundle, now) {
            let c = v.claims();
            c.validate().expect("verified claims are valid");
            parse_strict(data).expect("verified claims are strict JSON");
            let mut store = RevocationStore::new(4);
            store.insert(c, now_unix).expect("room");
            assert!(store.covers(c.job_key(), PolicySerial(c.serial_min), now_unix));
            assert!(store.covers(c.job_key(), PolicySerial(c.serial_max), now_unix));
        }
    }
});
