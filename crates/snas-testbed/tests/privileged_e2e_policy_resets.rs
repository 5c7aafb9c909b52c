//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`), the rest of the policy
//! lifecycle (issue 16): a live connection to a destination an update removes is reset at both
//! ends; a signing key is rotated on a running testbed with no restart, and the old key's
//! removal cuts off a job it signed; a revocation written into the proxies' `revocations_dir`
//! alone cuts a job off.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::time::{Duration, Instant, SystemTime};

use e2e_support::*;
use snas_policy::keys::PolicyKey;
use snas_policy::revocation::{sign_revocation, RevocationClaims};
use snas_wire::PolicySerial;

/// Opens a connection to the echo service of `host`, checks one round trip, prints `ready`,
/// then waits (10 s at most) for what the connection does: `reset`, `eof` or `timeout`.
/// After `go` on stdin, connects to `host:port` every 50 ms (300 ms timeout each) until an
/// attempt fails; prints the seconds from `go` to the start of that attempt.
const PY_UNTIL_CUT: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
t0 = time.monotonic()
while True:
    start = time.monotonic()
    s = socket.socket(); s.settimeout(0.3)
    try:
        s.connect((host, port))
    except OSError:
        print("%.3f" % (start - t0), flush=True)
        break
    finally:
        s.close()
    time.sleep(0.05)
"#;

fn audit_has(file: &std::path::Path, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
    audit_lines(file).iter().any(pred)
}

#[test]
fn a_live_connection_to_a_destination_an_update_removes_is_reset_at_both_ends() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    // One proxy: the job's traffic after the update reaches the proxy that holds the flow.
    only_proxy_1(&tb);
    let body = "[[egress]]\nhost = \"api.example.com:7\"\nnames = \"off\"\n[[egress]]\nhost = \"bulk.example.com:7\"\nnames = \"off\"\n";
    let v1 = policy("acme", body);
    let token1 = tb.sign_policy(&v1).unwrap();
    let job = Job::start_token(&tb, 1, &token1);
    assert_eq!(server_connections(&tb, 7), 0);

    let mut hold = job.spawn_python(PY_IDLE_ECHO, &["api.example.com"]);
    let rx = timed_lines(&mut hold);
    let (ready, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ready, "ready");
    assert_eq!(
        server_connections(&tb, 7),
        1,
        "the server holds the connection"
    );

    // The update keeps bulk.example.com and removes api.example.com.
    let token2 = sign_update_with(
        &tb,
        &token1,
        &v1,
        "[[egress]]\nhost = \"bulk.example.com:7\"\nnames = \"off\"\n",
    );
    let t0 = Instant::now();
    jobs_update(&tb, &token2);
    // The job goes on working; its traffic carries the new serial to the proxy.
    assert_eq!(try_connect(&job, "bulk.example.com:7"), "ok");
    let (what, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(what, "reset", "the job's read ends with ECONNRESET");
    let job_side = at - t0;
    eprintln!("job side reset {job_side:?} after `snas jobs update`");
    assert!(job_side < Duration::from_secs(1), "{job_side:?}");
    wait_until(
        Duration::from_secs(1),
        "the server's connection is gone",
        || server_connections(&tb, 7) == 0,
    );
    let server_side = t0.elapsed();
    eprintln!("server side closed within {server_side:?} after `snas jobs update`");
    assert!(server_side < Duration::from_secs(1), "{server_side:?}");
    let _ = hold.wait();

    let key = job.key().to_string();
    let audit = tb.topology().proxy_dir(1).join("audit.jsonl");
    wait_until(Duration::from_secs(5), "flow_end policy_updated", || {
        audit_has(&audit, |v| {
            v["job_key"] == key.as_str() && v["end"] == "policy_updated" && v["port"] == 7
        })
    });
    let m = proxy_metrics(&tb, 1);
    eprintln!(
        "proxy 1 resets: {:?}",
        m.iter()
            .filter(|(k, _)| k.contains("reset"))
            .collect::<Vec<_>>()
    );
}

/// Writes `text` into `dir/name` as the documented procedure says: under a temporary name,
/// then renamed.
fn install_file(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Puts the testbed's trust directory back as it was (the test removes and adds keys).
struct TrustRestore {
    dir: std::path::PathBuf,
    saved: Vec<(std::ffi::OsString, Vec<u8>)>,
}

impl TrustRestore {
    fn new(dir: std::path::PathBuf) -> TrustRestore {
        let saved = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
            .collect();
        TrustRestore { dir, saved }
    }
}

impl Drop for TrustRestore {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.filter_map(Result::ok) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for (name, bytes) in &self.saved {
            let _ = std::fs::write(self.dir.join(name), bytes);
        }
    }
}

