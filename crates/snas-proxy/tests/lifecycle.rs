//! Policy lifecycle at the proxy, through the fetcher and the store (no data path): live
//! updates replace the held policy and tell the hook; a second update right after the first
//! is fetched without waiting for the negative-cache period; revocations drop the held policy,
//! refuse it and every covered serial afterwards (refetches included) and are forgotten with the
//! token's `exp`; trust bundle reloads honour added keys and cut off policies of removed ones.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{Keys, PolicyServer};
use snas_policy::bundle_fs::load_trust_bundle;
use snas_policy::identity::job_key;
use snas_policy::revocation::{sign_revocation, RevocationClaims};
use snas_policy::PolicyKey;
use snas_proxy::policy_fetch::{
    refetch_wait, FetchConfig, Fetcher, PolicyStore, REFETCH_AFTER_PROGRESS,
};
use snas_proxy::tier2::{PolicyCache, PolicyLookup};
use snas_wire::{PolicySerial, Reason};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const POLICY: &str = "tenant = \"acme\"\njob = \"life\"\nnode = \"127.0.0.1\"\n[[egress]]\nhost = \"api.example.com\"\n";
const NEGATIVE: Duration = Duration::from_secs(60);

fn fetcher(keys: &Keys, port: u16) -> (Arc<Fetcher>, snas_proxy::policy_fetch::FetchQueue) {
    Fetcher::new(
        Arc::new(PolicyStore::new()),
        load_trust_bundle(&keys.trust()).unwrap(),
        FetchConfig {
            agent_port: port,
            timeout: Duration::from_secs(2),
            negative: NEGATIVE,
            infrastructure: snas_proxy::infra::METADATA.to_vec().into(),
        },
    )
}

fn lookup(f: &Fetcher, job: snas_wire::JobKey) -> String {
    let snap = f.store().snapshot();
    let view = snap.at(Instant::now());
    match view.lookup(job) {
        PolicyLookup::Ready(p) => format!("ready {}", p.serial.0),
        PolicyLookup::Missing => "missing".into(),
        PolicyLookup::Rejected(r) => format!("rejected {}", r.name()),
    }
}

fn revocation(keys: &Keys, token: &str, serials: std::ops::RangeInclusive<u32>) -> String {
    let c = snas_policy::jws::decode_unverified(token).unwrap();
    let r = RevocationClaims::for_policy(
        &c,
        PolicySerial(*serials.start())..=PolicySerial(*serials.end()),
        SystemTime::now(),
    );
    sign_revocation(&r, &keys.key).unwrap()
}

#[tokio::test]
async fn an_update_replaces_the_policy_tells_the_hook_and_a_second_one_follows_at_once() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let jti = "jti-life-update-0001";
    let job = job_key(jti);
    server.serve(job, 200, &keys.token(POLICY, jti, 1));
    let (f, queue) = fetcher(&keys, server.addr.port());
    let told = Arc::new(Mutex::new(Vec::new()));
    let t = told.clone();
    f.set_on_replace(Arc::new(move |p| t.lock().unwrap().push(p.serial.0)));
    tokio::spawn(Arc::clone(&f).run(queue));
    f.ensure(job, LOCAL).await.unwrap();
    assert!(
        told.lock().unwrap().is_empty(),
        "a first policy is not an update"
    );
    for serial in [2u32, 3] {
        server.serve(job, 200, &keys.token(POLICY, jti, serial));
        // Tier 1 announces the new serial: the data path asks for a refetch.
        let deadline = Instant::now() + Duration::from_secs(1);
        while lookup(&f, job) != format!("ready {serial}") {
            f.request_refetch(job, LOCAL);
            assert!(
                Instant::now() < deadline,
                "update to serial {serial} not fetched within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(*told.lock().unwrap(), [2, 3]);
}

#[test]
fn refetches_that_bring_nothing_newer_wait_the_negative_period() {
    let (one, two) = (Some(PolicySerial(1)), Some(PolicySerial(2)));
    assert_eq!(refetch_wait(one, two, NEGATIVE), REFETCH_AFTER_PROGRESS);
    assert_eq!(refetch_wait(None, one, NEGATIVE), REFETCH_AFTER_PROGRESS);
    assert_eq!(refetch_wait(one, one, NEGATIVE), NEGATIVE);
    assert_eq!(refetch_wait(None, None, NEGATIVE), NEGATIVE);
}

#[tokio::test]
async fn a_revocation_cuts_the_job_off_and_no_refetch_brings_it_back() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let jti = "jti-life-revoke-0001";
    let job = job_key(jti);
    let t1 = keys.token(POLICY, jti, 1);
    server.serve(job, 200, &t1);
    let (f, _q) = fetcher(&keys, server.addr.port());
    f.ensure(job, LOCAL).await.unwrap();
    let r = f
        .verify_revocation(&revocation(&keys, &t1, 0..=u32::MAX), SystemTime::now())
        .unwrap();
    let now_unix = snas_policy::claims::unix_secs(SystemTime::now());
    assert!(f.store().revoke(&r, now_unix, Instant::now()).unwrap());
    assert_eq!(lookup(&f, job), "rejected policy_revoked");
    // The node keeps serving the token, then an "update": both stay refused.
    for serial in [1, 2] {
        server.serve(job, 200, &keys.token(POLICY, jti, serial));
        assert_eq!(
            f.fetch_and_store(job, LOCAL).await.unwrap_err().reason(),
            Reason::PolicyRevoked
        );
        assert_eq!(lookup(&f, job), "rejected policy_revoked");
    }
    assert_eq!(f.store().revocations(), 1);
    // Until the revoked token's exp (+ 60 s skew): then the revocation is forgotten.
    let exp = r.exp;
    f.store().evict_expired(exp + 59, Instant::now());
    assert_eq!(f.store().revocations(), 1);
    f.store().evict_expired(exp + 60, Instant::now());
    assert_eq!(f.store().revocations(), 0);
}

#[tokio::test]
async fn a_revocation_of_one_serial_lets_a_later_update_in() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let jti = "jti-life-revoke-0002";
    let job = job_key(jti);
    let t2 = keys.token(POLICY, jti, 2);
    server.serve(job, 200, &t2);
    let (f, _q) = fetcher(&keys, server.addr.port());
    f.ensure(job, LOCAL).await.unwrap();
    let r = f
        .verify_revocation(&revocation(&keys, &t2, 2..=2), SystemTime::now())
        .unwrap();
    let now_unix = snas_policy::claims::unix_secs(SystemTime::now());
    assert!(f.store().revoke(&r, now_unix, Instant::now()).unwrap());
    server.serve(job, 200, &keys.token(POLICY, jti, 3));
    f.fetch_and_store(job, LOCAL).await.unwrap();
    assert_eq!(lookup(&f, job), "ready 3");
}

