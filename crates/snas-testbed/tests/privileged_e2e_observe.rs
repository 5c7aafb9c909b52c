//! End-to-end (root; `cargo build -p snas` first): `snas jobs`, `snas flows` and `snas drops`
//! against a running testbed, as an operator would call them (the binary, `--prefix`), in table
//! and `--json` form.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use assert_cmd::Command;
use e2e_support::*;
use serde_json::Value;

const PY_HOLD: &str = r#"
import socket, sys
s = socket.create_connection(("api.example.com", 7), timeout=5)
s.sendall(b"hi"); assert s.recv(16) == b"hi"
print(s.getsockname()[1])
sys.stdin.readline()
"#;

fn snas(args: &[&str]) -> assert_cmd::assert::Assert {
    Command::new(snas_binary()).args(args).assert()
}

fn json_of(a: &assert_cmd::assert::Assert) -> Vec<Value> {
    let out = &a.get_output().stdout;
    serde_json::from_slice::<Value>(out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn text_of(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&a.get_output().stdout).into_owned()
}

#[test]
fn jobs_flows_and_drops_show_a_running_job_its_flow_and_its_drops_per_tier() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let p = tb.prefix().to_owned();
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:7\"\n");
    let name = job.info().job.clone();
    let key = job.info().job_key.to_string();
    let mut d = Driver::new(job.spawn_python(PY_HOLD, &[]));
    let port = d.read_line();
    // A tier-1 drop (no binding for this address) and, with tier 1 widened, a tier-2 refusal.
    assert_refused_fast(&job, "203.0.113.20", 80);
    snas_bpf::Tier1::open_pinned(&tb.topology().bpf_pin_dir(1))
        .unwrap()
        .allow_ip(
            job.key(),
            std::net::Ipv4Addr::new(203, 0, 113, 10),
            &[snas_bpf::PortRule::all(snas_bpf::RuleProtocol::Any)],
            Some(std::time::Duration::from_secs(600)),
        )
        .unwrap();
    let out = job.python(
        "import socket\ns=socket.socket(); s.settimeout(5)\ntry: s.connect(('203.0.113.10', 81))\nexcept OSError as e: print(e.errno)",
        &[],
    );
    assert_eq!(out.trim(), "111", "port 81 must be refused by the proxy");

    // snas jobs
    let a = snas(&["jobs", "--prefix", &p]).success();
    let t = text_of(&a);
    assert!(t.starts_with("NODE "), "{t}");
    assert!(
        t.contains(&name) && t.contains(&key) && t.contains("node-1"),
        "{t}"
    );
    let rows = json_of(&snas(&["jobs", "--prefix", &p, "--json"]).success());
    let me = rows.iter().find(|r| r["job_key"] == key.as_str()).unwrap();
    assert_eq!(me["tenant"], "acme");
    assert!(me["tier1_drops"].as_u64().unwrap() >= 1, "{me}");

    // snas flows: the held connection, with hostname and egress address.
    let a = snas(&["flows", "--prefix", &p]).success();
    let t = text_of(&a);
    assert!(t.starts_with("PROXY "), "{t}");
    let line = t
        .lines()
        .find(|l| l.contains(&format!(":{port} ")))
        .unwrap_or_else(|| panic!("no flow from port {port}:\n{t}"));
    for want in [
        name.as_str(),
        "acme",
        "203.0.113.10:7",
        "api.example.com",
        "198.51.100.",
    ] {
        assert!(line.contains(want), "{want} missing in {line}");
    }
    let rows = json_of(&snas(&["flows", "--prefix", &p, "--json"]).success());
    let f = rows
        .iter()
        .find(|r| {
            r["src"]
                .as_str()
                .is_some_and(|s| s.ends_with(&format!(":{port}")))
        })
        .unwrap();
    assert_eq!(f["job_key"], key.as_str());
    assert_eq!(f["hostname"], "api.example.com");
    assert!(f["state"].as_str().unwrap().contains("established"), "{f}");

    // snas drops: tier 1 per job, tier 2 from the proxies' counters.
    let rows = json_of(&snas(&["drops", "--prefix", &p, "--json"]).success());
    assert!(
        rows.iter().any(|r| r["tier"] == 1
            && r["job_key"] == key.as_str()
            && r["reason"] == "destination_denied"
            && r["packets"].as_u64().unwrap() >= 1),
        "{rows:?}"
    );
    // The proxy counts the job's refusal under its tenant (named from the agent's jobs).
    assert!(
        rows.iter().any(|r| r["tier"] == 2
            && r["reason"] == "port_denied"
            && r["tenant"] == "acme"
            && r["job"] == "*"),
        "{rows:?}"
    );
    let t = text_of(&snas(&["drops", "--prefix", &p]).success());
    assert!(t.starts_with("TENANT "), "{t}");
    assert!(
        t.contains("destination_denied") && t.contains("port_denied"),
        "{t}"
    );

    // Explicit sources replace the testbed's: only this agent, no proxy rows.
    let sock = tb.topology().agent_socket(1);
    let rows =
        json_of(&snas(&["drops", "--agent-socket", sock.to_str().unwrap(), "--json"]).success());
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["tier"] == 1),
        "{rows:?}"
    );
    d.send("done");
}

