//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`), changes a running job does
//! nothing to reveal (issue 16): an update that removes the destination of an **idle** TCP
//! connection (nothing sent after the handshake and one round trip) resets it at both ends
//! within 1 s, told to the proxy by the agent's update notice alone; an update that keeps the
//! destination leaves the idle connection working; `snas testbed up --trust DIR` on a running
//! testbed applies the new trust to the running daemons (jobs of the removed key torn down
//! `key_untrusted`, jobs of the new key accepted, no daemon restarted), and back.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use e2e_support::*;
use snas_policy::keys::PolicyKey;
use snas_testbed::daemons::{running_pid, Daemon};
use snas_wire::PolicySerial;

/// As [`PY_IDLE_ECHO`] up to `ready`; then, after a line on stdin, one more round trip: prints `alive`
/// or the error's name.
const PY_HOLD_THEN_PING: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7), timeout=3)
s.sendall(b"ping\n")
assert s.recv(16) == b"ping\n"
print("ready", flush=True)
sys.stdin.readline()
try:
    s.sendall(b"again\n")
    print("alive" if s.recv(16) == b"again\n" else "wrong", flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"#;

const BOTH: &str = "[[egress]]\nhost = \"api.example.com:7\"\nnames = \"off\"\n[[egress]]\nhost = \"bulk.example.com:7\"\nnames = \"off\"\n";

/// The agent's `snas_agent_job_update_notices_total{outcome="…"}`.
fn agent_update_notices(tb: &snas_testbed::Testbed, outcome: &str) -> f64 {
    let text = tb.agent(1).metrics().unwrap();
    let series = format!("snas_agent_job_update_notices_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The packets the job sent on its port-7 flow, as proxy 1 counts them.
fn packets_out_to_port_7(tb: &snas_testbed::Testbed, job: &Job) -> u64 {
    let flows = proxy_flows(tb, 1);
    let f = flows
        .iter()
        .find(|f| f.job_key == job.key() && f.dst.port() == 7 && f.proto == "tcp")
        .unwrap_or_else(|| panic!("no port-7 flow of the job at proxy 1: {flows:?}"));
    u64::from(f.packets_out)
}

#[test]
fn an_idle_connection_to_a_destination_an_update_removes_is_reset_at_both_ends_within_a_second() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    // One proxy: the flow and the notice meet at proxy 1.
    only_proxy_1(&tb);
    let v1 = policy("acme", BOTH);
    let token1 = tb.sign_policy(&v1).unwrap();
    let job = Job::start_token(&tb, 1, &token1);

    let mut hold = job.spawn_python(PY_IDLE_ECHO, &["api.example.com"]);
    let rx = timed_lines(&mut hold);
    let (ready, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ready, "ready");
    assert_eq!(server_connections(&tb, 7), 1);
    // Let the last ACK of the round trip land, then take the count the job must not move.
    std::thread::sleep(Duration::from_millis(200));
    let sent_before = packets_out_to_port_7(&tb, &job);
    let refetch_before = agent_update_notices(&tb, "refetch");

    // The update removes api.example.com. The job does nothing at all from here on.
    let token2 = sign_update_with(
        &tb,
        &token1,
        &v1,
        "[[egress]]\nhost = \"bulk.example.com:7\"\nnames = \"off\"\n",
    );
    let t0 = Instant::now();
    jobs_update(&tb, &token2);
    let (what, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(what, "reset", "the job's read ends with ECONNRESET");
    let job_side = at - t0;
    eprintln!("idle job reset {job_side:?} after `snas jobs update` started");
    assert!(job_side < Duration::from_secs(1), "{job_side:?}");
    wait_until(
        Duration::from_secs(1).saturating_sub(t0.elapsed()),
        "the server's connection is gone",
        || server_connections(&tb, 7) == 0,
    );
    let server_side = t0.elapsed();
    eprintln!("server side closed {server_side:?} after `snas jobs update` started");
    assert!(server_side < Duration::from_secs(1), "{server_side:?}");
    let _ = hold.wait();

    // The flow ended with exactly the packets the job had sent before the update: the proxy
    // did not learn the new serial from the job's traffic.
    let key = job.key().to_string();
    let audit = tb.topology().proxy_dir(1).join("audit.jsonl");
    let mut end = None;
    wait_until(Duration::from_secs(5), "flow_end policy_updated", || {
        end = audit_lines(&audit).into_iter().find(|v| {
            v["job_key"] == key.as_str() && v["end"] == "policy_updated" && v["port"] == 7
        });
        end.is_some()
    });
    let end = end.unwrap();
    assert_eq!(end["packets_out"], sent_before, "{end}");
    // The notice did it: proxy 1 answered 202 (proxy 2, stopped, did not answer).
    assert_eq!(
        agent_update_notices(&tb, "refetch") - refetch_before,
        1.0,
        "{}",
        tb.agent(1).metrics().unwrap()
    );
    assert!(proxy_metrics(&tb, 1)["snas_proxy_job_update_notices_total"] >= 1.0);
    // What the update kept still works.
    assert_eq!(try_connect(&job, "bulk.example.com:7"), "ok");
}

#[test]
fn an_idle_connection_to_a_destination_an_update_keeps_survives_it() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    only_proxy_1(&tb);
    let v1 = policy("acme", BOTH);
    let token1 = tb.sign_policy(&v1).unwrap();
    let job = Job::start_token(&tb, 1, &token1);
    let mut hold = Driver::new(job.spawn_python(PY_HOLD_THEN_PING, &["api.example.com"]));
    assert_eq!(hold.read_line(), "ready");
    let refetch_before = agent_update_notices(&tb, "refetch");
    let notices_before = proxy_metrics(&tb, 1)["snas_proxy_job_update_notices_total"];

    // The update removes bulk.example.com and keeps api.example.com.
    let token2 = sign_update_with(
        &tb,
        &token1,
        &v1,
        "[[egress]]\nhost = \"api.example.com:7\"\nnames = \"off\"\n",
    );
    jobs_update(&tb, &token2);
    wait_until(Duration::from_secs(1), "proxy 1 takes the notice", || {
        proxy_metrics(&tb, 1)["snas_proxy_job_update_notices_total"] > notices_before
    });
    assert_eq!(agent_update_notices(&tb, "refetch") - refetch_before, 1.0);
    // Past the time a removed destination's flow would have been reset.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(server_connections(&tb, 7), 1, "the server still holds it");
    assert_eq!(hold.ask("go"), "alive");
    let key = job.key().to_string();
    let audit = tb.topology().proxy_dir(1).join("audit.jsonl");
    assert!(
        !audit_lines(&audit)
            .iter()
            .any(|v| v["job_key"] == key.as_str() && v["end"] == "policy_updated"),
        "no flow of the job ended"
    );
    assert_ne!(try_connect(&job, "bulk.example.com:7"), "ok", "removed");
}

/// `snas testbed up --prefix P [--trust DIR]` on the running testbed; its stderr.
fn up_again(tb: &snas_testbed::Testbed, trust: Option<&std::path::Path>) -> String {
    let mut c = Command::new(snas_binary());
    c.args(["testbed", "up", "--prefix", tb.topology().prefix()]);
    if let Some(dir) = trust {
        c.arg("--trust").arg(dir);
    }
    let t0 = Instant::now();
    let out = c.output().unwrap();
    eprintln!("snas testbed up took {:?}", t0.elapsed());
    assert!(out.status.success(), "snas testbed up: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn daemon_pids(tb: &snas_testbed::Testbed) -> Vec<Option<i32>> {
    [
        Daemon::Agent(1),
        Daemon::Agent(2),
        Daemon::Proxy(1),
        Daemon::Proxy(2),
    ]
    .into_iter()
    .map(|d| running_pid(tb.topology(), d))
    .collect()
}

fn job_listed(tb: &snas_testbed::Testbed, key: snas_wire::JobKey) -> bool {
    tb.agent(1)
        .list_jobs()
        .unwrap()
        .iter()
        .any(|j| j.job_key == key)
}

#[test]
fn up_with_another_trust_on_a_running_testbed_applies_it_to_the_running_daemons() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let pids = daemon_pids(&tb);
    assert!(pids.iter().all(Option::is_some), "{pids:?}");
    let own_kid = format!("testbed-{}", tb.topology().prefix());
    let old_job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    assert_eq!(try_connect(&old_job, "api.example.com:80"), "ok");

    // An operator's key, generated elsewhere; only its public half is given to `up`.
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut seed)
        .unwrap();
    let ops_key = PolicyKey::from_seed("ops-2027", seed).unwrap();
    // In the testbed's state directory, so `down` removes it.
    let dir = tb.topology().state_dir().join("ops-trust");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ops-2027.pub"), ops_key.public_pem().unwrap()).unwrap();
    let said = up_again(&tb, Some(&dir));
    let applied = Instant::now();
    eprintln!("up --trust said: {said}");
    assert!(said.contains("trusted now: ops-2027."), "{said}");
    assert!(
        said.contains(&format!("Removed or replaced: {own_kid};")),
        "{said}"
    );
    assert!(said.contains("key_untrusted"), "{said}");

    // The job of the removed key is torn down at its agent, audited key_untrusted.
    let old_key = old_job.key();
    wait_until(
        Duration::from_secs(2),
        "the old key's job is torn down",
        || !job_listed(&tb, old_key),
    );
    eprintln!("old key's job torn down {:?} after up", applied.elapsed());
    let audit = tb.topology().node_dir(1).join("state").join("audit.log");
    let k = old_key.to_string();
    wait_until(Duration::from_secs(2), "agent audit key_untrusted", || {
        audit_lines(&audit)
            .iter()
            .any(|v| v["job_key"] == k.as_str() && v["reason"] == "key_untrusted")
    });
    // A job signed with the new key starts at once and reaches its destination.
    let draft = snas_policy::parse_policy(&policy(
        "acme",
        "[[egress]]\nhost = \"api.example.com:80\"\n",
    ))
    .unwrap();
    let jti: String = seed.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let token = snas_policy::sign(
        &draft.to_claims(&jti, PolicySerial(1), SystemTime::now()),
        &ops_key,
    )
    .unwrap();
    let exec = tb.topology().state_dir().join("exec");
    let new_job = Job {
        guard: snas_testbed::JobGuard::create(tb.agent(1), &token, &exec).unwrap(),
        node: 1,
    };
    wait_until(
        Duration::from_secs(2),
        "the new key's job reaches its destination",
        || try_connect(&new_job, "api.example.com:80") == "ok",
    );
    assert_eq!(daemon_pids(&tb), pids, "no daemon restarted");

    // And back to the testbed's own key: the ops key's job goes, the testbed's key signs again.
    let said = up_again(&tb, None);
    assert!(said.contains(&format!("trusted now: {own_kid}.")), "{said}");
    assert!(said.contains("Removed or replaced: ops-2027;"), "{said}");
    let new_key = new_job.key();
    wait_until(
        Duration::from_secs(2),
        "the ops key's job is torn down",
        || !job_listed(&tb, new_key),
    );
    let again = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    assert_eq!(try_connect(&again, "api.example.com:80"), "ok");
    assert_eq!(daemon_pids(&tb), pids, "no daemon restarted");

    // The same trust again changes nothing and says nothing.
    let said = up_again(&tb, None);
    assert!(!said.contains("trust changed"), "{said}");
    eprintln!("test body done {:?} after the first up", applied.elapsed());
}