#[tokio::test]
async fn revocations_signed_by_untrusted_keys_are_refused() {
    let keys = Keys::new();
    let (f, _q) = fetcher(&keys, 9);
    let rogue = PolicyKey::from_seed("rogue", [9; 32]).unwrap();
    let c = snas_policy::jws::decode_unverified(&keys.token(POLICY, "jti-life-rogue-00001", 1))
        .unwrap();
    let t = sign_revocation(
        &RevocationClaims::for_policy(&c, PolicySerial(0)..=PolicySerial(9), SystemTime::now()),
        &rogue,
    )
    .unwrap();
    let e = f.verify_revocation(&t, SystemTime::now()).unwrap_err();
    assert_eq!(e.reason(), Reason::KeyUntrusted);
}

#[tokio::test]
async fn a_trust_reload_honours_an_added_key_and_cuts_off_policies_of_a_removed_one() {
    let keys = Keys::new();
    let server = PolicyServer::start(IpAddr::V4(LOCAL));
    let (f, _q) = fetcher(&keys, server.addr.port());
    let new_key = PolicyKey::from_seed("new-key", [6; 32]).unwrap();
    let (old_jti, new_jti) = ("jti-life-trust-old01", "jti-life-trust-new01");
    let (old_job, new_job) = (job_key(old_jti), job_key(new_jti));
    server.serve(old_job, 200, &keys.token(POLICY, old_jti, 1));
    let draft = snas_policy::parse_policy(POLICY).unwrap();
    let new_token = snas_policy::sign(
        &draft.to_claims(new_jti, PolicySerial(1), SystemTime::now()),
        &new_key,
    )
    .unwrap();
    server.serve(new_job, 200, &new_token);
    f.ensure(old_job, LOCAL).await.unwrap();
    assert_eq!(
        f.fetch_and_store(new_job, LOCAL)
            .await
            .unwrap_err()
            .reason(),
        Reason::KeyUntrusted
    );
    // Step 1 of a rotation: add the new key (and a broken file, which changes nothing else).
    std::fs::write(
        keys.trust().join("new-key.pub"),
        new_key.public_pem().unwrap(),
    )
    .unwrap();
    std::fs::write(keys.trust().join("broken.pub"), "nope").unwrap();
    let r = f.reload_trust(&keys.trust());
    assert_eq!(r.diff.added, ["new-key"]);
    assert_eq!(r.problems.len(), 1);
    assert!(r.untrusted.is_empty());
    // The failure remembered while the key was unknown is forgotten with the reload: the job's
    // next packet fetches again at once, not after the negative-cache period.
    assert_eq!(lookup(&f, new_job), "missing");
    f.fetch_and_store(new_job, LOCAL).await.unwrap();
    // Step 3: remove the old key: its job is cut off at once, the other stays.
    std::fs::remove_file(keys.trust().join("test-key.pub")).unwrap();
    let r = f.reload_trust(&keys.trust());
    assert_eq!(r.diff.removed, ["test-key"]);
    assert_eq!(r.untrusted, [old_job]);
    assert_eq!(lookup(&f, old_job), "rejected key_untrusted");
    assert_eq!(lookup(&f, new_job), "ready 1");
    // An emptied directory keeps the last good bundle.
    std::fs::remove_file(keys.trust().join("new-key.pub")).unwrap();
    let r = f.reload_trust(&keys.trust());
    assert!(r.kept_previous && r.diff.is_empty());
    assert_eq!(lookup(&f, new_job), "ready 1");
}
