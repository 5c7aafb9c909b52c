//! Black-box tests of `snas policy …`: they run the built binary (unprivileged, temp dirs only).

use assert_cmd::Command;
use predicates::prelude::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

const POLICY: &str = r#"tenant = "acme"
job = "job-42"
node = "192.0.2.7"

[[egress]]
host = "api.example.com"

[[egress]]
host = "*.s3.amazonaws.com:443"

[[egress]]
cidr = "203.0.113.0/24"
ports = "5432"
"#;

fn snas() -> Command {
    Command::cargo_bin("snas").expect("binary built")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        f.write("policy.toml", POLICY);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write");
        p
    }

    fn keygen(&self, dir: &str, kid: &str) -> PathBuf {
        snas()
            .args(["policy", "keygen", "--out"])
            .arg(self.path(dir))
            .args(["--key-id", kid])
            .assert()
            .success();
        self.path(dir).join(format!("{kid}.key"))
    }

    fn sign(&self, key: &Path, extra: &[&str]) -> String {
        let out = snas()
            .args(["policy", "sign", "--key"])
            .arg(key)
            .args(extra)
            .arg(self.path("policy.toml"))
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8(out).expect("utf8")
    }
}

#[test]
fn keygen_writes_private_key_0600_and_public_key_and_prints_paths() {
    let f = Fixture::new();
    let out = snas()
        .args(["policy", "keygen", "--out"])
        .arg(f.path("keys"))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).expect("utf8");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].ends_with(".key") && lines[1].ends_with(".pub"),
        "{out}"
    );
    let kid = Path::new(lines[0])
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("stem");
    assert!(
        kid.starts_with("snas-") && kid.len() == "snas-20260101-abcdef".len(),
        "{kid}"
    );
    let mode = fs::metadata(lines[0]).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(fs::read_to_string(lines[0])
        .expect("read")
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(fs::read_to_string(lines[1])
        .expect("read")
        .starts_with("-----BEGIN PUBLIC KEY-----"));
}

#[test]
fn keygen_refuses_to_overwrite_and_rejects_bad_ids() {
    let f = Fixture::new();
    f.keygen("keys", "k1");
    snas()
        .args(["policy", "keygen", "--out"])
        .arg(f.path("keys"))
        .args(["--key-id", "k1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists"));
    snas()
        .args(["policy", "keygen", "--out"])
        .arg(f.path("keys"))
        .args(["--key-id", "../x"])
        .assert()
        .code(1);
}

#[test]
fn check_accepts_a_valid_policy_with_a_one_line_summary() {
    let f = Fixture::new();
    snas()
        .args(["policy", "check"])
        .arg(f.path("policy.toml"))
        .assert()
        .code(0)
        .stdout(predicate::str::contains(
            "ok: tenant acme, job job-42, 3 rules (2 host, 1 cidr)",
        ))
        .stdout(predicate::function(|s: &str| s.lines().count() == 1));
}

#[test]
fn check_reports_file_line_field_reason() {
    let f = Fixture::new();
    let bad = f.write(
        "bad.toml",
        &POLICY.replace("*.s3.amazonaws.com:443", "api.example.*"),
    );
    snas()
        .args(["policy", "check"])
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(format!(
            "{}:9: egress[1].host: wildcard not allowed in the last label\n",
            bad.display()
        ));
}

