//! Property tests of revocation parsing: a signed revocation round-trips; arbitrary payloads
//! signed by a trusted key (a buggy or hostile signer) never panic the verifier, and whatever
//! verifies is valid, strict JSON; arbitrary token text never verifies; the store answers
//! `covers` exactly as the ranges it was given.

use proptest::prelude::*;
use snas_policy::json::parse_strict;
use snas_policy::jws::sign_unvalidated_parts;
use snas_policy::revocation::{
    sign_revocation, verify_revocation, RevocationClaims, RevocationStore,
};
use snas_policy::{PolicyDraft, PolicyKey, TrustBundle};
use snas_wire::PolicySerial;
use std::time::{Duration, SystemTime};

const T0: u64 = 1_800_000_000;
const HEADER: &[u8] = br#"{"typ":"JWT","alg":"EdDSA","kid":"k1"}"#;

fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s)
}

fn keys() -> (PolicyKey, TrustBundle) {
    let k = PolicyKey::from_seed("k1", [7; 32]).expect("key");
    let b = TrustBundle::from_keys([("k1", k.public_pem().expect("pem"))]).expect("bundle");
    (k, b)
}

fn jti() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{16,40}"
}

proptest! {
    #[test]
    fn signed_revocations_round_trip(
        jti in jti(),
        lo in any::<u32>(),
        span in any::<u32>(),
        life in 0u64..=86_400,
        issued_after in 0u64..=86_400,
    ) {
        let (k, b) = keys();
        let mut p = PolicyDraft::new("acme", "job-42").to_claims(&jti, PolicySerial(1), at(T0));
        p.exp = T0 + life;
        let hi = lo.saturating_add(span);
        let now = T0 + issued_after.min(life);
        let r = RevocationClaims::for_policy(&p, PolicySerial(lo)..=PolicySerial(hi), at(now));
        let t = sign_revocation(&r, &k).expect("sign");
        let v = verify_revocation(&t, &b, at(now)).expect("verify");
        prop_assert_eq!(v.claims(), &r);
        prop_assert_eq!(v.claims().job_key(), p.job_key());
        let mut s = RevocationStore::new(4);
        s.insert(&r, now).expect("insert");
        for serial in [lo, hi, lo.saturating_sub(1), hi.saturating_add(1), lo / 2 + hi / 2] {
            prop_assert_eq!(
                s.covers(p.job_key(), PolicySerial(serial), now),
                (lo..=hi).contains(&serial)
            );
        }
    }

    #[test]
    fn arbitrary_signed_payloads_never_panic_and_what_verifies_is_valid(
        payload in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let (k, b) = keys();
        let t = sign_unvalidated_parts(HEADER, &payload, &k).expect("sign");
        if let Ok(v) = verify_revocation(&t, &b, at(T0)) {
            prop_assert!(v.claims().validate().is_ok());
            prop_assert!(parse_strict(&payload).is_ok());
        }
    }

    #[test]
    fn mutated_revocation_claims_never_panic(
        field in prop::sample::select(vec![
            "iat", "exp", "revokes", "job_key", "tenant", "job", "serial_min", "serial_max",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ],
    ) {
        let (k, b) = keys();
        let p = PolicyDraft::new("acme", "job-42")
            .to_claims("abcdefghijklmnopqrstuv", PolicySerial(1), at(T0));
        let r = RevocationClaims::for_policy(&p, PolicySerial(0)..=PolicySerial(9), at(T0));
        let mut j = serde_json::to_value(&r).expect("json");
        j[field] = value;
        let t = sign_unvalidated_parts(HEADER, &serde_json::to_vec(&j).expect("bytes"), &k)
            .expect("sign");
        if let Ok(v) = verify_revocation(&t, &b, at(T0)) {
            prop_assert!(v.claims().validate().is_ok());
        }
    }

    #[test]
    fn arbitrary_text_never_verifies(text in ".{0,300}") {
        let (_, b) = keys();
        prop_assert!(verify_revocation(&text, &b, at(T0)).is_err());
    }
}
