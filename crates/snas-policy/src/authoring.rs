//! The TOML authoring format: text in, [`PolicyDraft`] or errors with line numbers out.
//!
//! # Invariants
//! - Inputs above [`MAX_INPUT`] bytes, non-UTF-8 input, TOML syntax errors, wrong types and unknown
//!   keys are rejected; nothing here panics on any input (fuzzed by `fuzz/policy_toml`).
//! - Every error carries a 1-based line and a field path such as `egress[1].host` (rules are
//!   numbered from 0, the same numbers the matcher reports) so the CLI can print
//!   `file:line: field: reason`. All semantic errors are reported, not just the first.
//!
//! See `docs/policy.md` for the format.

use crate::claims::{check_job, check_tenant, Mode, PolicyDraft, MAX_RULES};
use crate::limits::{check_count, Limits, MAX_COUNT, MAX_PORTS_PER_DESTINATION};
use crate::rules::{DenyRule, EgressRule, RuleError, RuleFields};
use crate::units::{parse_ttl, Bps, DEFAULT_TTL};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use toml::Spanned;

/// Largest accepted policy file or token: 1 MiB.
pub const MAX_INPUT: usize = 1 << 20;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    /// 1-based line.
    pub line: usize,
    /// Field path, e.g. `egress[1].host`, `limits.egress_bps`, `tenant` (`toml` for syntax).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.line, self.field, self.reason)
    }
}

/// All problems found in a policy file (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CheckErrors(pub Vec<CheckError>);

impl fmt::Display for CheckErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn one(line: usize, field: &str, reason: impl Into<String>) -> CheckErrors {
    CheckErrors(vec![CheckError {
        line,
        field: field.to_owned(),
        reason: reason.into(),
    }])
}

/// Parses a policy file from raw bytes (size and UTF-8 checked here).
pub fn parse_policy_bytes(src: &[u8]) -> Result<PolicyDraft, CheckErrors> {
    if src.len() > MAX_INPUT {
        return Err(one(
            1,
            "file",
            format!("{} bytes is larger than the 1 MiB limit", src.len()),
        ));
    }
    match std::str::from_utf8(src) {
        Ok(s) => parse_policy(s),
        Err(e) => {
            let line = line_of(
                &String::from_utf8_lossy(&src[..e.valid_up_to()]),
                e.valid_up_to(),
            );
            Err(one(line, "file", "not valid UTF-8"))
        }
    }
}

/// Parses a policy file.
pub fn parse_policy(src: &str) -> Result<PolicyDraft, CheckErrors> {
    if src.len() > MAX_INPUT {
        return Err(one(
            1,
            "file",
            format!("{} bytes is larger than the 1 MiB limit", src.len()),
        ));
    }
    let raw: RawPolicy = toml::from_str(src).map_err(|e| toml_error(src, &e))?;
    let mut errs = Vec::new();
    let mut push = |span: Range<usize>, field: String, reason: String| {
        errs.push(CheckError {
            line: line_of(src, span.start),
            field,
            reason,
        });
    };

    if let Err(e) = check_tenant(raw.tenant.get_ref()) {
        push(raw.tenant.span(), "tenant".into(), e);
    }
    if let Err(e) = check_job(raw.job.get_ref()) {
        push(raw.job.span(), "job".into(), e);
    }
    let node = match &raw.node {
        None => None,
        Some(n) => match n.get_ref().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                push(
                    n.span(),
                    "node".into(),
                    format!("`{}` is not an IP address", n.get_ref()),
                );
                None
            }
        },
    };
    let ttl = match &raw.ttl {
        None => DEFAULT_TTL,
        Some(t) => parse_ttl(t.get_ref()).unwrap_or_else(|e| {
            push(t.span(), "ttl".into(), e.to_string());
            DEFAULT_TTL
        }),
    };
    let mode = match &raw.mode {
        None => Mode::Enforce,
        Some(m) => Mode::parse(m.get_ref()).unwrap_or_else(|| {
            push(
                m.span(),
                "mode".into(),
                format!("unknown mode `{}` (expected enforce or audit)", m.get_ref()),
            );
            Mode::Enforce
        }),
    };
    if raw.egress.len() + raw.deny.len() > MAX_RULES {
        push(
            0..0,
            "egress".into(),
            format!(
                "{} rules and {} deny rules, at most {MAX_RULES} allowed together",
                raw.egress.len(),
                raw.deny.len()
            ),
        );
    }
    let egress = rule_list(&raw.egress, "egress", EgressRule::from_fields, &mut push);
    let deny = rule_list(&raw.deny, "deny", DenyRule::from_fields, &mut push);
    let mut limits = Limits::default();
    if let Some(l) = &raw.limits {
        let mut bps = |v: &Option<Spanned<String>>, name: &str, out: &mut Bps| {
            if let Some(v) = v {
                match Bps::parse(v.get_ref()) {
                    Ok(b) => *out = b,
                    Err(e) => push(v.span(), format!("limits.{name}"), e.to_string()),
                }
            }
        };
        bps(&l.egress_bps, "egress_bps", &mut limits.egress_bps);
        bps(&l.ingress_bps, "ingress_bps", &mut limits.ingress_bps);
        let counts = [
            (
                &l.max_connections,
                "max_connections",
                MAX_COUNT,
                &mut limits.max_connections,
            ),
            (
                &l.new_connections_per_sec,
                "new_connections_per_sec",
                MAX_COUNT,
                &mut limits.new_connections_per_sec,
            ),
            (
                &l.new_connections_burst,
                "new_connections_burst",
                MAX_COUNT,
                &mut limits.new_connections_burst,
            ),
            (
                &l.max_ports_per_destination,
                "max_ports_per_destination",
                MAX_PORTS_PER_DESTINATION,
                &mut limits.max_ports_per_destination,
            ),
        ];
        for (v, name, max, out) in counts {
            if let Some(v) = v {
                match check_count(*v.get_ref(), max) {
                    Ok(n) => *out = n,
                    Err(e) => push(v.span(), format!("limits.{name}"), e.to_string()),
                }
            }
        }
    }
    if !errs.is_empty() {
        return Err(CheckErrors(errs));
    }
    Ok(PolicyDraft {
        tenant: raw.tenant.into_inner(),
        job: raw.job.into_inner(),
        node,
        ttl,
        mode,
        egress,
        deny,
        limits,
    })
}

