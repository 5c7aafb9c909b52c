//! The policy fetcher against an in-process HTTP server: verified policies are cached, a
//! tampered token or a policy pinned to another node lands in the negative cache (no second
//! request), and a newer serial replaces the cached policy but an older one never does.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Keys, PolicyServer};
use snas_policy::bundle_fs::load_trust_bundle;
use snas_policy::identity::job_key;
use snas_proxy::policy_fetch::{FetchConfig, Fetcher, PolicyStore};
use snas_proxy::tier2::{PolicyCache, PolicyLookup};
use snas_wire::Reason;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn policy(node: &str) -> String {
    format!(
        r#"
tenant = "acme"
job = "fetch"
node = "{node}"
[[egress]]
host = "api.example.com"
"#
    )
}

fn fetcher(keys: &Keys, port: u16) -> Arc<Fetcher> {
    let trust = load_trust_bundle(&keys.trust()).unwrap();
    let (f, _queue) = Fetcher::new(
        Arc::new(PolicyStore::new()),
        trust,
        FetchConfig {
            agent_port: port,
            timeout: Duration::from_secs(2),
            negative: Duration::from_secs(60),
            infrastructure: snas_proxy::infra::METADATA.to_vec().into(),
        },
    );
    f
}

#[tokio::test]
async fn a_verified_policy_is_fetched_once_and_cached() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let job = job_key("jti-fetch-ok-0000001");
    server.serve(
        job,
        200,
        &keys.token(&policy("127.0.0.1"), "jti-fetch-ok-0000001", 3),
    );
    let f = fetcher(&keys, server.addr.port());
    let p = f.ensure(job, LOCAL).await.unwrap();
    assert_eq!(
        (p.job_key, p.serial, &*p.job),
        (job, snas_wire::PolicySerial(3), "fetch")
    );
    let again = f.ensure(job, LOCAL).await.unwrap();
    assert!(Arc::ptr_eq(&p, &again));
    assert_eq!(server.hits(), 1);
    let snap = f.store().snapshot();
    assert!(matches!(
        snap.at(Instant::now()).lookup(job),
        PolicyLookup::Ready(_)
    ));
}

#[tokio::test]
async fn a_tampered_token_is_negatively_cached() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let job = job_key("jti-fetch-bad-000001");
    let mut token = keys.token(&policy("127.0.0.1"), "jti-fetch-bad-000001", 1);
    // Flip one character of the payload: the signature no longer matches.
    let dot = token.find('.').unwrap() + 5;
    let c = token.as_bytes()[dot];
    token.replace_range(dot..=dot, if c == b'A' { "B" } else { "A" });
    server.serve(job, 200, &token);
    let f = fetcher(&keys, server.addr.port());
    assert_eq!(
        f.ensure(job, LOCAL).await.unwrap_err(),
        Reason::PolicyInvalid
    );
    assert_eq!(
        f.ensure(job, LOCAL).await.unwrap_err(),
        Reason::PolicyInvalid
    );
    assert_eq!(
        server.hits(),
        1,
        "the second answer came from the negative cache"
    );
    let snap = f.store().snapshot();
    assert!(matches!(
        snap.at(Instant::now()).lookup(job),
        PolicyLookup::Rejected(Reason::PolicyInvalid)
    ));
    // After the negative entry's deadline the job reads as missing again.
    assert!(matches!(
        snap.at(Instant::now() + Duration::from_secs(61))
            .lookup(job),
        PolicyLookup::Missing
    ));
}

#[tokio::test]
async fn a_policy_pinned_to_another_node_is_refused() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let job = job_key("jti-fetch-node-00001");
    server.serve(
        job,
        200,
        &keys.token(&policy("192.0.2.99"), "jti-fetch-node-00001", 1),
    );
    let f = fetcher(&keys, server.addr.port());
    assert_eq!(
        f.ensure(job, LOCAL).await.unwrap_err(),
        Reason::NodeMismatch
    );
}

#[tokio::test]
async fn another_jobs_policy_is_refused_and_unknown_jobs_are_unknown() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let asked = job_key("jti-fetch-asked-0001");
    server.serve(
        asked,
        200,
        &keys.token(&policy("127.0.0.1"), "jti-fetch-other-0001", 1),
    );
    let f = fetcher(&keys, server.addr.port());
    assert_eq!(
        f.ensure(asked, LOCAL).await.unwrap_err(),
        Reason::PolicyInvalid
    );
    let unknown = job_key("jti-fetch-none-00001");
    assert_eq!(
        f.ensure(unknown, LOCAL).await.unwrap_err(),
        Reason::UnknownJob
    );
}

#[tokio::test]
async fn a_newer_serial_replaces_the_cached_policy_and_an_older_one_does_not() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let jti = "jti-fetch-serial-001";
    let job = job_key(jti);
    server.serve(job, 200, &keys.token(&policy("127.0.0.1"), jti, 1));
    let f = fetcher(&keys, server.addr.port());
    assert_eq!(
        f.ensure(job, LOCAL).await.unwrap().serial,
        snas_wire::PolicySerial(1)
    );
    server.serve(job, 200, &keys.token(&policy("127.0.0.1"), jti, 2));
    f.fetch_and_store(job, LOCAL).await.unwrap();
    assert_eq!(
        f.store().snapshot().get(job).unwrap().serial,
        snas_wire::PolicySerial(2)
    );
    server.serve(job, 200, &keys.token(&policy("127.0.0.1"), jti, 1));
    let _ = f.fetch_and_store(job, LOCAL).await;
    assert_eq!(
        f.store().snapshot().get(job).unwrap().serial,
        snas_wire::PolicySerial(2)
    );
    // A failed refetch keeps the verified policy.
    server.serve(job, 500, "");
    let _ = f.fetch_and_store(job, LOCAL).await;
    assert_eq!(
        f.store().snapshot().get(job).unwrap().serial,
        snas_wire::PolicySerial(2)
    );
}

#[tokio::test]
async fn a_refetch_request_from_the_data_path_is_served_by_the_fetch_loop() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let jti = "jti-fetch-queue-0001";
    let job = job_key(jti);
    server.serve(job, 200, &keys.token(&policy("127.0.0.1"), jti, 1));
    let trust = load_trust_bundle(&keys.trust()).unwrap();
    let (f, queue) = Fetcher::new(
        Arc::new(PolicyStore::new()),
        trust,
        FetchConfig {
            agent_port: server.addr.port(),
            timeout: Duration::from_secs(2),
            negative: Duration::from_secs(60),
            infrastructure: snas_proxy::infra::METADATA.to_vec().into(),
        },
    );
    tokio::spawn(Arc::clone(&f).run(queue));
    f.request(job, LOCAL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.store().snapshot().get(job).is_none() {
        assert!(
            Instant::now() < deadline,
            "the queued fetch never completed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.serve(job, 200, &keys.token(&policy("127.0.0.1"), jti, 2));
    f.request_refetch(job, LOCAL);
    while f.store().snapshot().get(job).unwrap().serial != snas_wire::PolicySerial(2) {
        assert!(Instant::now() < deadline, "the refetch never completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.hits(), 2);
}