#[test]
fn check_rejects_unknown_fields_wrong_types_and_bad_toml_without_panicking() {
    let f = Fixture::new();
    let cases = [
        (
            "unknown.toml",
            POLICY.replace("ports = \"5432\"", "ports = \"5432\"\ncolour = \"red\""),
            ":14: egress[2].colour: unknown field",
        ),
        (
            "type.toml",
            POLICY.replace("job = \"job-42\"", "job = 42"),
            ":2: job: invalid type",
        ),
        (
            "syntax.toml",
            POLICY.replace("tenant = \"acme\"", "tenant = \"acme"),
            ":1: ",
        ),
        (
            "missing.toml",
            POLICY.replace("tenant = \"acme\"\n", ""),
            "tenant: missing field",
        ),
        (
            "ip.toml",
            POLICY.replace("api.example.com", "192.0.2.10"),
            "egress[0].host: `192.0.2.10` is an IP address; use a cidr rule",
        ),
        (
            "private.toml",
            POLICY.replace("203.0.113.0/24", "10.0.0.0/8"),
            "egress[2].cidr: 10.0.0.0/8 lies in the always-denied",
        ),
    ];
    for (name, text, expected) in cases {
        let p = f.write(name, &text);
        snas()
            .args(["policy", "check"])
            .arg(&p)
            .assert()
            .code(2)
            .stderr(
                predicate::str::contains(expected).and(predicate::str::contains("panicked").not()),
            );
    }
}

#[test]
fn check_rejects_unreadable_oversize_and_non_utf8_files() {
    let f = Fixture::new();
    snas()
        .args(["policy", "check"])
        .arg(f.path("nope.toml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("No such file"));
    let big = f.write("big.toml", &"#".repeat((1 << 20) + 10));
    snas()
        .args(["policy", "check"])
        .arg(&big)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("1 MiB"));
    let p = f.path("latin1.toml");
    fs::write(&p, b"tenant = \"caf\xe9\"\n").expect("write");
    snas()
        .args(["policy", "check"])
        .arg(&p)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("UTF-8"));
    snas()
        .args(["policy", "check"])
        .arg(f.dir.path())
        .assert()
        .code(2);
}

#[test]
fn shipped_examples_check_as_documented() {
    for name in ["policy.toml", "policy-web.toml", "policy-private-db.toml"] {
        snas()
            .args(["policy", "check"])
            .arg(repo().join("examples").join(name))
            .assert()
            .code(0);
    }
    snas()
        .args(["policy", "check"])
        .arg(repo().join("examples/policy-invalid.toml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "policy-invalid.toml:6: egress[0].host: wildcard not allowed in the last label",
        ))
        .stderr(predicate::str::contains(
            "policy-invalid.toml:9: egress[1].cidr:",
        ));
}

#[test]
fn sign_then_verify_prints_the_claims_as_json() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let token = f.sign(&key, &["--serial", "7", "--ttl", "15m"]);
    assert_eq!(token.trim().split('.').count(), 3);
    let tok = f.write("token", &format!("\n  {token}  \n"));
    let out = snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("keys/k1.pub"))
        .arg(&tok)
        .assert()
        .code(0)
        .get_output()
        .stdout
        .clone();
    let claims: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(claims["tenant"], "acme");
    assert_eq!(claims["serial"], 7);
    assert_eq!(claims["node"], "192.0.2.7");
    assert_eq!(
        claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
        900
    );
    assert_eq!(claims["egress"][1]["host"], "*.s3.amazonaws.com:443");
    assert_eq!(claims["limits"]["max_connections"], 256);
}

#[test]
fn verify_reads_stdin_and_accepts_any_key_of_a_rotation_directory() {
    let f = Fixture::new();
    let old = f.keygen("keys", "old");
    let new = f.keygen("keys", "new");
    for key in [old, new] {
        let token = f.sign(&key, &[]);
        snas()
            .args(["policy", "verify", "--trust"])
            .arg(f.path("keys"))
            .arg("-")
            .write_stdin(token)
            .assert()
            .code(0);
    }
}

