//! `POST /v1/jobs/{job_key}/updated/{serial}` on the proxy's service endpoint, through the real
//! router and listener, with a stand-in agent serving the job's policy: a notice for a higher
//! serial refetches at once and ends the idle flows the new policy removes; a notice for the
//! held serial or a lower one changes nothing and fetches nothing; refusals (403 not a node or
//! not the job's node, 404 unknown job, 400 bad key or serial) fetch nothing; a flood of forged
//! notices costs one verified fetch, the rest are declined 429; a refetched token that does not
//! verify replaces nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant, SystemTime};

use common::{open_udp_flow, post_from, Keys, PolicyServer};
use snas_policy::identity::{job_key, tenant_id};
use snas_proxy::api::paths;
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::Daemon;
use snas_proxy::tier2::JobPolicy;
use snas_wire::geneve::SnasOption;
use snas_wire::{JobKey, PolicySerial};

const NODE: Ipv4Addr = Ipv4Addr::LOCALHOST;
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const KEPT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const REMOVED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Serial 1: both destinations.
const V1: &str = r#"
tenant = "acme"
job = "updated"
node = "127.0.0.1"
[[egress]]
cidr = "203.0.113.10/32"
ports = "7"
protocol = "udp"
[[egress]]
cidr = "203.0.113.20/32"
ports = "7"
protocol = "udp"
"#;

/// Serial 2: 203.0.113.10 removed.
const V2: &str = r#"
tenant = "acme"
job = "updated"
node = "127.0.0.1"
[[egress]]
cidr = "203.0.113.20/32"
ports = "7"
protocol = "udp"
"#;

/// A control-plane daemon whose nodes are NODE and OTHER_NODE, fetching policies from
/// `agent`.
fn daemon(keys: &Keys, agent: &PolicyServer) -> Daemon {
    let d = keys.dir.path();
    let text = format!(
        r#"
name = "proxy-upd"
underlay_addr = "127.0.0.1"
nodes = ["127.0.0.1", "127.0.0.3"]
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "unused0"
resolver_listen = "127.0.0.1:0"
upstream_dns = ["127.0.0.1:9"]
control_listen = "127.0.0.1:0"
service_listen = "127.0.0.1:0"
agent_policy_port = {port}
audit_log = "{audit}"
state_dir = "{state}"
"#,
        trust = keys.trust().display(),
        port = agent.addr.port(),
        audit = d.join("audit.jsonl").display(),
        state = d.join("state").display(),
    );
    let cfg = ProxyConfig::parse(&text, std::path::Path::new("proxy.toml")).unwrap();
    Daemon::start_control_plane(cfg).unwrap()
}

/// Puts serial 1 of `jti` in the daemon's store, as a first fetch would.
fn hold_v1(d: &Daemon, keys: &Keys, jti: &str) {
    let bundle = snas_policy::bundle_fs::load_trust_bundle(&keys.trust()).unwrap();
    let v = snas_policy::jws::verify(&keys.token(V1, jti, 1), &bundle, SystemTime::now()).unwrap();
    d.shared().store.insert(JobPolicy::from_verified(&v, &[]));
}

fn held(d: &Daemon, job: JobKey) -> Option<u32> {
    d.shared().store.snapshot().get(job).map(|p| p.serial.0)
}

fn notice(job: JobKey, serial: u32) -> String {
    paths::job_updated(job, PolicySerial(serial))
}

/// Opens one UDP flow of the job to `dst`:7, as a datagram from NODE would.
fn open_flow(d: &Daemon, jti: &str, dst: Ipv4Addr, src_port: u16) {
    let option = SnasOption {
        tenant_id: tenant_id("acme"),
        job_key: job_key(jti),
        policy_serial: PolicySerial(1),
    };
    open_udp_flow(d, &option, NODE, src_port, dst);
}

fn live_flows(d: &Daemon, job: JobKey) -> u32 {
    d.shared().engine().conntrack().live_flows_of_job(job)
}