type ParseRule<T> = fn(RuleFields<'_>) -> Result<T, RuleError>;

/// Validates `[[egress]]` or `[[deny]]` tables (`list` names the array in error fields).
fn rule_list<T>(
    raw: &[Spanned<RawEgress>],
    list: &str,
    parse: ParseRule<T>,
    push: &mut impl FnMut(Range<usize>, String, String),
) -> Vec<T> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let table = r.span();
        let r = r.get_ref();
        let res = parse(RuleFields {
            host: r.host.as_ref().map(|s| s.get_ref().as_str()),
            cidr: r.cidr.as_ref().map(|s| s.get_ref().as_str()),
            ports: r.ports.as_ref().map(|s| s.get_ref().0.as_str()),
            protocol: r.protocol.as_ref().map(|s| s.get_ref().as_str()),
            allow_private: r.allow_private.as_ref().map(|s| *s.get_ref()),
            names: r.names.as_ref().map(|s| s.get_ref().as_str()),
            require_name: r.require_name.as_ref().map(|s| *s.get_ref()),
        });
        match res {
            Ok(rule) => out.push(rule),
            Err(e) => {
                let span = match e.field() {
                    "host" => r.host.as_ref().map(Spanned::span),
                    "cidr" => r.cidr.as_ref().map(Spanned::span),
                    "ports" => r.ports.as_ref().map(Spanned::span),
                    "protocol" => r.protocol.as_ref().map(Spanned::span),
                    "allow_private" => r.allow_private.as_ref().map(Spanned::span),
                    "names" => r.names.as_ref().map(Spanned::span),
                    "require_name" => r.require_name.as_ref().map(Spanned::span),
                    _ => None,
                }
                .unwrap_or_else(|| table.clone());
                let field = if e.field().is_empty() {
                    format!("{list}[{i}]")
                } else {
                    format!("{list}[{i}].{}", e.field())
                };
                push(span, field, e.to_string());
            }
        }
    }
    out
}

/// 1-based line of byte `offset` in `src`.
fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn toml_error(src: &str, e: &toml::de::Error) -> CheckErrors {
    let msg = e.message().trim().to_owned();
    let offset = e.span().map(|s| s.start).unwrap_or(0);
    let line = line_of(src, offset);
    let field = missing_field(&msg)
        .or_else(|| locate_field(src, offset))
        .unwrap_or_else(|| "toml".to_owned());
    one(line, &field, msg)
}

fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Best-effort field path of the key at `offset`: tracks `[table]`/`[[array]]` headers before it
/// and takes the key of the line it is on.
fn locate_field(src: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut pos = 0usize;
    for line in src.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = arrays
                .entry(name.clone())
                .and_modify(|n| *n += 1)
                .or_insert(0);
            table = format!("{name}[{n}]");
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_owned();
        }
        if offset < pos || pos == src.len() {
            if offset < start {
                return None;
            }
            let key = t
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_owned());
            return match (key, table.is_empty()) {
                (Some(k), true) if !k.is_empty() => Some(k),
                (Some(k), false) if !k.is_empty() => Some(format!("{table}.{k}")),
                (_, false) => Some(table),
                _ => None,
            };
        }
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    tenant: Spanned<String>,
    job: Spanned<String>,
    #[serde(default)]
    node: Option<Spanned<String>>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    egress: Vec<Spanned<RawEgress>>,
    #[serde(default)]
    deny: Vec<Spanned<RawEgress>>,
    #[serde(default)]
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    host: Option<Spanned<String>>,
    #[serde(default)]
    cidr: Option<Spanned<String>>,
    #[serde(default)]
    ports: Option<Spanned<PortsValue>>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    allow_private: Option<Spanned<bool>>,
    #[serde(default)]
    names: Option<Spanned<String>>,
    #[serde(default)]
    require_name: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    egress_bps: Option<Spanned<String>>,
    #[serde(default)]
    ingress_bps: Option<Spanned<String>>,
    #[serde(default)]
    max_connections: Option<Spanned<i64>>,
    #[serde(default)]
    new_connections_per_sec: Option<Spanned<i64>>,
    #[serde(default)]
    new_connections_burst: Option<Spanned<i64>>,
    #[serde(default)]
    max_ports_per_destination: Option<Spanned<i64>>,
}

/// `ports` as written: a string (`"5432"`, `"1000-2000"`) or, for convenience, an integer.
struct PortsValue(String);