#[test]
fn verify_failures_exit_1_with_the_reason() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    f.keygen("other", "k2");
    let token = f.sign(&key, &[]);
    let expired = f.sign(&key, &["--issued-at", "1700000000"]);
    let parts: Vec<&str> = token.trim().split('.').collect();
    let tampered = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    let forged_sig = format!("{}.{}.{}", parts[0], parts[1], "A".repeat(parts[2].len()));
    let cases = [
        ("other", token.clone(), "unknown key id `k1`"),
        ("keys", expired, "policy expired"),
        ("keys", forged_sig, "bad signature"),
        ("keys", tampered, "verification failed"),
        ("keys", "garbage".to_owned(), "malformed token"),
        ("keys", String::new(), "empty token"),
    ];
    for (trust, tok, expected) in cases {
        snas()
            .args(["policy", "verify", "--trust"])
            .arg(f.path(trust))
            .arg("-")
            .write_stdin(tok)
            .assert()
            .code(1)
            .stderr(predicate::str::contains(expected));
    }
}

#[test]
fn verify_with_unreadable_inputs_exits_nonzero() {
    let f = Fixture::new();
    f.keygen("keys", "k1");
    snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("nokeys"))
        .arg("-")
        .write_stdin("x")
        .assert()
        .code(2);
    snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("keys"))
        .arg(f.path("missing"))
        .assert()
        .code(2);
    fs::create_dir(f.path("empty")).expect("mkdir");
    snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("empty"))
        .arg("-")
        .write_stdin("x")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no *.pub files"));
}

#[test]
fn sign_rejects_bad_policies_keys_and_ttls() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let bad = f.write(
        "bad.toml",
        &POLICY.replace("*.s3.amazonaws.com:443", "*.com"),
    );
    snas()
        .args(["policy", "sign", "--key"])
        .arg(&key)
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(":9: egress[1].host:"));
    snas()
        .args(["policy", "sign", "--key"])
        .arg(&key)
        .args(["--ttl", "25h"])
        .arg(f.path("policy.toml"))
        .assert()
        .code(2);
    snas()
        .args(["policy", "sign", "--key"])
        .arg(f.path("keys/k1.pub"))
        .arg(f.path("policy.toml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not an Ed25519 private key"));
}

#[test]
fn sign_refuses_a_serial_the_overlay_option_cannot_carry() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let token = f.sign(&key, &["--serial", "4294967295"]);
    assert!(!token.is_empty());
    for bad in ["4294967296", "18446744073709551616", "-1", "7x"] {
        snas()
            .args(["policy", "sign", "--key"])
            .arg(&key)
            .arg(format!("--serial={bad}"))
            .arg(f.path("policy.toml"))
            .assert()
            .code(2)
            .stderr(predicate::str::contains("--serial"))
            .stdout(predicate::str::is_empty());
    }
    snas()
        .args(["policy", "sign", "--key"])
        .arg(&key)
        .args(["--serial", "4294967296"])
        .arg(f.path("policy.toml"))
        .assert()
        .stderr(predicate::str::contains("at most 4294967295"));
}

#[test]
fn explain_prints_one_line_per_destination_and_exit_code_reflects_denials() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    let run = |dests: &[&str]| {
        let mut c = snas();
        c.args(["policy", "explain", "--trust"])
            .arg(f.path("keys"))
            .arg(&tok)
            .args(dests);
        c.assert()
    };
    run(&[
        "api.example.com:443",
        "eu.s3.amazonaws.com:443",
        "203.0.113.9:5432",
    ])
    .code(0)
    .stdout(
        "allow api.example.com:443/tcp rule 0 (host api.example.com:443/tcp); names: check TLS SNI, HTTP Host (allowed and bound to the address by the job's DNS)\n\
         allow eu.s3.amazonaws.com:443/tcp rule 1 (host *.s3.amazonaws.com:443/tcp); names: check TLS SNI, HTTP Host (allowed and bound to the address by the job's DNS)\n\
         allow 203.0.113.9:5432/tcp rule 2 (cidr 203.0.113.0/24 ports 5432/tcp)\n",
    );
    let out = run(&[
        "api.example.com:443",
        "api.example.com:80",
        "a.b.s3.amazonaws.com:443",
        "169.254.169.254:80",
        "[2001:db8::1]:443/udp",
    ])
    .code(1)
    .get_output()
    .stdout
    .clone();
    let out = String::from_utf8(out).expect("utf8");
    let words: Vec<(&str, &str, &str)> = out
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (
                w.next().unwrap_or(""),
                w.next().unwrap_or(""),
                w.next().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        words,
        vec![
            ("allow", "api.example.com:443/tcp", "rule"),
            ("deny", "api.example.com:80/tcp", "port_denied"),
            ("deny", "a.b.s3.amazonaws.com:443/tcp", "destination_denied"),
            ("deny", "169.254.169.254:80/tcp", "always_denied"),
            ("deny", "[2001:db8::1]:443/udp", "destination_denied"),
        ]
    );
}