fn update_notices_metric(d: &Daemon) -> u64 {
    let text = snas_proxy::api::blocking::ProxyClient::new(d.control_addr())
        .metrics()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("snas_proxy_job_update_notices_total "))
        .unwrap_or_else(|| panic!("no update notice counter in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_notice_of_a_higher_serial_refetches_at_once_and_ends_the_idle_flows_the_update_removes() {
    let keys = Keys::new();
    let agent = PolicyServer::start(IpAddr::V4(NODE));
    let d = daemon(&keys, &agent);
    let jti = "jti-updated-notice-01";
    let job = job_key(jti);
    hold_v1(&d, &keys, jti);
    open_flow(&d, jti, REMOVED, 5000);
    open_flow(&d, jti, KEPT, 5001);
    assert_eq!(live_flows(&d, job), 2);
    agent.serve(job, 200, &keys.token(V2, jti, 2));

    // The job sends nothing more: only the notice tells the proxy.
    let t0 = Instant::now();
    let (code, _) = post_from(NODE, d.service_addr(), &notice(job, 2));
    assert_eq!(code, 202);
    wait_for(Duration::from_secs(1), "serial 2 held", || {
        held(&d, job) == Some(2)
    });
    wait_for(Duration::from_secs(1), "the removed flow ended", || {
        live_flows(&d, job) == 1
    });
    eprintln!("idle flow ended {:?} after the notice", t0.elapsed());
    assert_eq!(agent.hits(), 1);
    assert_eq!(update_notices_metric(&d), 1);

    // Equal and lower serials: 204, nothing fetched, nothing changed.
    for serial in [2, 1, 0] {
        assert_eq!(
            post_from(NODE, d.service_addr(), &notice(job, serial)).0,
            204,
            "serial {serial}"
        );
    }
    assert_eq!(agent.hits(), 1);
    assert_eq!(held(&d, job), Some(2));
    assert_eq!(live_flows(&d, job), 1);
    assert_eq!(update_notices_metric(&d), 1, "only refetches are counted");
}

#[test]
fn refused_notices_fetch_nothing_and_change_nothing() {
    let keys = Keys::new();
    let agent = PolicyServer::start(IpAddr::V4(NODE));
    let d = daemon(&keys, &agent);
    let jti = "jti-updated-notice-02";
    let job = job_key(jti);
    hold_v1(&d, &keys, jti);
    agent.serve(job, 200, &keys.token(V2, jti, 2));
    let svc = d.service_addr();
    let path = notice(job, 2);

    let (code, body) = post_from(STRANGER, svc, &path);
    assert_eq!((code, body.as_str()), (403, "not a configured node\n"));
    let (code, body) = post_from(OTHER_NODE, svc, &path);
    assert_eq!((code, body.as_str()), (403, "not the job's node\n"));
    let (code, body) = post_from(NODE, svc, &notice(JobKey(0xff), 2));
    assert_eq!((code, body.as_str()), (404, "unknown job\n"));
    for bad_key in ["nothex", "00000000000000FF", "0ff", "00000000000000ff0"] {
        let (code, _) = post_from(NODE, svc, &format!("/v1/jobs/{bad_key}/updated/2"));
        assert_eq!(code, 400, "{bad_key}");
    }
    for bad_serial in ["x", "-1", "4294967296", "1.5", ""] {
        let p = format!("/v1/jobs/{job}/updated/{bad_serial}");
        let (code, _) = post_from(NODE, svc, &p);
        // An empty segment matches no route.
        let want = if bad_serial.is_empty() { 404 } else { 400 };
        assert_eq!(code, want, "{bad_serial:?}");
    }
    assert_eq!(
        post_from(NODE, d.control_addr(), &path).0,
        404,
        "not on the management endpoint"
    );
    // Give a fetch that should not have started the time to show.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(agent.hits(), 0);
    assert_eq!(held(&d, job), Some(1));
    assert_eq!(update_notices_metric(&d), 0);
}

#[test]
fn a_flood_of_forged_notices_costs_one_verified_fetch_and_the_rest_are_declined() {
    let keys = Keys::new();
    let agent = PolicyServer::start(IpAddr::V4(NODE));
    let d = daemon(&keys, &agent);
    let jti = "jti-updated-notice-03";
    let job = job_key(jti);
    hold_v1(&d, &keys, jti);
    // The node has no serial 9: it serves serial 1 still.
    agent.serve(job, 200, &keys.token(V1, jti, 1));

    let mut answers = Vec::new();
    for _ in 0..500 {
        answers.push(post_from(NODE, d.service_addr(), &notice(job, 9)).0);
    }
    let accepted = answers.iter().filter(|c| **c == 202).count();
    let declined = answers.iter().filter(|c| **c == 429).count();
    assert_eq!(accepted + declined, answers.len(), "{answers:?}");
    // 202 while the one refetch is queued or running (it will be notified), then 429 only.
    // How many are accepted depends on how fast the fetch runs (a loaded machine): not checked.
    let first_declined = answers
        .iter()
        .position(|c| *c == 429)
        .unwrap_or(answers.len());
    assert!(
        first_declined >= 1,
        "the first notice is accepted: {answers:?}"
    );
    assert!(
        answers[first_declined..].iter().all(|c| *c == 429),
        "{answers:?}"
    );
    wait_for(Duration::from_secs(5), "the fetch", || agent.hits() == 1);
    // Once the fetch has ended, every further notice of the flood is declined.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..100 {
        assert_eq!(post_from(NODE, d.service_addr(), &notice(job, 9)).0, 429);
    }
    assert_eq!(
        agent.hits(),
        1,
        "one fetch in all ({accepted} accepted, {declined} declined)"
    );
    assert_eq!(held(&d, job), Some(1));
    assert_eq!(update_notices_metric(&d), accepted as u64);
}

#[test]
fn a_refetched_token_that_does_not_verify_replaces_nothing() {
    let keys = Keys::new();
    let agent = PolicyServer::start(IpAddr::V4(NODE));
    let d = daemon(&keys, &agent);
    let jti = "jti-updated-notice-04";
    let job = job_key(jti);
    hold_v1(&d, &keys, jti);
    open_flow(&d, jti, REMOVED, 5000);
    // A node that serves "serial 2" signed by a key the proxy does not trust.
    let rogue = snas_policy::PolicyKey::from_seed("rogue", [9; 32]).unwrap();
    let draft = snas_policy::parse_policy(V2).unwrap();
    let forged = snas_policy::sign(
        &draft.to_claims(jti, PolicySerial(2), SystemTime::now()),
        &rogue,
    )
    .unwrap();
    agent.serve(job, 200, &forged);
    let failed_before = d
        .shared()
        .fetcher
        .stats
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(post_from(NODE, d.service_addr(), &notice(job, 2)).0, 202);
    wait_for(Duration::from_secs(2), "the refused fetch", || {
        d.shared()
            .fetcher
            .stats
            .failed
            .load(std::sync::atomic::Ordering::Relaxed)
            > failed_before
    });
    assert_eq!(agent.hits(), 1);
    assert_eq!(held(&d, job), Some(1));
    assert_eq!(live_flows(&d, job), 1, "the flow lives on");
    // And the node cannot make the proxy ask again at once.
    assert_eq!(post_from(NODE, d.service_addr(), &notice(job, 2)).0, 429);
}
