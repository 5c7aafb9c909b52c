//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`): deny rules and audit mode
//! through DNS and both tiers, and `snas policy suggest` learning a policy from an audit-mode run
//! that then allows exactly what the run used.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use e2e_support::*;
use serde_json::Value;

fn logs(tb: &snas_testbed::Testbed) -> (PathBuf, Vec<PathBuf>) {
    (
        tb.topology().node_dir(1).join("state").join("audit.log"),
        (1..=2)
            .map(|n| tb.topology().proxy_dir(n).join("audit.jsonl"))
            .collect(),
    )
}

fn dig_status(job: &Job, name: &str) -> String {
    let out = job.run("dig", &["+time=2", "+tries=1", name, "A"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_owned()
}

/// Opens every port of `ip` for the job in tier 1, so that what follows is tier 2's decision.
fn widen_tier1(tb: &snas_testbed::Testbed, job: &Job, ip: Ipv4Addr) {
    snas_bpf::Tier1::open_pinned(&tb.topology().bpf_pin_dir(1))
        .unwrap()
        .allow_ip(
            job.key(),
            ip,
            &[snas_bpf::PortRule::all(snas_bpf::RuleProtocol::Any)],
            Some(Duration::from_secs(600)),
        )
        .unwrap();
}

#[test]
fn a_deny_rule_refuses_in_dns_and_at_both_tiers() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(
        &tb,
        r#"
[[egress]]
host = "*.example.com:0"
[[egress]]
cidr = "203.0.113.0/24"
ports = "80"
[[deny]]
host = "bulk.example.com:0"
[[deny]]
host = "api.example.com:81"
[[deny]]
cidr = "203.0.113.30/32"
ports = "0"
"#,
    );
    // DNS: a name a deny rule takes entirely is refused; others resolve.
    assert_eq!(dig_status(&job, "bulk.example.com"), "REFUSED");
    assert_eq!(dig_status(&job, "api.example.com"), "NOERROR");
    let (code, body) = job.curl("http://api.example.com/");
    assert_eq!(code, 0, "{body}");
    // Tier 1: the deny cidr beats the allow cidr on the same address.
    assert_refused_fast(&job, "203.0.113.30", 80);
    assert!(tier1_drops(&tb, &job, "deny_rule") >= 1);
    // Tier 1 again: the binding of api.example.com leaves out the denied port 81.
    assert_refused_fast(&job, "api.example.com", 81);
    // Tier 2: with tier 1 opened wide, the proxy refuses api.example.com:81 by its deny rule.
    widen_tier1(&tb, &job, Ipv4Addr::new(203, 0, 113, 10));
    let before: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "deny_rule")).sum();
    assert_refused_fast(&job, "203.0.113.10", 81);
    let after: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "deny_rule")).sum();
    assert!(after > before, "tier 2 deny_rule drops {before} -> {after}");
    let (_, proxies) = logs(&tb);
    let key = job.key().to_string();
    wait_until(
        Duration::from_secs(5),
        "tier-2 deny_rule audit line",
        || {
            proxies.iter().flat_map(|p| audit_lines(p)).any(|v| {
                v["job_key"] == key.as_str()
                    && v["reason"] == "deny_rule"
                    && v["rule"] == 1
                    && v["hostname"] == "api.example.com"
            })
        },
    );
}

const PY_CONNECT: &str = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, int(port)))
        print(target, "ok")
    except OSError as e:
        print(target, "refused", e.errno)
    finally:
        s.close()
"#;

fn connect(job: &Job, targets: &[&str]) -> Vec<(String, bool)> {
    job.python(PY_CONNECT, targets)
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (
                w.next().unwrap_or_default().to_owned(),
                w.next() == Some("ok"),
            )
        })
        .collect()
}

