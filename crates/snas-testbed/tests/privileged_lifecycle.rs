//! Privileged (root), needs the `snas` binary (`cargo build -p snas`, or `SNAS_BIN`): the full
//! `up` with daemons, idempotence, a job through the agent, crash recovery and `down`.
#![allow(clippy::unwrap_used)] // guards and helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::process::Command;

use snas_policy::PolicyKey;
use snas_testbed::daemons::{self, Daemon};
use snas_testbed::record::TrustSource;
use snas_testbed::topology::Topology;
use snas_testbed::{netns, unique_prefix, Completeness, Testbed, TestbedOptions};

struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Testbed::down(&self.0);
    }
}

const POLICY: &str = r#"
tenant = "acme"
job = "testbed-exec"
[[egress]]
host = "api.example.com:80"
"#;

fn pids(t: &Topology) -> Vec<Option<i32>> {
    Daemon::all()
        .into_iter()
        .map(|d| daemons::running_pid(t, d))
        .collect()
}

#[test]
fn up_is_complete_and_idempotent_runs_a_job_and_the_guard_leaves_nothing() {
    common::require_root();
    let prefix = unique_prefix();
    let _safety = Down(prefix.clone());
    let t = Topology::new(&prefix).unwrap();
    {
        let opts = TestbedOptions::new(&prefix, common::snas_binary());
        let tb = Testbed::up(opts.clone()).unwrap();
        let st = tb.status();
        assert_eq!(st.completeness(), Completeness::Complete, "{st}");
        let before = pids(&t);
        assert!(before[0].is_some(), "internet daemon not running: {st}");
        assert!(
            daemons::running_pid(&t, Daemon::Agent(1)).is_some(),
            "agent 1 not running: {st}"
        );

        // The CLI agrees: `status` exits 0 for a complete testbed and names every DNS name.
        let out = Command::new(common::snas_binary())
            .args(["testbed", "status", "--prefix", &prefix])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{text}");
        for name in [
            "api.example.com",
            "blocked.example.com",
            "cdn.example.com",
            "bulk.example.com",
        ] {
            assert!(text.contains(name), "{name} missing from status:\n{text}");
        }
        assert!(
            text.contains("testbed-"),
            "status names no signing key:\n{text}"
        );

        tb.in_netns(&t.inet_ns(), common::check_internet_services)
            .unwrap();
        tb.in_netns(&t.proxy_ns(1), common::check_internet_services)
            .unwrap();

        // A second `up` finds everything in place and restarts nothing.
        snas_testbed::up_unguarded(&opts).unwrap();
        assert_eq!(pids(&t), before);
        assert_eq!(tb.status().completeness(), Completeness::Complete);

        // Stopping a daemon makes the testbed partial; starting it again completes it.
        tb.stop_agent(2);
        assert_eq!(tb.status().completeness(), Completeness::Partial);
        tb.start_agent(2).unwrap();
        assert_eq!(tb.status().completeness(), Completeness::Complete);

        let token = tb.sign_policy(POLICY).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "cat /etc/resolv.conf; ip -o -4 addr show dev eth0; exit 5",
        ]);
        let out = tb.exec_in_job(1, &token, cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(5), "{text}");
        assert!(text.contains("nameserver 10.255.1.1"), "{text}");
        assert!(text.contains("10.255.1.2/30"), "{text}");
        // The job is gone afterwards, and the host's resolv.conf was never touched.
        assert!(tb.agent(1).list_jobs().unwrap().is_empty());
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        assert!(!host_resolv.contains("10.255.1.1"));
    }
    common::assert_nothing_left(&t);
    let out = Command::new(common::snas_binary())
        .args(["testbed", "status", "--prefix", &prefix])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "status of a removed testbed");
}

#[test]
fn down_after_a_crash_cleans_everything_and_up_repairs_a_partial_testbed() {
    common::require_root();
    let prefix = unique_prefix();
    let _safety = Down(prefix.clone());
    let t = Topology::new(&prefix).unwrap();

    // --trust DIR: the testbed trusts exactly the given public key.
    let trust = std::env::temp_dir().join(format!("{prefix}-trust"));
    std::fs::create_dir_all(&trust).unwrap();
    let key = PolicyKey::from_seed("ops-1", [9u8; 32]).unwrap();
    std::fs::write(trust.join("ops-1.pub"), key.public_pem().unwrap()).unwrap();
    let mut opts = TestbedOptions::new(&prefix, common::snas_binary());
    opts.trust_dir = Some(trust.clone());
    let tb = Testbed::up(opts.clone()).unwrap();
    assert!(matches!(tb.record().trust, TrustSource::Dir { .. }));
    assert!(tb.signing_key().unwrap().is_none());
    assert!(t.trust_dir().join("ops-1.pub").exists());
    tb.persist();

    // Another trust on a running testbed is applied to it (the running daemons reload it;
    // privileged_e2e_policy_idle.rs shows its effect on jobs): the bundle holds exactly the
    // new key, with no temporary file left behind.
    let other = std::env::temp_dir().join(format!("{prefix}-trust2"));
    std::fs::create_dir_all(&other).unwrap();
    let key2 = PolicyKey::from_seed("ops-2", [7u8; 32]).unwrap();
    std::fs::write(other.join("ops-2.pub"), key2.public_pem().unwrap()).unwrap();
    let mut opts2 = opts.clone();
    opts2.trust_dir = Some(other.clone());
    let before = pids(&t);
    snas_testbed::up_unguarded(&opts2).unwrap();
    let files: Vec<_> = std::fs::read_dir(t.trust_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["ops-2.pub"]);
    assert_eq!(pids(&t), before, "nothing restarted");
    std::fs::remove_dir_all(&other).unwrap();

    // Crash: kill -9 two daemons, half-remove a namespace (unmounted, file left), and leave a
    // job namespace behind as a crashed agent would.
    for d in [Daemon::Internet, Daemon::Agent(1)] {
        let pid = daemons::running_pid(&t, d).unwrap();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let p2 = netns::netns_path(&t.proxy_ns(2));
    Command::new("umount").arg(&p2).status().unwrap();
    assert!(p2.exists() && !netns::is_mounted_netns(&p2));
    let job_ns = format!("{}deadbeef", t.job_netns_prefix(1));
    netns::add_netns(&job_ns).unwrap();

    let st = Testbed::status_of(&prefix).unwrap();
    assert_eq!(st.completeness(), Completeness::Partial, "{st}");
    let code = Command::new(common::snas_binary())
        .args(["testbed", "status", "--prefix", &prefix])
        .output()
        .unwrap()
        .status
        .code();
    assert_eq!(code, Some(1), "status of a partial testbed");
    assert!(st.job_namespaces.contains(&job_ns));

    // `up` completes what is missing.
    snas_testbed::up_unguarded(&opts).unwrap();
    let st = Testbed::status_of(&prefix).unwrap();
    assert_eq!(st.completeness(), Completeness::Complete, "{st}");

    // Crash again, then `down` from nothing but the prefix.
    let pid = daemons::running_pid(&t, Daemon::Agent(2)).unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    Command::new("umount")
        .arg(netns::netns_path(&t.node_ns(1)))
        .status()
        .unwrap();
    Testbed::down(&prefix).unwrap();
    common::assert_nothing_left(&t);
    assert_eq!(
        Testbed::status_of(&prefix).unwrap().completeness(),
        Completeness::Absent
    );
    std::fs::remove_dir_all(&trust).unwrap();
}