#[test]
fn an_unreachable_proxy_is_named_and_fails_the_command() {
    // Nothing listens on port 1 of loopback: the proxy is named, the exit status is 1.
    let a = snas(&["flows", "--proxy", "127.0.0.1:1"]).code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(err.contains("127.0.0.1:1"), "{err}");
    // No source at all is a usage error.
    snas(&["jobs", "--prefix", "snasnone0"]).code(2);
}

#[test]
fn every_decision_is_an_audit_line_on_the_node_or_the_proxy() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    let key = job.info().job_key.to_string();
    let name = job.info().job.clone();
    // Allowed flow, refused name (stub), tier-1 deny, tier-2 refusal (tier 1 widened).
    let (code, body) = job.curl("http://api.example.com/");
    assert_eq!(code, 0, "{body}");
    let out = job.run("dig", &["+time=2", "+tries=1", "blocked.example.com"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("REFUSED"));
    assert_refused_fast(&job, "203.0.113.20", 80);
    snas_bpf::Tier1::open_pinned(&tb.topology().bpf_pin_dir(1))
        .unwrap()
        .allow_ip(
            job.key(),
            std::net::Ipv4Addr::new(203, 0, 113, 10),
            &[snas_bpf::PortRule::all(snas_bpf::RuleProtocol::Any)],
            Some(std::time::Duration::from_secs(600)),
        )
        .unwrap();
    let out = job.python(
        "import socket\ns=socket.socket(); s.settimeout(5)\ntry: s.connect(('203.0.113.10', 81))\nexcept OSError as e: print(e.errno)",
        &[],
    );
    assert_eq!(out.trim(), "111");

    let agent_log = tb.topology().node_dir(1).join("state").join("audit.log");
    let proxy_logs: Vec<_> = (1..=2)
        .map(|n| tb.topology().proxy_dir(n).join("audit.jsonl"))
        .collect();
    let mine = |v: &Value| {
        v["job_key"] == key.as_str() && v["job"] == name.as_str() && v["tenant"] == "acme"
    };
    let find = |paths: &[std::path::PathBuf], pred: &dyn Fn(&Value) -> bool| {
        paths
            .iter()
            .flat_map(|p| audit_lines(p))
            .any(|v| mine(&v) && pred(&v))
    };
    let agent = [agent_log];
    wait_until(
        std::time::Duration::from_secs(5),
        "agent: DNS refusal",
        || {
            find(&agent, &|v| {
                v["reason"] == "dns_refused" && v["hostname"] == "blocked.example.com"
            })
        },
    );
    wait_until(
        std::time::Duration::from_secs(5),
        "agent: tier-1 deny",
        || {
            find(&agent, &|v| {
                v["tier"] == 1 && v["reason"] == "destination_denied" && v["dst"] == "203.0.113.20"
            })
        },
    );
    wait_until(
        std::time::Duration::from_secs(5),
        "proxy: allowed flow",
        || {
            find(&proxy_logs, &|v| {
                v["tier"] == 2
                    && v["action"] == "allow"
                    && v["dst"] == "203.0.113.10"
                    && v["port"] == 80
                    && v["hostname"] == "api.example.com"
            })
        },
    );
    wait_until(
        std::time::Duration::from_secs(5),
        "proxy: refused flow",
        || {
            find(&proxy_logs, &|v| {
                v["tier"] == 2 && v["reason"] == "port_denied" && v["port"] == 81
            })
        },
    );
}
