//! PRIVILEGED (root): the policy lifecycle at the agent, with the real verifier over a trust
//! directory of real keys and the in-memory dataplane: live update (`PUT /v1/jobs/{job}/policy`)
//! and its refusals, revocations (`POST /v1/revocations`) tearing jobs down and keeping them out,
//! trust bundle reloads (a key added is honoured, a key removed tears its jobs down), and DNS
//! bindings of names an update removes withdrawn from tier 1.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{unix_http, Scope};
use snas_agent::audit::AuditSink;
use snas_agent::proxies::Proxies;
use snas_agent::seams::{BundleVerifier, RecordingDataplane};
use snas_agent::stub::{DnsStub, JobDirectory, StubConfig};
use snas_agent::{api, Agent};
use snas_policy::revocation::{sign_revocation, RevocationClaims};
use snas_policy::{EgressRule, PolicyDraft, PolicyKey, RuleFields};
use snas_wire::{PolicySerial, RuleProtocol};

struct Running {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    socket: PathBuf,
    dataplane: Arc<RecordingDataplane>,
    ops: Arc<api::Ops>,
}

impl Running {
    fn start(scope: &Scope, pool: &str, trust: &Path) -> Running {
        let mut config = common::agent_config(scope, pool);
        config.trust_bundle = trust.to_owned();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dataplane = Arc::new(RecordingDataplane::default());
        let socket = config.api_socket.clone();
        let verifier = Arc::new(BundleVerifier::load(trust).unwrap());
        let (agent, _) = Agent::start(config, verifier, dataplane.clone()).unwrap();
        let agent = Arc::new(agent);
        let unix = rt.block_on(async { api::bind_unix(&socket, 0o600).unwrap() });
        let tcp =
            rt.block_on(async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() });
        // A proxy nobody listens for: job-ended notices fail quietly.
        let proxies = Arc::new(Proxies::new(&[Ipv4Addr::new(127, 0, 0, 1)], 9, 9));
        let stub = Arc::new(DnsStub::new(
            agent.clone(),
            dataplane.clone(),
            proxies.clone(),
            AuditSink::discard(),
            StubConfig::from_agent(agent.config()),
        ));
        let ops = Arc::new(api::Ops::new(agent, proxies, stub, AuditSink::discard()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(api::serve_listeners(ops.clone(), unix, tcp, async move {
            let _ = rx.await;
        }));
        Running {
            rt,
            stop: Some(tx),
            socket,
            dataplane,
            ops,
        }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        unix_http(&self.socket, method, path, body)
    }

    fn reload(&self) {
        let mut problems = BTreeSet::new();
        self.rt.block_on(snas_agent::lifecycle::reload_trust(
            &self.ops,
            &mut problems,
        ));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for j in self.ops.agent.jobs() {
            let _ = self.ops.agent.delete_job(j.job_key);
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new(kids: &[(&str, u8)]) -> Keys {
        let k = Keys {
            dir: tempfile::tempdir().unwrap(),
        };
        for (kid, seed) in kids {
            k.add(kid, *seed);
        }
        k
    }
    fn key(kid: &str, seed: u8) -> PolicyKey {
        PolicyKey::from_seed(kid, [seed; 32]).unwrap()
    }
    fn add(&self, kid: &str, seed: u8) {
        let pem = Keys::key(kid, seed).public_pem().unwrap();
        std::fs::write(self.dir.path().join(format!("{kid}.pub")), pem).unwrap();
    }
    fn remove(&self, kid: &str) {
        std::fs::remove_file(self.dir.path().join(format!("{kid}.pub"))).unwrap();
    }
}

fn host(name: &str) -> EgressRule {
    EgressRule::from_fields(RuleFields::host(name)).unwrap()
}

/// A token of job `job` (lineage `jti`) with `serial` allowing `hosts`, signed by `kid`.
fn token(kid: &str, seed: u8, jti: &str, job: &str, serial: u32, hosts: &[&str]) -> String {
    let mut d = PolicyDraft::new("acme", job);
    d.egress = hosts.iter().map(|h| host(h)).collect();
    let c = d.to_claims(jti, PolicySerial(serial), SystemTime::now());
    snas_policy::sign(&c, &Keys::key(kid, seed)).unwrap()
}

const JTI: &str = "lifecycle-job-0000000001";

#[test]
fn privileged_a_live_update_replaces_the_policy_and_refuses_old_serials_and_other_jobs() {
    let scope = Scope::new("upd");
    let keys = Keys::new(&[("k1", 1)]);
    let a = Running::start(&scope, "10.254.40.0/24", keys.dir.path());
    let (s, v) = a.call(
        "POST",
        "/v1/jobs",
        &token("k1", 1, JTI, "web", 1, &["a.example.com"]),
    );
    assert_eq!(s, 201, "{v}");
    let key = v["job_key"].as_str().unwrap().to_owned();
    let path = format!("/v1/jobs/{key}/policy");
    let t2 = token("k1", 1, JTI, "web", 2, &["b.example.com"]);
    let (s, v) = a.call("PUT", &path, &t2);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["serial"].as_u64(), v["job_key"].as_str()),
        (Some(2), Some(key.as_str()))
    );
    // Tier 1 was reprogrammed with the new serial, and a restarted agent reads it from the record.
    let attached = a.dataplane.attached();
    assert_eq!(
        attached.values().next().map(|(_, s)| *s),
        Some(PolicySerial(2))
    );
    let (_, listed) = a.call("GET", "/v1/jobs/web", "");
    assert_eq!(listed["serial"].as_u64(), Some(2));
    // The proxies fetch the new token.
    let job_key = snas_policy::identity::job_key(JTI);
    assert_eq!(a.ops.agent.signed_policy(job_key), Some(t2));
    // Equal and lower serials: 409.
    for serial in [2, 1] {
        let (s, v) = a.call("PUT", &path, &token("k1", 1, JTI, "web", serial, &[]));
        assert_eq!(
            (s, v["error"].as_str()),
            (409, Some("serial_not_newer")),
            "{v}"
        );
    }
    // Another lineage (another jti, so another job key): 422; another job name: 422.
    let (s, v) = a.call(
        "PUT",
        &path,
        &token("k1", 1, "another-job-000000000001", "web", 3, &[]),
    );
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("lineage_mismatch")),
        "{v}"
    );
    let (s, v) = a.call("PUT", &path, &token("k1", 1, JTI, "batch", 3, &[]));
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("lineage_mismatch")),
        "{v}"
    );
    assert!(
        v["detail"].as_str().unwrap().contains("job: `batch`"),
        "{v}"
    );
    // A bad token is refused as POST refuses it; an unknown job is 404.
    let (s, v) = a.call("PUT", &path, "garbage");
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("policy_invalid")),
        "{v}"
    );
    let (s, v) = a.call("PUT", &path, &token("k9", 9, JTI, "web", 3, &[]));
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("key_untrusted")),
        "{v}"
    );
    let (s, _) = a.call(
        "PUT",
        "/v1/jobs/0123456789abcdef/policy",
        &token("k1", 1, JTI, "web", 3, &[]),
    );
    assert_eq!(s, 404);
    // Renewal: the same rules under a higher serial and a later expiry.
    let (s, v) = a.call(
        "PUT",
        &path,
        &token("k1", 1, JTI, "web", 7, &["b.example.com"]),
    );
    assert_eq!((s, v["serial"].as_u64()), (200, Some(7)), "{v}");
}