#[test]
fn audit_mode_reaches_names_outside_the_rules_audited_and_suggest_round_trips() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let toml = policy(
        "acme",
        "mode = \"audit\"\n[[egress]]\nhost = \"api.example.com:80\"\n",
    );
    let job_name = toml
        .lines()
        .find_map(|l| l.strip_prefix("job = \""))
        .map(|s| s.trim_end_matches('"').to_owned())
        .unwrap();
    let job = Job::start(&tb, 1, &toml);
    let proxy_ip = tb.topology().proxy_addr(1).to_string();
    let used = [
        "api.example.com:80",
        "bulk.example.com:80",
        "edge.example.net:7",
    ];
    let refused = [
        "metadata.example.com:80".to_owned(),
        "private.example.com:80".to_owned(),
        format!("{proxy_ip}:9090"),
    ];
    let mut all: Vec<&str> = used.to_vec();
    all.extend(refused.iter().map(String::as_str));
    let got = connect(&job, &all);
    for (t, ok) in &got {
        let want = used.contains(&t.as_str());
        assert_eq!(*ok, want, "{t}: {got:?}");
    }

    // would_deny at DNS and tier 1 (agent log) and at tier 2 (proxy log), each naming bulk.
    let (agent, proxies) = logs(&tb);
    let key = job.key().to_string();
    wait_until(Duration::from_secs(5), "would_deny lines", || {
        let a = audit_lines(&agent);
        let dns = a.iter().any(|v| {
            v["job_key"] == key.as_str()
                && v["kind"] == "dns"
                && v["action"] == "would_deny"
                && v["hostname"] == "bulk.example.com"
        });
        let tier1 = a.iter().any(|v| {
            v["job_key"] == key.as_str()
                && v["tier"] == 1
                && v["action"] == "would_deny"
                && v["dst"] == "203.0.113.40"
                && v["port"] == 80
                && v["hostname"] == "bulk.example.com"
        });
        let tier2 = proxies.iter().flat_map(|p| audit_lines(p)).any(|v| {
            v["job_key"] == key.as_str()
                && v["action"] == "would_deny"
                && v["hostname"] == "bulk.example.com"
        });
        dns && tier1 && tier2
    });
    // Private, metadata and infrastructure stayed refused, never would_deny.
    let lines: Vec<Value> = std::iter::once(agent.clone())
        .chain(proxies.iter().cloned())
        .flat_map(|p| audit_lines(&p))
        .filter(|v| v["job_key"] == key.as_str() && v["action"] == "would_deny")
        .collect();
    for v in &lines {
        let dst = v["dst"].as_str().unwrap_or_default();
        assert!(
            !dst.starts_with("10.") && !dst.starts_with("169.254.") && dst != proxy_ip,
            "{v}"
        );
    }
    drop(job);

    // Learn the policy and run it in enforce mode: the same destinations work, others do not.
    let mut args: Vec<String> = vec![
        "policy".into(),
        "suggest".into(),
        "--job".into(),
        job_name.clone(),
        agent.display().to_string(),
    ];
    args.extend(proxies.iter().map(|p| p.display().to_string()));
    let out = std::process::Command::new(snas_bin())
        .args(&args)
        .output()
        .unwrap();
    let suggested = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "suggest: {}\n{suggested}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        suggested.contains("host = \"bulk.example.com:80\""),
        "{suggested}"
    );
    let learnt = suggested.replace(
        &format!("job = \"{job_name}\""),
        &format!("job = \"{job_name}-learnt\""),
    );
    let job = Job::start(&tb, 1, &learnt);
    let got = connect(&job, &all);
    for (t, ok) in &got {
        assert_eq!(
            *ok,
            used.contains(&t.as_str()),
            "learnt policy, {t}: {got:?}"
        );
    }
    assert_eq!(dig_status(&job, "www.example.org"), "REFUSED");
    assert_refused_fast(&job, "api.example.com", 81);
}

fn snas_bin() -> PathBuf {
    match std::env::var_os("SNAS_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/snas"),
    }
}
