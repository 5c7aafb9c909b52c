//! The JSON Schema (draft 2020-12) of the TOML authoring format, for editors: taplo / Even
//! Better TOML validate and complete a policy that starts with
//! `#:schema ./policy.schema.json` (or the path `snas policy schema > …` wrote).
//!
//! Written by hand (`schema/policy.schema.json`), because the authoring types are validated
//! from strings by the grammar ([`crate::hostport`], [`crate::rules`]) rather than derived. The
//! schema checks shape, names and the grammars' syntax; `snas policy check` stays the
//! authority for what a pattern cannot say (a private cidr rule without `allow_private`, a
//! TLD-level wildcard, limits beyond their ranges). Tests keep the two in step: every key the
//! parser accepts is in the schema and nothing else, every example validates, and the
//! deliberately invalid example does not.

/// The schema text.
pub const POLICY_SCHEMA: &str = include_str!("../schema/policy.schema.json");

#[cfg(test)]
mod tests {
    use super::POLICY_SCHEMA;
    use serde_json::Value;

    fn schema() -> Value {
        serde_json::from_str(POLICY_SCHEMA).expect("the schema is JSON")
    }

    /// A validator for the subset of draft 2020-12 the schema uses (type, enum, pattern,
    /// min/max, maxItems, maxLength, properties, additionalProperties = false, required, items,
    /// `$ref` into `$defs`, oneOf, anyOf, not). Unknown keywords are annotations.
    fn valid(root: &Value, s: &Value, v: &Value) -> bool {
        let Some(obj) = s.as_object() else {
            return true;
        };
        for (k, kw) in obj {
            let ok = match k.as_str() {
                "$ref" => {
                    let path = kw.as_str().expect("ref").trim_start_matches("#/");
                    let target = path.split('/').fold(root, |node, part| &node[part]);
                    assert!(!target.is_null(), "dangling $ref {path}");
                    valid(root, target, v)
                }
                "type" => match kw.as_str().expect("type") {
                    "string" => v.is_string(),
                    "integer" => v.is_i64() || v.is_u64(),
                    "boolean" => v.is_boolean(),
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    t => panic!("type {t}"),
                },
                "enum" => kw.as_array().expect("enum").contains(v),
                "pattern" => v.as_str().is_none_or(|x| {
                    regex::Regex::new(kw.as_str().expect("pattern"))
                        .expect("pattern compiles")
                        .is_match(x)
                }),
                "maxLength" => v
                    .as_str()
                    .is_none_or(|x| x.chars().count() as u64 <= kw.as_u64().expect("n")),
                "minimum" => v.as_i64().is_none_or(|x| x >= kw.as_i64().expect("n")),
                "maximum" => v.as_i64().is_none_or(|x| x <= kw.as_i64().expect("n")),
                "maxItems" => v
                    .as_array()
                    .is_none_or(|a| a.len() as u64 <= kw.as_u64().expect("n")),
                "items" => v
                    .as_array()
                    .is_none_or(|a| a.iter().all(|x| valid(root, kw, x))),
                "required" => v.as_object().is_none_or(|o| {
                    kw.as_array()
                        .expect("required")
                        .iter()
                        .all(|r| o.contains_key(r.as_str().expect("name")))
                }),
                "properties" => v.as_object().is_none_or(|o| {
                    o.iter().all(|(name, x)| match kw.get(name) {
                        Some(sub) => valid(root, sub, x),
                        None => true,
                    })
                }),
                "additionalProperties" => {
                    assert_eq!(kw, &Value::Bool(false), "only false is used");
                    let props = obj["properties"].as_object().expect("properties");
                    v.as_object()
                        .is_none_or(|o| o.keys().all(|name| props.contains_key(name)))
                }
                "oneOf" => {
                    kw.as_array()
                        .expect("oneOf")
                        .iter()
                        .filter(|sub| valid(root, sub, v))
                        .count()
                        == 1
                }
                "anyOf" => kw
                    .as_array()
                    .expect("anyOf")
                    .iter()
                    .any(|sub| valid(root, sub, v)),
                "not" => !valid(root, kw, v),
                _ => true,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn toml_json(src: &str) -> Value {
        let t: toml::Value = toml::from_str(src).expect("toml");
        serde_json::to_value(t).expect("json")
    }

    fn validates(src: &str) -> bool {
        let s = schema();
        valid(&s, &s, &toml_json(src))
    }

    #[test]
    fn the_schema_is_draft_2020_12() {
        assert_eq!(
            schema()["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
    }

    #[test]
    fn every_example_validates_and_the_invalid_one_does_not() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).expect("examples") {
            let p = e.expect("entry").path();
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            let src = std::fs::read_to_string(&p).expect("read");
            let invalid = p.file_name().and_then(|n| n.to_str()) == Some("policy-invalid.toml");
            assert_eq!(validates(&src), !invalid, "{}", p.display());
            assert_eq!(
                crate::parse_policy(&src).is_ok(),
                !invalid,
                "{}",
                p.display()
            );
            seen += 1;
        }
        assert!(seen >= 5, "examples found: {seen}");
    }

    /// A policy that uses every key the authoring format has.
    const EVERY_KEY: &str = r#"
tenant = "acme"
job = "job-42"
node = "2001:db8::7"
ttl = "1h 30m"
mode = "audit"
[[egress]]
host = "*.s3.example.com:8000-8100"
protocol = "any"
[[egress]]
cidr = "10.1.0.0/16"
ports = 5432
allow_private = true
[[deny]]
host = "tracker.example.com:0"
[[deny]]
cidr = "198.51.100.0/24"
ports = "22"
protocol = "udp"
[limits]
egress_bps = "100Mbit"
ingress_bps = "1 gbps"
max_connections = 256
new_connections_per_sec = 50
new_connections_burst = 100
max_ports_per_destination = 1024
"#;

    #[test]
    fn the_schema_knows_every_key_the_parser_accepts_and_no_other() {
        assert!(crate::parse_policy(EVERY_KEY).is_ok());
        assert!(validates(EVERY_KEY));
        // An unknown key anywhere is refused by both.
        for (needle, with) in [
            ("ttl = ", "color = \"red\"\nttl = "),
            ("protocol = \"any\"", "protocol = \"any\"\nport = 1"),
            (
                "protocol = \"udp\"",
                "protocol = \"udp\"\nallow_private = false",
            ),
            (
                "max_connections = 256",
                "max_connections = 256\nmax_flows = 1",
            ),
        ] {
            let src = EVERY_KEY.replacen(needle, with, 1);
            assert!(crate::parse_policy(&src).is_err(), "parser took {with}");
            assert!(!validates(&src), "schema took {with}");
        }
    }

    #[test]
    fn the_schema_refuses_what_the_grammar_refuses_by_shape() {
        for (needle, with) in [
            ("*.s3.example.com:8000-8100", "api.example.*"),
            ("*.s3.example.com:8000-8100", "192.0.2.1"),
            ("\"audit\"", "\"learn\""),
            ("\"acme\"", "\"ACME\""),
            ("\"100Mbit\"", "\"100MB\""),
            ("max_connections = 256", "max_connections = 0"),
            ("ports = 5432", "ports = \"5432/tcp\""),
            ("ports = 5432\n", ""),
        ] {
            let src = EVERY_KEY.replacen(needle, with, 1);
            assert!(crate::parse_policy(&src).is_err(), "parser took {with}");
            assert!(!validates(&src), "schema took `{with}`");
        }
    }
}
