//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`): the policy of a running job
//! changes without a restart (an added destination works, a removed one is refused, an old
//! serial is refused), and a revocation handed to the proxies alone — the job's agent is never
//! told — cuts the job off.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::process::Command;
use std::time::{Duration, SystemTime};

use e2e_support::*;
use snas_policy::revocation::{sign_revocation, RevocationClaims};
use snas_wire::PolicySerial;

#[test]
fn a_running_job_follows_a_live_update_and_refuses_an_old_serial() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let v1 = policy("acme", "[[egress]]\nhost = \"api.example.com:80\"\n");
    let token1 = tb.sign_policy(&v1).unwrap();
    let job = Job::start_token(&tb, 1, &token1);
    assert_eq!(try_connect(&job, "api.example.com:80"), "ok");
    // Not in the first policy: the name does not resolve.
    assert_ne!(try_connect(&job, "bulk.example.com:80"), "ok");

    // The same job, next serial: bulk.example.com in, api.example.com out.
    let job_line = v1.lines().find(|l| l.starts_with("job = ")).unwrap();
    let v2 = format!("tenant = \"acme\"\n{job_line}\n[[egress]]\nhost = \"bulk.example.com:80\"\n");
    let token2 = sign_update(&tb, &token1, &v2);
    let id = job.key().to_string();
    let view = tb.agent(1).update_policy(&id, &token2).unwrap();
    assert_eq!(view.job_key, job.key(), "an update keeps the job");
    let took = wait_until(
        Duration::from_secs(1),
        "the added destination works",
        || try_connect(&job, "bulk.example.com:80") == "ok",
    );
    eprintln!("added destination reachable {took:?} after the update");
    // The removed destination: its name no longer resolves and its address is refused at once
    // (tier 1 withdrew the binding; tier 2 decides by the new serial too).
    assert_ne!(try_connect(&job, "api.example.com:80"), "ok");
    assert_refused_fast(&job, "203.0.113.10", 80);

    // The first token again: not newer, refused (409), and nothing changes.
    let err = tb.agent(1).update_policy(&id, &token1).unwrap_err();
    assert!(err.to_string().contains("409"), "{err}");
    assert_eq!(try_connect(&job, "bulk.example.com:80"), "ok");
}

#[test]
fn a_revocation_given_to_the_proxies_alone_cuts_the_job_off() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
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
    let control = daemons_control_token(&tb);
    let before: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "policy_revoked")).sum();
    // Only the proxies' management endpoints hear of it: the agent is never told.
    for n in 1..=2 {
        let addr = tb.topology().proxy_control(n);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &tb.topology().proxy_ns(n),
                "curl",
                "-s",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code}", "-X", "POST", "--data-binary", &signed])
            .args(["-H", &format!("Authorization: Bearer {control}")])
            .arg(format!("http://{addr}/v1/revocations"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "proxy {n}");
    }
    let took = wait_until(Duration::from_secs(1), "the job is cut off", || {
        try_connect(&job, "api.example.com:80") != "ok"
    });
    eprintln!("cut off {took:?} after the revocation");
    let after: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "policy_revoked")).sum();
    assert!(after > before, "policy_revoked drops {before} -> {after}");
    // The agent still runs the job: the proxies alone enforced the revocation.
    let jobs = tb.agent(1).list_jobs().unwrap();
    assert!(jobs.iter().any(|j| j.job_key == job.key()));
    assert_ne!(try_connect(&job, "api.example.com:80"), "ok");
}

fn daemons_control_token(tb: &snas_testbed::Testbed) -> String {
    snas_testbed::daemons::control_token(tb.topology()).unwrap()
}