#[test]
fn a_key_rotated_on_a_running_testbed_is_honoured_and_the_old_keys_removal_cuts_its_jobs_off() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let trust = tb.topology().trust_dir();
    let _restore = TrustRestore::new(trust.clone());
    let old_pub: Vec<std::path::PathBuf> = std::fs::read_dir(&trust)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    assert_eq!(old_pub.len(), 1, "{old_pub:?}");
    // A job on the old key, running throughout.
    let old_job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    assert_eq!(try_connect(&old_job, "api.example.com:80"), "ok");

    // 1-2. A new key; its public half copied into the running testbed's trust directory.
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut seed)
        .unwrap();
    let new_key = PolicyKey::from_seed("prod-2027", seed).unwrap();
    install_file(&trust, "prod-2027.pub", &new_key.public_pem().unwrap());
    let added = Instant::now();
    // 3. A policy signed with it: accepted within 2 s, by the agent and the proxies alike.
    let draft = snas_policy::parse_policy(&policy(
        "acme",
        "[[egress]]\nhost = \"api.example.com:80\"\n",
    ))
    .unwrap();
    let jti: String = seed.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let token = snas_policy::sign(
        &draft.to_claims(&jti, PolicySerial(1), SystemTime::now()),
        &new_key,
    )
    .unwrap();
    let mut new_job = None;
    wait_until(
        Duration::from_secs(2),
        "a job signed with the new key starts",
        || match snas_testbed::JobGuard::create(
            tb.agent(1),
            &token,
            &tb.topology().state_dir().join("exec"),
        ) {
            Ok(g) => {
                new_job = Some(Job { guard: g, node: 1 });
                true
            }
            Err(_) => false,
        },
    );
    let new_job = new_job.unwrap();
    eprintln!("new key accepted {:?} after it was added", added.elapsed());
    wait_until(
        Duration::from_secs(2),
        "the new job reaches its destination",
        || try_connect(&new_job, "api.example.com:80") == "ok",
    );
    eprintln!(
        "new job through both tiers {:?} after the key was added",
        added.elapsed()
    );

    // 4. The old key goes: its job is cut off within 2 s; the new key's job runs on.
    std::fs::remove_file(&old_pub[0]).unwrap();
    let removed = Instant::now();
    let old_key = old_job.key();
    wait_until(
        Duration::from_secs(2),
        "the old key's job is torn down",
        || {
            !tb.agent(1)
                .list_jobs()
                .unwrap()
                .iter()
                .any(|j| j.job_key == old_key)
        },
    );
    eprintln!(
        "old job torn down {:?} after its key was removed",
        removed.elapsed()
    );
    let audit = tb.topology().node_dir(1).join("state").join("audit.log");
    let key = old_key.to_string();
    wait_until(Duration::from_secs(2), "agent audit key_untrusted", || {
        audit_has(&audit, |v| {
            v["job_key"] == key.as_str() && v["reason"] == "key_untrusted"
        })
    });
    assert_eq!(try_connect(&new_job, "api.example.com:80"), "ok");
    // No daemon restarted at any step.
    for d in [
        snas_testbed::daemons::Daemon::Agent(1),
        snas_testbed::daemons::Daemon::Proxy(1),
        snas_testbed::daemons::Daemon::Proxy(2),
    ] {
        assert!(running(&tb, d));
    }
}

#[test]
fn a_revocation_written_into_the_proxies_directory_alone_cuts_the_job_off() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let dir = tb.topology().proxy_revocations_dir();
    assert!(dir.is_dir(), "{} made by up", dir.display());
    let token = tb
        .sign_policy(&policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:80\"\n",
        ))
        .unwrap();
    let job = Job::start_token(&tb, 1, &token);
    assert_eq!(try_connect(&job, "api.example.com:80"), "ok");

    let claims = snas_policy::jws::decode_unverified(&token).unwrap();
    let revocation = RevocationClaims::for_policy(
        &claims,
        PolicySerial(1)..=PolicySerial(u32::MAX),
        SystemTime::now(),
    );
    let key = tb.signing_key().unwrap().unwrap();
    let signed = sign_revocation(&revocation, &key).unwrap();
    let before: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "policy_revoked")).sum();
    // Connections by address: the name's DNS answer is cached, and the question is the proxies'.
    let mut probe = Driver::new(job.spawn_python(PY_UNTIL_CUT, &["203.0.113.10", "80"]));
    install_file(&dir, "job.jws", &signed);
    probe.send("go");
    let took: f64 = probe.read_line().parse().unwrap();
    eprintln!("cut off {took:.3} s after the revocation was written");
    assert!(took < 1.0, "{took} s");
    let after: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "policy_revoked")).sum();
    assert!(after > before, "policy_revoked drops {before} -> {after}");
    // The agents' directory was not touched: the agent still runs the job.
    assert_eq!(
        std::fs::read_dir(tb.topology().agent_revocations_dir())
            .unwrap()
            .count(),
        0
    );
    let jobs = tb.agent(1).list_jobs().unwrap();
    assert!(jobs.iter().any(|j| j.job_key == job.key()));
    assert_ne!(try_connect(&job, "api.example.com:80"), "ok");
}