#[test]
fn explain_errors_exit_2() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    snas()
        .args(["policy", "explain", "--trust"])
        .arg(f.path("keys"))
        .arg(&tok)
        .arg("no-port.example.com")
        .assert()
        .code(2);
    snas()
        .args(["policy", "explain", "--trust"])
        .arg(f.path("keys"))
        .arg(&tok)
        .arg("bad host:443")
        .assert()
        .code(2);
    let junk = f.write("junk", "not.a.token");
    snas()
        .args(["policy", "explain", "--trust"])
        .arg(f.path("keys"))
        .arg(&junk)
        .arg("api.example.com:443")
        .assert()
        .code(2);
}

#[test]
fn verify_refuses_a_signed_token_whose_claims_repeat_a_key() {
    let f = Fixture::new();
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    let claims = snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("keys"))
        .arg(&tok)
        .assert()
        .code(0)
        .get_output()
        .stdout
        .clone();
    let claims: serde_json::Value = serde_json::from_slice(&claims).expect("claims");
    // Re-sign the same claims with `tenant` repeated, as a hostile signer holding the key could:
    // a reader keeping the first value sees `evil`, one keeping the last sees `acme`.
    let text = serde_json::to_string(&claims).expect("json");
    let twice = text.replacen('{', "{\"tenant\":\"evil\",", 1);
    let pem = fs::read(&key).expect("key");
    let k = snas_policy::PolicyKey::from_pem("k1", &pem).expect("pem");
    let forged = snas_policy::jws::sign_unvalidated_payload(twice.as_bytes(), &k).expect("sign");
    snas()
        .args(["policy", "verify", "--trust"])
        .arg(f.path("keys"))
        .arg("-")
        .write_stdin(forged)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "invalid claims: duplicate key `tenant` in the object at $",
        ));
}

/// The widest policy a tenant can be signed: every address, port and protocol (private ranges
/// opened), and every name on 80/443.
const WIDE: &str = r#"tenant = "acme"
job = "wide"

[[egress]]
cidr = "0.0.0.0/0"
ports = "0"
protocol = "any"
allow_private = true

[[egress]]
host = "0.0.0.0"
"#;

#[test]
fn explain_with_infrastructure_denies_it_whatever_the_policy_says() {
    let f = Fixture::new();
    f.write("policy.toml", WIDE);
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    let explain = |extra: &[&str], dests: &[&str]| {
        let mut c = snas();
        c.args(["policy", "explain", "--trust"])
            .arg(f.path("keys"))
            .arg(&tok)
            .args(extra)
            .args(dests);
        c.assert()
    };
    let dests = [
        "192.0.2.21:9090",
        "10.99.0.1:53/udp",
        "10.99.0.2:53/udp",
        "198.51.100.7:6081/udp",
    ];
    explain(
        &[
            "--infrastructure",
            "192.0.2.0/24",
            "--infrastructure",
            "10.99.0.1",
        ],
        &dests,
    )
    .code(1)
    .stdout(
        "deny 192.0.2.21:9090/tcp infrastructure_denied (infrastructure 192.0.2.0/24)\n\
         deny 10.99.0.1:53/udp infrastructure_denied (infrastructure 10.99.0.1/32)\n\
         allow 10.99.0.2:53/udp rule 0 (cidr 0.0.0.0/0 ports 0/any allow_private)\n\
         allow 198.51.100.7:6081/udp rule 0 (cidr 0.0.0.0/0 ports 0/any allow_private)\n",
    );
    // Without the node's configuration, the same policy allows them all.
    explain(&[], &dests).code(0);
    // Host bits are ignored as in the agent's and proxy's configuration.
    explain(&["--infrastructure", "192.0.2.77/24"], &["192.0.2.21:9090"])
        .code(1)
        .stdout("deny 192.0.2.21:9090/tcp infrastructure_denied (infrastructure 192.0.2.0/24)\n");
    explain(&["--infrastructure", "192.0.2.0/33"], &["192.0.2.21:9090"])
        .code(2)
        .stderr(predicate::str::contains("--infrastructure"));
}