#[test]
fn privileged_an_update_withdraws_the_dns_bindings_of_removed_names() {
    let scope = Scope::new("bind");
    let keys = Keys::new(&[("k1", 1)]);
    let a = Running::start(&scope, "10.254.41.0/24", keys.dir.path());
    let (s, v) = a.call(
        "POST",
        "/v1/jobs",
        &token(
            "k1",
            1,
            JTI,
            "web",
            1,
            &["a.example.com:443", "b.example.com:443"],
        ),
    );
    assert_eq!(s, 201, "{v}");
    let job_key = snas_policy::identity::job_key(JTI);
    let tcp443 = [snas_bpf::PortRule::port(RuleProtocol::Tcp, 443)];
    let (ip_a, ip_b, shared) = (
        IpAddr::from([203, 0, 113, 1]),
        IpAddr::from([203, 0, 113, 2]),
        IpAddr::from([203, 0, 113, 3]),
    );
    let agent: &Agent = &a.ops.agent;
    let life = Duration::from_secs(300);
    for (name, ip) in [
        ("a.example.com", ip_a),
        ("b.example.com", ip_b),
        ("a.example.com", shared),
        ("b.example.com", shared),
    ] {
        agent.bound(job_key, PolicySerial(1), name, ip, &tcp443, life);
    }
    let (s, v) = a.call(
        "PUT",
        &format!("/v1/jobs/{job_key}/policy"),
        &token("k1", 1, JTI, "web", 2, &["b.example.com:443"]),
    );
    assert_eq!(s, 200, "{v}");
    let mut revoked: Vec<IpAddr> = a
        .dataplane
        .revoked()
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    revoked.sort();
    // a's own address is withdrawn, the shared one is rewritten with b's rules only, b's stays.
    assert_eq!(revoked, [ip_a, shared]);
    let reinstalled: Vec<IpAddr> = a.dataplane.allowed().into_iter().map(|x| x.ip).collect();
    assert_eq!(reinstalled, [shared]);
    // An answer installed under the old serial after the update is withdrawn at once.
    agent.bound(
        job_key,
        PolicySerial(1),
        "a.example.com",
        ip_a,
        &tcp443,
        life,
    );
    assert_eq!(a.dataplane.revoked().len(), 3);
}