impl<'de> Deserialize<'de> for PortsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortsValue, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortsValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port string (\"N\", \"lo-hi\", \"0\") or an integer port")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortsValue, E> {
                Ok(PortsValue(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortsValue, E> {
                Ok(PortsValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortsValue, E> {
                Ok(PortsValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
tenant = "acme"
job = "job-42"
node = "192.0.2.7"
ttl = "2h"

[[egress]]
host = "api.example.com"

[[egress]]
host = "*.s3.amazonaws.com:443"
protocol = "tcp"

[[egress]]
cidr = "203.0.113.0/24"
ports = "5432"
allow_private = false

[limits]
egress_bps = "10Mbit"
max_connections = 64
"#;

    fn errors(src: &str) -> Vec<CheckError> {
        match parse_policy(src) {
            Ok(d) => panic!("accepted: {d:?}"),
            Err(CheckErrors(v)) => v,
        }
    }

    #[test]
    fn the_documented_example_parses_with_defaults_filled() {
        let d = parse_policy(GOOD).expect("valid");
        assert_eq!(d.tenant, "acme");
        assert_eq!(d.node, Some("192.0.2.7".parse().expect("ip")));
        assert_eq!(d.ttl.as_secs(), 7200);
        assert_eq!(d.egress.len(), 3);
        assert_eq!(d.limits.egress_bps, Bps::mbit(10).unwrap());
        assert_eq!(d.limits.ingress_bps, Limits::default().ingress_bps);
        assert_eq!(d.limits.max_connections, 64);
        assert_eq!(d.limits.new_connections_burst, 100);
    }

    #[test]
    fn grammar_error_names_line_and_field() {
        let src = GOOD.replace("*.s3.amazonaws.com:443", "api.example.*");
        let e = errors(&src);
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "11: egress[1].host: wildcard not allowed in the last label"
        );
    }

    #[test]
    fn all_semantic_errors_are_reported() {
        let src = GOOD
            .replace("\"acme\"", "\"ACME\"")
            .replace("\"10Mbit\"", "\"10MB\"")
            .replace("\"5432\"", "\"99999\"");
        let fields: Vec<_> = errors(&src)
            .into_iter()
            .map(|e| (e.line, e.field))
            .collect();
        assert_eq!(
            fields,
            vec![
                (2, "tenant".to_owned()),
                (16, "egress[2].ports".to_owned()),
                (20, "limits.egress_bps".to_owned())
            ]
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_located() {
        let e = errors(&GOOD.replace("protocol = \"tcp\"", "protocl = \"tcp\""));
        assert_eq!((e[0].line, e[0].field.as_str()), (12, "egress[1].protocl"));
        assert!(e[0].reason.contains("unknown field"), "{}", e[0].reason);
        let e = errors(&GOOD.replace("max_connections = 64", "max_connections = \"64\""));
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (21, "limits.max_connections")
        );
        let e = errors(&GOOD.replace("tenant = \"acme\"\n", ""));
        assert_eq!(e[0].field, "tenant");
        assert!(e[0].reason.contains("missing field"));
    }

    #[test]
    fn syntax_errors_and_oversize_inputs_are_errors() {
        let e = errors("tenant = \"acme\nfoo");
        assert_eq!(e[0].line, 1);
        let big = vec![b'#'; MAX_INPUT + 1];
        let e = parse_policy_bytes(&big).expect_err("too big");
        assert!(e.0[0].reason.contains("1 MiB"));
        let e = parse_policy_bytes(b"tenant = \"a\"\n\xff").expect_err("utf8");
        assert_eq!(
            (e.0[0].line, e.0[0].reason.as_str()),
            (2, "not valid UTF-8")
        );
    }

    #[test]
    fn cidr_without_ports_points_at_the_rule() {
        let e = errors("tenant = \"a\"\njob = \"j\"\n[[egress]]\ncidr = \"203.0.113.0/24\"\n");
        assert_eq!(e[0].field, "egress[0].ports");
        assert!(e[0].line == 3 || e[0].line == 4, "line {}", e[0].line);
    }

    #[test]
    fn name_check_keys_parse_and_are_located_on_cidr_rules() {
        let d = parse_policy(
            "tenant = \"a\"\njob = \"j\"\n[[egress]]\nhost = \"a.example.com\"\nrequire_name = true\n",
        )
        .expect("valid");
        assert!(d.egress[0].name_check().expect("host").require_name);
        let e = errors(
            "tenant = \"a\"\njob = \"j\"\n[[egress]]\ncidr = \"203.0.113.0/24\"\nports = 1\nnames = \"off\"\n",
        );
        assert_eq!((e[0].line, e[0].field.as_str()), (6, "egress[0].names"));
    }

    #[test]
    fn integer_ports_are_accepted() {
        let d = parse_policy(
            "tenant = \"a\"\njob = \"j\"\n[[egress]]\ncidr = \"203.0.113.0/24\"\nports = 5432\n",
        )
        .expect("valid");
        assert_eq!(
            d.egress[0].to_string(),
            "cidr 203.0.113.0/24 ports 5432/tcp"
        );
    }

    #[test]
    fn deny_rules_and_audit_mode_parse_and_their_errors_name_the_deny_table() {
        let src = format!(
            "{GOOD}\nmode = \"audit\"\n[[deny]]\nhost = \"*.tracker.example.com:0\"\nprotocol = \"any\"\n\n[[deny]]\ncidr = \"10.0.0.0/8\"\nports = 0\n"
        );
        // `mode` after a table header belongs to that table: put it at the top instead.
        assert!(parse_policy(&src).is_err());
        let src = format!(
            "mode = \"audit\"\n{GOOD}\n[[deny]]\nhost = \"*.tracker.example.com:0\"\nprotocol = \"any\"\n\n[[deny]]\ncidr = \"10.0.0.0/8\"\nports = 0\n"
        );
        let d = parse_policy(&src).expect("valid");
        assert_eq!(d.mode, Mode::Audit);
        assert_eq!(d.deny.len(), 2);
        assert_eq!(d.deny[1].to_string(), "cidr 10.0.0.0/8 ports 0/tcp");
        let e = errors(&src.replace("\"*.tracker.example.com:0\"", "\"*.com\""));
        assert_eq!(e[0].field, "deny[0].host");
        let e = errors(&src.replace("ports = 0\n", "ports = 0\nallow_private = true\n"));
        assert_eq!(e[0].field, "deny[1].allow_private");
        let e = errors(&src.replace("\"audit\"", "\"learn\""));
        assert_eq!((e[0].line, e[0].field.as_str()), (1, "mode"));
        assert!(e[0].reason.contains("enforce or audit"), "{}", e[0].reason);
        assert_eq!(parse_policy(GOOD).expect("valid").mode, Mode::Enforce);
    }
}