#[test]
fn explain_says_any_host_rules_allow_names_but_not_raw_addresses() {
    let f = Fixture::new();
    f.write(
        "policy.toml",
        &fs::read_to_string(repo().join("examples/policy-web.toml")).expect("example"),
    );
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    let explain = |dests: &[&str]| {
        let mut c = snas();
        c.args(["policy", "explain", "--trust"])
            .arg(f.path("keys"))
            .arg(&tok)
            .args(dests);
        c.assert()
    };
    explain(&["www.example.net:443", "cdn.example.org:80"])
        .code(0)
        .stdout(
            "allow www.example.net:443/tcp rule 0 (host 0.0.0.0/tcp: any host name); names: check TLS SNI, HTTP Host (allowed and bound to the address by the job's DNS)\n\
             allow cdn.example.org:80/tcp rule 0 (host 0.0.0.0/tcp: any host name); names: check TLS SNI, HTTP Host (allowed and bound to the address by the job's DNS)\n",
        );
    // Tier 1 only opens addresses the job resolved: a raw address needs a cidr rule, and explain
    // says so instead of promising what the tiers refuse.
    explain(&[
        "203.0.113.9:443",
        "[2001:db8::7]:80",
        "203.0.113.9:8080",
        "198.51.100.53:123/udp",
        "www.example.net:8080",
    ])
    .code(1)
    .stdout(
        "deny 203.0.113.9:443/tcp destination_denied (no cidr rule covers this address; rule 0 \
         `0.0.0.0` allows host names, not addresses)\n\
         deny [2001:db8::7]:80/tcp destination_denied (no cidr rule covers this address; rule 0 \
         `0.0.0.0` allows host names, not addresses)\n\
         deny 203.0.113.9:8080/tcp destination_denied (no rule names this destination)\n\
         allow 198.51.100.53:123/udp rule 1 (cidr 198.51.100.0/24 ports 123/udp)\n\
         deny www.example.net:8080/tcp port_denied (a rule names this destination, but not this \
         port/protocol)\n",
    );
}

const DENY_AUDIT: &str = r#"mode = "audit"
tenant = "acme"
job = "learn"
[[egress]]
host = "*.example.com:0"
[[egress]]
cidr = "203.0.113.0/24"
ports = "0"
[[deny]]
host = "tracker.example.com:0"
protocol = "any"
[[deny]]
cidr = "203.0.113.64/26"
ports = "0"
"#;