#[test]
fn privileged_a_revocation_tears_the_job_down_and_keeps_it_out() {
    let scope = Scope::new("rev");
    let keys = Keys::new(&[("k1", 1), ("ops", 2)]);
    let a = Running::start(&scope, "10.254.42.0/24", keys.dir.path());
    let t = token("k1", 1, JTI, "web", 3, &["a.example.com"]);
    let (s, v) = a.call("POST", "/v1/jobs", &t);
    assert_eq!(s, 201, "{v}");
    let claims = snas_policy::jws::decode_unverified(&t).unwrap();
    let all = PolicySerial(0)..=PolicySerial(u32::MAX);
    // Signed by another trusted key (the control plane's), not the job's signer.
    let r = sign_revocation(
        &RevocationClaims::for_policy(&claims, all, SystemTime::now()),
        &Keys::key("ops", 2),
    )
    .unwrap();
    let (s, v) = a.call("POST", "/v1/revocations", &r);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["jobs_torn_down"].as_u64(), Some(1));
    let (s, _) = a.call("GET", "/v1/jobs/web", "");
    assert_eq!(s, 404);
    assert!(a.dataplane.attached().is_empty());
    // The same token, and a later update of the job, are refused while the revocation lasts.
    let (s, v) = a.call("POST", "/v1/jobs", &t);
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("policy_revoked")),
        "{v}"
    );
    let (s, v) = a.call("POST", "/v1/jobs", &token("k1", 1, JTI, "web", 4, &[]));
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("policy_revoked")),
        "{v}"
    );
    // Posting it again is harmless; a forged or untrusted revocation is refused.
    let (s, v) = a.call("POST", "/v1/revocations", &r);
    assert_eq!((s, v["jobs_torn_down"].as_u64()), (200, Some(0)));
    let forged = sign_revocation(
        &RevocationClaims::for_policy(
            &claims,
            PolicySerial(0)..=PolicySerial(9),
            SystemTime::now(),
        ),
        &Keys::key("rogue", 7),
    )
    .unwrap();
    let (s, v) = a.call("POST", "/v1/revocations", &forged);
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("key_untrusted")),
        "{v}"
    );
    let (s, v) = a.call("POST", "/v1/revocations", &t);
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("policy_invalid")),
        "{v}"
    );
}

#[test]
fn privileged_a_serial_only_revocation_lets_a_later_update_replace_the_revoked_one() {
    let scope = Scope::new("rev1");
    let keys = Keys::new(&[("k1", 1)]);
    let a = Running::start(&scope, "10.254.43.0/24", keys.dir.path());
    let t2 = token("k1", 1, JTI, "web", 2, &[]);
    let claims = snas_policy::jws::decode_unverified(&t2).unwrap();
    let only2 = sign_revocation(
        &RevocationClaims::for_policy(
            &claims,
            PolicySerial(2)..=PolicySerial(2),
            SystemTime::now(),
        ),
        &Keys::key("k1", 1),
    )
    .unwrap();
    let (s, _) = a.call("POST", "/v1/jobs", &token("k1", 1, JTI, "web", 1, &[]));
    assert_eq!(s, 201);
    let (s, v) = a.call("POST", "/v1/revocations", &only2);
    // Serial 1 runs: not covered.
    assert_eq!((s, v["jobs_torn_down"].as_u64()), (200, Some(0)), "{v}");
    let path = format!("/v1/jobs/{}/policy", claims.job_key());
    let (s, v) = a.call("PUT", &path, &t2);
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("policy_revoked")),
        "{v}"
    );
    let (s, v) = a.call("PUT", &path, &token("k1", 1, JTI, "web", 3, &[]));
    assert_eq!((s, v["serial"].as_u64()), (200, Some(3)), "{v}");
}

#[test]
fn privileged_trust_reload_honours_added_keys_and_tears_down_jobs_of_removed_ones() {
    let scope = Scope::new("trust");
    let keys = Keys::new(&[("old", 1)]);
    let a = Running::start(&scope, "10.254.44.0/24", keys.dir.path());
    let (s, _) = a.call("POST", "/v1/jobs", &token("old", 1, JTI, "web", 1, &[]));
    assert_eq!(s, 201);
    let fresh = token("new", 2, "lifecycle-job-0000000002", "api", 1, &[]);
    let (s, v) = a.call("POST", "/v1/jobs", &fresh);
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("key_untrusted")),
        "{v}"
    );
    // Rotation, step 1: add the new key. A bad file next to it changes nothing else.
    keys.add("new", 2);
    std::fs::write(keys.dir.path().join("broken.pub"), "not a key").unwrap();
    a.reload();
    let (s, v) = a.call("POST", "/v1/jobs", &fresh);
    assert_eq!(s, 201, "{v}");
    assert_eq!(a.ops.agent.jobs().len(), 2);
    // Step 3: remove the old key. The job it signed goes; the other stays.
    keys.remove("old");
    a.reload();
    let names: Vec<String> = a.ops.agent.jobs().into_iter().map(|j| j.job).collect();
    assert_eq!(names, ["api"]);
    // An emptied directory keeps the last good keys (never a verifier without keys).
    keys.remove("new");
    a.reload();
    assert_eq!(a.ops.agent.jobs().len(), 1);
}
