//! PRIVILEGED (root, runsc, `nft`): `snas run --agent SOCKET` on a node that is not a testbed
//! node. The test builds the testbed's namespaces (underlay switch, proxy namespaces, internet)
//! without its daemons, adds a node namespace of its own shaped like the shipped example
//! (`ens5` = 192.0.2.7/24 on the underlay), starts `snas agent` with
//! `deploy/systemd/agent.toml.example` and `snas proxy` (in the first proxy namespace,
//! 192.0.2.21) with `deploy/systemd/proxy.toml.example`, both changed only in their paths, and
//! runs a job through the agent's socket: the allowed destination answers, the forbidden one
//! is refused, and the summary read from the two audit logs says so.
//!
//! Also covered on the way: the daemons log through the binary's subscriber (stderr), and SIGHUP
//! makes both reopen their audit log at its path (the rotated file gets none of the job's
//! lines; the new one is created 0600).
//!
//! Everything is named after the testbed's unique prefix and removed by guards (the testbed's
//! own `down`, and [`NodeNs`] for the node namespace, its job namespaces and its bpffs pins).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snas_testbed::{Testbed, TestbedOptions};

fn snas_bin() -> PathBuf {
    std::env::var_os("SNAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/snas"))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap();
    assert_eq!(
        uid, "0",
        "privileged test: run as root (namespaces, eBPF, runsc)"
    );
    assert!(
        snas_bin().exists(),
        "no snas binary at {}: `cargo build --release -p snas` and set SNAS_BIN",
        snas_bin().display()
    );
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The node namespace, the agent's job-namespace directory and bpffs pins: removed on drop
/// (after the agent, which is dropped first).
struct NodeNs {
    name: String,
    netns_dir: PathBuf,
    pins: PathBuf,
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.netns_dir) {
            for e in rd.flatten() {
                let _ = Command::new("umount").arg(e.path()).status();
                let _ = std::fs::remove_file(e.path());
            }
        }
        // The agent makes its netns directory a shared mount of itself (as iproute2 does).
        while Command::new("umount")
            .arg(&self.netns_dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {}
        let _ = std::fs::remove_dir_all(&self.netns_dir);
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A daemon started by the test: SIGTERM on drop, SIGKILL if it has not exited in 10 s.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Daemon {
    fn start(ns: &str, args: &[&str], log: &Path, what: &'static str) -> Daemon {
        let log = std::fs::File::create(log).unwrap();
        // nsenter, not `ip netns exec`: that one also gives the daemon a mount namespace of its
        // own, where the agent's job-namespace mounts would stay invisible to `snas run`.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(snas_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, what }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    fn assert_running(&mut self, log: &Path) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited ({st}):\n{}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` with every `key = "…"` line's value replaced (the example's paths only).
fn with_paths(text: &str, paths: &[(&str, &Path)]) -> String {
    let mut out = String::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match paths.iter().find(|(k, _)| *k == key) {
            Some((k, p)) => {
                out.push_str(&format!("{k} = \"{}\"\n", p.display()));
                seen.push(*k);
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    // Paths the example leaves at their defaults, which name host-wide places (the real
    // agent's bpffs pins and job namespaces): set for this test.
    for (k, p) in paths {
        if !seen.contains(k) {
            out.push_str(&format!("{k} = \"{}\"\n", p.display()));
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ok() {
        assert!(began.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const JOB: &str = r#"
import socket, sys
def get(ip):
    try:
        s = socket.create_connection((ip, 80), timeout=3)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]
    except OSError as e:
        return "REFUSED " + type(e).__name__
print("allowed:", get("203.0.113.10"))
print("forbidden:", get("203.0.113.20"))
"#;

#[test]
fn privileged_a_job_runs_through_a_node_agent_started_from_the_shipped_example() {
    require_root();
    let mut opts = TestbedOptions::new(&snas_testbed::unique_prefix(), snas_bin());
    opts.start_agents = false;
    opts.start_proxies = false;
    let tb = Testbed::up(opts).unwrap();
    let t = tb.topology().clone();
    let p = tb.prefix().to_owned();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{p}-node"))
        .tempdir_in("/run")
        .unwrap();
    let d = dir.path();

    // The node: `ens5` with the example's underlay address, on the testbed's underlay switch.
    let node = NodeNs {
        name: format!("{p}-nx"),
        netns_dir: d.join("netns"),
        pins: PathBuf::from(format!("/sys/fs/bpf/{p}-nx")),
    };
    ip(&["netns", "add", &node.name]);
    ip(&["-n", &node.name, "link", "set", "lo", "up"]);
    let ul = t.underlay_ns();
    ip(&[
        "-n", &ul, "link", "add", "nx", "type", "veth", "peer", "name", "ens5", "netns", &node.name,
    ]);
    ip(&["-n", &ul, "link", "set", "nx", "master", "br0", "up"]);
    ip(&[
        "-n",
        &node.name,
        "addr",
        "add",
        "192.0.2.7/24",
        "dev",
        "ens5",
    ]);
    ip(&["-n", &node.name, "link", "set", "ens5", "up"]);
    let fwd = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()
        .unwrap();
    assert!(fwd.success());

    // The proxy of the example (192.0.2.21, pool 198.51.100.64/28 = the testbed's first proxy's).
    let secret = |name: &str| {
        let f = d.join(name);
        std::fs::write(&f, format!("{name}-0123456789abcdef\n")).unwrap();
        f
    };
    let proxy_audit = d.join("proxy-audit.jsonl");
    let proxy_cfg = d.join("proxy.toml");
    let example = std::fs::read_to_string(repo_file("deploy/systemd/proxy.toml.example")).unwrap();
    std::fs::write(
        &proxy_cfg,
        with_paths(
            &example,
            &[
                ("trust", &t.trust_dir()),
                ("control_token_file", &secret("control-token")),
                ("peer_secret_file", &secret("peer-secret")),
                ("audit_log", &proxy_audit),
                ("state_dir", &d.join("proxy-state")),
            ],
        ),
    )
    .unwrap();
    let proxy_log = d.join("proxy.log");
    let mut proxy = Daemon::start(
        &t.proxy_ns(1),
        &["proxy", "--config", proxy_cfg.to_str().unwrap()],
        &proxy_log,
        "snas proxy",
    );

    // The agent of the example.
    let agent_audit = d.join("agent-audit.jsonl");
    let socket = d.join("agent.sock");
    let agent_cfg = d.join("agent.toml");
    let example = std::fs::read_to_string(repo_file("deploy/systemd/agent.toml.example")).unwrap();
    std::fs::write(
        &agent_cfg,
        with_paths(
            &example,
            &[
                ("api_socket", &socket),
                ("trust_bundle", &t.trust_dir()),
                ("state_dir", &d.join("agent-state")),
                ("audit_log", &agent_audit),
                ("bpf_pin_dir", &node.pins),
                ("netns_dir", &node.netns_dir),
            ],
        ),
    )
    .unwrap();
    let agent_log = d.join("agent.log");
    let mut agent = Daemon::start(
        &node.name,
        &["agent", "--config", agent_cfg.to_str().unwrap()],
        &agent_log,
        "snas agent",
    );

    // Ready: the agent answers and sees the example's first proxy alive.
    let client = snas_agent::api::blocking::AgentClient::new(&socket);
    wait_for(
        "the agent to see proxy 192.0.2.21 alive",
        Duration::from_secs(30),
        || {
            agent.assert_running(&agent_log);
            proxy.assert_running(&proxy_log);
            client.proxies().is_ok_and(|ps| {
                ps.iter().any(|s| {
                    s.ip.to_string() == "192.0.2.21" && s.health == snas_agent::api::Health::Alive
                })
            })
        },
    );
    // The daemons log through the binary's subscriber (info by default).
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        log.contains("INFO snas_agent"),
        "no log line from the agent:\n{log}"
    );

    // logrotate: move both audit logs away, then SIGHUP.
    for (f, daemon) in [(&agent_audit, &agent), (&proxy_audit, &proxy)] {
        assert!(f.exists(), "{} not created at start", f.display());
        std::fs::rename(f, f.with_extension("jsonl.1")).unwrap();
        daemon.signal("HUP");
    }
    wait_for("the SIGHUPs to be handled", Duration::from_secs(10), || {
        std::fs::read_to_string(&agent_log)
            .unwrap()
            .contains("audit log reopened")
            && std::fs::read_to_string(&proxy_log)
                .unwrap()
                .contains("audit log reopened")
    });

    let token = tb
        .sign_policy(
            "tenant = \"acme\"\njob = \"agent-e2e\"\nttl = \"10m\"\n[[egress]]\ncidr = \"203.0.113.10/32\"\nports = \"80\"\n",
        )
        .unwrap();
    let run_dir = d.join("run");
    let out = Command::new(snas_bin())
        .args([
            "run",
            "--agent",
            socket.to_str().unwrap(),
            "--policy",
            &token,
        ])
        .args(["--audit-log", agent_audit.to_str().unwrap()])
        .args(["--audit-log", proxy_audit.to_str().unwrap()])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--timeout", "60s"])
        .args(["--", "python3", "-c", JOB])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\nagent log:\n{}\nproxy log:\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(),
            std::fs::read_to_string(&proxy_log).unwrap_or_default()
        )
    };
    assert_eq!(out.status.code(), Some(0), "{}", ctx());
    assert!(
        stdout.contains("allowed: hello from api.example.com (203.0.113.10)"),
        "{}",
        ctx()
    );
    assert!(stdout.contains("forbidden: REFUSED"), "{}", ctx());
    // The summary, from the two audit logs: the allowed flow (both tiers) and the refusal.
    let summary = format!("on agent {}", socket.display());
    assert!(stderr.contains(&summary), "{}", ctx());
    let allow = stderr
        .lines()
        .find(|l| l.contains("allow") && l.contains("203.0.113.10 tcp/80"))
        .unwrap_or_else(|| panic!("no allow row\n{}", ctx()));
    assert!(allow.contains("tier 1+2"), "{allow}\n{}", ctx());
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("deny") && l.contains("203.0.113.20 tcp/80")),
        "{}",
        ctx()
    );
    // Reopened: the job's lines are in new files (0600), none in the rotated ones.
    for f in [&agent_audit, &proxy_audit] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        let rotated = std::fs::read_to_string(f.with_extension("jsonl.1")).unwrap();
        assert!(!rotated.contains("agent-e2e"), "{}: {rotated}", f.display());
    }
    assert!(std::fs::read_to_string(&proxy_audit)
        .unwrap()
        .contains("agent-e2e"));
    // The job is gone from the agent.
    assert!(client.list_jobs().unwrap().is_empty());
    drop(agent);
    drop(proxy);
    drop(node);
}