#[test]
fn explain_names_the_deny_rule_and_what_audit_mode_lets_through() {
    let f = Fixture::new();
    f.write("policy.toml", DENY_AUDIT);
    snas()
        .args(["policy", "check"])
        .arg(f.path("policy.toml"))
        .assert()
        .code(0)
        .stdout(predicates::str::contains(
            "2 rules (1 host, 1 cidr), 2 deny rules, mode audit",
        ));
    let key = f.keygen("keys", "k1");
    let tok = f.write("token", &f.sign(&key, &[]));
    let run = |dests: &[&str]| {
        let mut c = snas();
        c.args(["policy", "explain", "--trust"])
            .arg(f.path("keys"))
            .args(["--infrastructure", "192.0.2.0/24"])
            .arg(&tok)
            .args(dests);
        c.assert()
    };
    run(&["api.example.com:443", "203.0.113.9:22"]).code(0);
    run(&[
        "tracker.example.com:443",
        "203.0.113.70:443",
        "www.example.org:443",
        "198.51.100.7:8080/udp",
        "10.0.0.1:443",
        "192.0.2.21:443",
    ])
    .code(1)
    .stdout(
        "deny tracker.example.com:443/tcp deny_rule (deny rule 0: host tracker.example.com:0/any)\n\
         deny 203.0.113.70:443/tcp deny_rule (deny rule 1: cidr 203.0.113.64/26 ports 0/tcp)\n\
         would_deny www.example.org:443/tcp destination_denied (audit mode: let through and audited; no rule names this destination)\n\
         would_deny 198.51.100.7:8080/udp destination_denied (audit mode: let through and audited; no rule names this destination)\n\
         deny 10.0.0.1:443/tcp always_denied (private (RFC 1918) 10.0.0.0/8)\n\
         deny 192.0.2.21:443/tcp infrastructure_denied (infrastructure 192.0.2.0/24)\n",
    );
}

#[test]
fn suggest_writes_a_policy_that_checks_from_agent_and_proxy_logs() {
    let f = Fixture::new();
    let agent = f.write(
        "agent.log",
        concat!(
            r#"{"time":"2026-12-06T04:00:00.000Z","tier":1,"kind":"dns","action":"would_deny","tenant":"acme","job":"learn","job_key":"1f0c000000000001","proto":"udp","src":"10.255.0.2","dst":null,"port":53,"hostname":"www.example.org","rule":null,"reason":"destination_denied","bytes":40,"qtype":"A","addrs":["203.0.113.10"]}"#,
            "\n",
            r#"{"time":"2026-12-06T04:00:00.100Z","tier":1,"action":"would_deny","tenant":"acme","job":"learn","job_key":"1f0c000000000001","proto":"tcp","src":"10.255.0.2","dst":"203.0.113.10","port":443,"hostname":null,"rule":null,"reason":"destination_denied","bytes":0}"#,
            "\n",
            "not json\n",
        ),
    );
    let proxy = f.write(
        "proxy.jsonl",
        concat!(
            r#"{"time":"2026-12-06T04:00:00Z","tier":2,"kind":"flow","action":"would_deny","tenant":"acme","job":"learn","job_key":"1f0c000000000001","proto":"udp","src":"10.255.0.2:5000","dst":"198.51.100.9","port":7,"reason":"destination_denied","bytes":30,"egress":"198.51.100.1:40000"}"#,
            "\n",
        ),
    );
    let out = snas()
        .args(["policy", "suggest", "--job", "learn"])
        .arg(&agent)
        .arg(&proxy)
        .assert()
        .code(0)
        .stderr(predicates::str::contains("1 lines are not audit lines"))
        .get_output()
        .stdout
        .clone();
    let toml = String::from_utf8(out).expect("utf8");
    assert!(toml.contains("host = \"www.example.org:443\""), "{toml}");
    assert!(
        toml.contains("cidr = \"198.51.100.9/32\"\nports = \"7\"\nprotocol = \"udp\""),
        "{toml}"
    );
    let p = f.write("suggested.toml", &toml);
    snas().args(["policy", "check"]).arg(&p).assert().code(0);
    snas()
        .args(["policy", "suggest", "--job", "nobody"])
        .arg(&agent)
        .assert()
        .code(1);
}

#[test]
fn schema_prints_draft_2020_12_json() {
    let out = snas()
        .args(["policy", "schema"])
        .assert()
        .code(0)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(v["properties"]["mode"]["enum"][1], "audit");
}
