//! Property tests of the strict JSON profile (`snas_policy::json`) and of its use by `verify`:
//! canonical JSON round-trips; a member name duplicated anywhere — in any object of any JSON
//! value, in any object of any signed claims, in the JWS header — is refused, naming the key;
//! and the duplicate-key seeds of the `policy_jws` fuzz target are refused as they say.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value};
use snas_policy::json::{parse_strict, StrictJsonError, MAX_SAFE_INTEGER};
use snas_policy::jws::{sign_unvalidated_parts, sign_unvalidated_payload};
use snas_policy::{EgressRule, PolicyDraft, PolicyKey, RuleFields, TrustBundle, VerifyError};
use std::path::Path;
use std::time::{Duration, SystemTime};

const T0: u64 = 1_800_000_000;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
}

fn key_and_bundle() -> (PolicyKey, TrustBundle) {
    let key = PolicyKey::from_seed("prop", [7; 32]).expect("key");
    let bundle = TrustBundle::from_keys([("prop", key.public_pem().expect("pem"))]).expect("b");
    (key, bundle)
}

/// Any JSON value the profile accepts: safe integers, strings with escapes and non-ASCII text,
/// nested arrays and objects (short names, so that objects are varied but still small).
fn json_value() -> impl Strategy<Value = Value> {
    let int = -(MAX_SAFE_INTEGER as i64)..=(MAX_SAFE_INTEGER as i64);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        int.prop_map(Value::from),
        "[a-z\"\\\\/\u{1}\u{7f}\u{e9}\u{2028}\u{1F600} ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z.\"]{0,3}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// How a duplicate is spliced in: which object (pre-order), which of its keys, where in the
/// object, and with which value.
#[derive(Debug, Clone)]
struct Dup {
    object: Index,
    key: Index,
    position: Index,
    value: Value,
}

/// Path syntax of `snas_policy::json` errors: `.name` for plain names, `["…"]` otherwise.
fn push_key(path: &str, k: &str) -> String {
    let plain = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        format!("{path}.{k}")
    } else {
        format!("{path}[{}]", serde_json::to_string(k).expect("key"))
    }
}

fn count_objects(v: &Value) -> usize {
    match v {
        Value::Object(m) => {
            usize::from(!m.is_empty()) + m.values().map(count_objects).sum::<usize>()
        }
        Value::Array(a) => a.iter().map(count_objects).sum(),
        _ => 0,
    }
}

/// Writes `v` as JSON text with one member duplicated as `dup` says; returns the duplicated key
/// and the path of its object. Only non-empty objects count.
struct DupWriter<'a> {
    dup: &'a Dup,
    target: usize,
    seen: usize,
    out: String,
    hit: Option<(String, String)>,
}

impl DupWriter<'_> {
    fn write(&mut self, v: &Value, path: &str) {
        match v {
            Value::Object(m) => {
                let mine = !m.is_empty() && {
                    self.seen += 1;
                    self.seen - 1 == self.target
                };
                let keys: Vec<&String> = m.keys().collect();
                let (dup_key, at) = if mine {
                    let k = keys[self.dup.key.index(keys.len())].clone();
                    self.hit = Some((k.clone(), path.to_owned()));
                    (Some(k), self.dup.position.index(keys.len() + 1))
                } else {
                    (None, usize::MAX)
                };
                self.out.push('{');
                let mut first = true;
                let dup = self.dup;
                for i in 0..=keys.len() {
                    if i == at {
                        if let Some(k) = &dup_key {
                            self.member(&mut first, k, &dup.value, path);
                        }
                    }
                    if let Some(k) = keys.get(i) {
                        self.member(&mut first, k, &m[k.as_str()], path);
                    }
                }
                self.out.push('}');
            }
            Value::Array(a) => {
                self.out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.write(x, &format!("{path}[{i}]"));
                }
                self.out.push(']');
            }
            other => self
                .out
                .push_str(&serde_json::to_string(other).expect("scalar")),
        }
    }

    fn member(&mut self, first: &mut bool, k: &str, v: &Value, path: &str) {
        if !*first {
            self.out.push(',');
        }
        *first = false;
        self.out.push_str(&serde_json::to_string(k).expect("key"));
        self.out.push(':');
        self.write(v, &push_key(path, k));
    }
}

/// `v` as text with a duplicate member; `None` if `v` has no non-empty object.
fn with_duplicate(v: &Value, dup: &Dup) -> Option<(String, String, String)> {
    let n = count_objects(v);
    if n == 0 {
        return None;
    }
    let mut w = DupWriter {
        dup,
        target: dup.object.index(n),
        seen: 0,
        out: String::new(),
        hit: None,
    };
    w.write(v, "$");
    let (key, path) = w.hit?;
    Some((w.out, key, path))
}

fn dup() -> impl Strategy<Value = Dup> {
    (any::<Index>(), any::<Index>(), any::<Index>(), json_value()).prop_map(
        |(object, key, position, value)| Dup {
            object,
            key,
            position,
            value,
        },
    )
}

/// `RuleFields`: host, cidr, ports, protocol, allow_private.
type RuleSpec = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<bool>,
);

