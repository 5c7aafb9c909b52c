//! Fuzz the TOML authoring parser. Any panic is a bug. An accepted policy must sign, verify back
//! to the same claims (claims JSON round trip and re-validation), and compile; every host rule's
//! canonical form must re-parse to itself (`[[deny]]` rules too); `mode` and `[[deny]]` survive
//! the round trip; name verdicts of DNS never bind a port a deny rule takes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_policy::{EgressRule, HostPort, PolicyKey, Transport, TrustBundle};
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
    let Ok(draft) = snas_policy::parse_policy_bytes(data) else {
        return;
    };
    for rule in draft.egress.iter().chain(draft.deny.iter().map(|d| d.rule())) {
        if let EgressRule::Host { host, .. } = rule {
            assert_eq!(HostPort::parse(&host.to_string()).as_ref(), Ok(host));
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let claims = draft.to_claims("fuzzfuzzfuzzfuzz", snas_wire::PolicySerial(1), now);
    let (key, bundle) = keys();
    if let Ok(token) = snas_policy::sign(&claims, key) {
        let v = snas_policy::verify(&token, bundle, now).expect("own token verifies");
        assert_eq!(v.claims(), &claims);
    }
    let m = snas_policy::compile(&claims);
    let _ = m.check_host("api.example.com", 443, Transport::Tcp);
    for name in ["api.example.com", "a.tracker.example.com", "www.example.org"] {
        if let snas_policy::NameVerdict::Allow { ports, .. } = m.name_verdict(name) {
            for (proto, range) in ports {
                for port in [range.lo(), range.hi()] {
                    for t in [Transport::Tcp, Transport::Udp] {
                        if proto.allows(t.into()) {
                            assert!(
                                !matches!(
                                    m.check_host(name, port, t),
                                    snas_policy::Decision::Deny(snas_policy::DenyReason::DenyRule(_))
                                ),
                                "{name}:{port}/{t} bound but denied"
                            );
                        }
                    }
                }
            }
        }
    }
});