/// Valid claims of varied shape: 0..12 rules of every kind, random names and limits.
fn claims_value() -> impl Strategy<Value = Value> {
    let specs: [RuleSpec; 6] = [
        (Some("api.example.com"), None, None, None, None),
        (Some("*.example.org:0"), None, None, Some("any"), None),
        (Some("0.0.0.0"), None, None, None, None),
        (None, Some("203.0.113.0/24"), Some("5432"), None, None),
        (None, Some("2001:db8::/32"), Some("0"), Some("udp"), None),
        (None, Some("10.1.0.0/16"), Some("443"), None, Some(true)),
    ];
    (
        "[a-z0-9-]{1,12}",
        "[A-Za-z0-9._-]{1,20}",
        prop::collection::vec(0..specs.len(), 0..12),
        1u32..=100_000,
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(move |(tenant, job, rules, conns, node, serial)| {
            let mut d = PolicyDraft::new(&tenant, &job);
            d.egress = rules
                .iter()
                .map(|&i| {
                    let (h, c, p, proto, private) = specs[i];
                    EgressRule::from_fields(RuleFields {
                        host: h,
                        cidr: c,
                        ports: p,
                        protocol: proto,
                        allow_private: private,
                        ..RuleFields::default()
                    })
                    .expect("rule")
                })
                .collect();
            d.limits.max_connections = conns;
            if node {
                d.node = Some("192.0.2.7".parse().expect("ip"));
            }
            let claims = d.to_claims(
                "0123456789abcdef0123",
                snas_wire::PolicySerial(serial),
                now(),
            );
            serde_json::to_value(claims).expect("json")
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn canonical_json_round_trips_through_the_strict_parser(v in json_value()) {
        for text in [serde_json::to_string(&v), serde_json::to_string_pretty(&v)] {
            let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(parse_strict(text.as_bytes()), Ok(v.clone()), "{}", text);
        }
    }

    #[test]
    fn a_key_duplicated_in_any_object_at_any_depth_is_refused(v in json_value(), d in dup()) {
        let Some((text, key, path)) = with_duplicate(&v, &d) else {
            // No object to put a duplicate in: the text is canonical and must be accepted.
            prop_assert_eq!(parse_strict(serde_json::to_string(&v).unwrap_or_default().as_bytes()), Ok(v));
            return Ok(());
        };
        // A lenient parser takes it silently; the strict one names the key and its object.
        prop_assert!(serde_json::from_str::<Value>(&text).is_ok(), "{}", text);
        prop_assert_eq!(
            parse_strict(text.as_bytes()),
            Err(StrictJsonError::DuplicateKey { key, path }),
            "{}", text
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn signed_claims_round_trip_and_any_duplicated_key_is_refused(c in claims_value(), d in dup()) {
        let (key, bundle) = key_and_bundle();
        let canonical = serde_json::to_vec(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let t = sign_unvalidated_payload(&canonical, &key).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let v = snas_policy::verify(&t, &bundle, now()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(serde_json::to_value(v.claims()).map_err(|e| TestCaseError::fail(e.to_string()))?, c.clone());

        let (text, dup_key, path) = with_duplicate(&c, &d)
            .ok_or_else(|| TestCaseError::fail("claims always hold objects"))?;
        let t = sign_unvalidated_payload(text.as_bytes(), &key).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected = format!("duplicate key `{dup_key}` in the object at {path}");
        match snas_policy::verify(&t, &bundle, now()) {
            Err(e @ VerifyError::Claims(_)) => {
                prop_assert!(e.to_string().contains(&expected), "{} / {}", e, text);
                prop_assert_eq!(e.reason(), snas_wire::Reason::PolicyInvalid);
            }
            other => prop_assert!(false, "{:?} for {}", other, text),
        }
    }

    #[test]
    fn any_duplicated_header_parameter_is_refused(d in dup()) {
        let (key, bundle) = key_and_bundle();
        let header = serde_json::json!({"typ": "JWT", "alg": "EdDSA", "kid": "prop"});
        let (text, dup_key, _) = with_duplicate(&header, &d)
            .ok_or_else(|| TestCaseError::fail("header is an object"))?;
        let claims = br#"{"hello":1}"#;
        let t = sign_unvalidated_parts(text.as_bytes(), claims, &key).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match snas_policy::verify(&t, &bundle, now()) {
            Err(VerifyError::Malformed(m)) => {
                prop_assert!(m.contains(&format!("duplicate key `{dup_key}`")), "{} / {}", m, text);
            }
            other => prop_assert!(false, "{:?} for {}", other, text),
        }
    }
}

/// The seeds the fuzz target starts from (`fuzz/seeds/policy_jws/`) are the payload of a token
/// signed by the trusted key: `dup-*` must be refused for a duplicate key, `valid-*` accepted.
#[test]
fn fuzz_seeds_are_refused_or_accepted_as_their_names_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/policy_jws");
    let (key, bundle) = key_and_bundle();
    let mut seen = (0, 0);
    for entry in std::fs::read_dir(&dir).expect("seed dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let payload = std::fs::read(&path).expect("seed");
        let t = sign_unvalidated_payload(&payload, &key).expect("sign");
        let got = snas_policy::verify(&t, &bundle, now());
        if name.starts_with("dup-") {
            seen.0 += 1;
            assert!(
                matches!(&got, Err(VerifyError::Claims(m)) if m.contains("duplicate key")),
                "{name}: {got:?}"
            );
        } else if name.starts_with("valid-") {
            seen.1 += 1;
            assert!(got.is_ok(), "{name}: {got:?}");
        }
    }
    assert!(seen.0 >= 5 && seen.1 >= 1, "seeds found: {seen:?}");
}
