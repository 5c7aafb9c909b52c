//! PRIVILEGED (root): the agent with the real policy verifier and the real tier-1 dataplane —
//! a signed policy creates a job whose veth carries tier 1, adoption after restart keeps it,
//! delete removes it; the adapter gives tier 1 the node's DNS packet budget, the policy's
//! expiry and the infrastructure set, and ages flows. Pins go to a unique bpffs directory
//! removed by a guard.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::Scope;
use snas_agent::dataplane::Tier1Dataplane;
use snas_agent::jobnet::run_in_netns;
use snas_agent::netlink::Rtnl;
use snas_agent::seams::{BundleVerifier, Dataplane};
use snas_agent::{Agent, JobError};
use snas_bpf::{NodeConfig, Tier1};
use snas_policy::{parse_policy, sign, PolicyKey, TrustBundle};
use snas_wire::Reason;

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = snas_bpf::remove_pins(&self.0);
    }
}

fn load_tier1(pins: &Pins) -> Tier1 {
    snas_bpf::ensure_bpffs().unwrap();
    let mut node = NodeConfig::new("test", 1, Ipv4Addr::new(192, 0, 2, 7), 1500);
    node.attach_uplink = false;
    node.pin_dir = pins.0.clone();
    Tier1::load(&node).unwrap()
}

#[test]
fn privileged_signed_policy_job_gets_tier1_and_survives_restart() {
    let scope = Scope::new("tier1");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        scope.netns_prefix.trim_end_matches('-')
    )));
    let key = PolicyKey::from_seed("k1", [7; 32]).unwrap();
    let bundle = TrustBundle::from_keys([("k1", key.public_pem().unwrap())]).unwrap();
    let mut draft = parse_policy(
        "tenant = \"acme\"\njob = \"db\"\n[[egress]]\ncidr = \"203.0.113.0/24\"\nports = \"443\"\n",
    )
    .unwrap();
    draft.node = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    let jti = format!("jti-{}", scope.netns_prefix);
    let token = sign(
        &draft.to_claims(&jti, snas_wire::PolicySerial(5), SystemTime::now()),
        &key,
    )
    .unwrap();
    let config = common::agent_config(&scope, "10.254.20.0/24");

    let (agent, _) = Agent::start(
        config.clone(),
        Arc::new(BundleVerifier::new(bundle.clone())),
        Arc::new(Tier1Dataplane::from_tier1(load_tier1(&pins))),
    )
    .unwrap();

    // Refusals carry the policy's reason.
    let tampered = format!("{}x", token);
    match agent.create_job(&tampered) {
        Err(JobError::Policy(e)) => assert_eq!(e.reason, Reason::PolicyInvalid),
        other => panic!("tampered token accepted: {other:?}"),
    }

    let view = agent.create_job(&token).unwrap();
    let job_key = snas_policy::identity::job_key(&jti);
    assert_eq!(view.job_key, job_key);
    assert_eq!(view.serial, snas_wire::PolicySerial(5));
    let ifindex = Rtnl::open()
        .unwrap()
        .link_index(&view.veth)
        .unwrap()
        .unwrap();
    let probe = Tier1::open_pinned(&pins.0).unwrap();
    assert_eq!(probe.veth_of(job_key).unwrap(), Some(ifindex));
    let counters = agent.counters(job_key).unwrap();
    assert_eq!(counters.len(), Reason::ALL.len());

    // Restart: a new agent over the same state and pins adopts the job.
    drop(agent);
    let (agent, report) = Agent::start(
        config,
        Arc::new(BundleVerifier::new(bundle)),
        Arc::new(Tier1Dataplane::from_tier1(
            Tier1::open_pinned(&pins.0).unwrap(),
        )),
    )
    .unwrap();
    assert_eq!(report.adopted, vec![view.job_key.to_string()]);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(
        Rtnl::open().unwrap().link_index(&view.veth).unwrap(),
        Some(ifindex)
    );
    assert_eq!(probe.veth_of(job_key).unwrap(), Some(ifindex));

    agent.delete_job(job_key).unwrap();
    assert_eq!(probe.veth_of(job_key).unwrap(), None);
    assert!(scope.leftover_netns().is_empty());
}

/// From inside the job's namespace: a connected UDP socket sends once to `to` and returns the
/// error its next receive reports (tier 1's ICMP answer), `None` if an answer or nothing came.
fn udp_error_from_job(netns: &Path, to: &'static str) -> Option<i32> {
    run_in_netns(netns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(to).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        sock.send(b"probe").unwrap();
        let mut buf = [0u8; 64];
        sock.recv(&mut buf).err().and_then(|e| e.raw_os_error())
    })
    .unwrap()
}

/// Waits (bounded) until the job's drop counter of `reason` reaches `at_least`.
fn wait_drops(
    agent: &snas_agent::Agent,
    job_key: snas_wire::JobKey,
    reason: Reason,
    at_least: u64,
) -> u64 {
    let mut got = 0;
    for _ in 0..300 {
        got = agent.counters(job_key).unwrap()[&reason];
        if got >= at_least {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    got
}

#[test]
fn privileged_tier1_enforces_the_nodes_dns_budget_the_infrastructure_set_and_the_policys_expiry() {
    let scope = Scope::new("t1duty");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        scope.netns_prefix.trim_end_matches('-')
    )));
    let key = PolicyKey::from_seed("k1", [7; 32]).unwrap();
    let bundle = TrustBundle::from_keys([("k1", key.public_pem().unwrap())]).unwrap();
    let mut draft = parse_policy(
        "tenant = \"acme\"\njob = \"short\"\n[[egress]]\ncidr = \"0.0.0.0/0\"\nports = \"0\"\nprotocol = \"any\"\n",
    )
    .unwrap();
    draft.node = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    draft.ttl = Duration::from_secs(4);
    let jti = format!("jti-{}", scope.netns_prefix);
    let token = sign(
        &draft.to_claims(&jti, snas_wire::PolicySerial(1), SystemTime::now()),
        &key,
    )
    .unwrap();
    let mut config = common::agent_config(&scope, "10.254.21.0/24");
    config.dns_packets_per_sec = 5;
    config.dns_packet_burst = 10;
    config.infrastructure = vec!["198.51.100.0/24".parse().unwrap()];

    let dataplane = Arc::new(
        Tier1Dataplane::from_tier1(load_tier1(&pins))
            .with_config(&config)
            .unwrap(),
    );
    let (agent, _) = Agent::start(
        config.clone(),
        Arc::new(BundleVerifier::new(bundle)),
        dataplane.clone(),
    )
    .unwrap();
    dataplane
        .set_infrastructure(&config.infrastructure_set())
        .unwrap();
    let probe = Tier1::open_pinned(&pins.0).unwrap();
    assert_eq!(probe.infrastructure(), config.infrastructure_set());

    let view = agent.create_job(&token).unwrap();
    let job_key = snas_policy::identity::job_key(&jti);
    let netns = PathBuf::from(&view.netns_path);

    // A DNS flood from the job: the node's budget (burst 10, 5/s) lets about 10 through.
    let gateway = view.gateway_ip;
    run_in_netns(&netns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..40 {
            let _ = sock.send_to(
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
                (gateway, 53),
            );
        }
    })
    .unwrap();
    let rate = wait_drops(&agent, job_key, Reason::DnsRate, 25);
    assert!(
        (25..=30).contains(&rate),
        "{rate} of 40 dropped as dns_rate"
    );

    // The proxies' network is infrastructure although the policy allows 0.0.0.0/0.
    assert_eq!(
        udp_error_from_job(&netns, "198.51.100.9:9090"),
        Some(libc::EHOSTUNREACH)
    );
    assert_eq!(
        wait_drops(&agent, job_key, Reason::InfrastructureDenied, 1),
        1
    );
    dataplane.age_flows().unwrap();

    // From the policy's exp on, the job is refused.
    let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(view.expires_at);
    if let Ok(wait) = exp.duration_since(SystemTime::now()) {
        std::thread::sleep(wait + Duration::from_millis(200));
    }
    assert_eq!(
        udp_error_from_job(&netns, "203.0.113.7:443"),
        Some(libc::EHOSTUNREACH)
    );
    assert_eq!(wait_drops(&agent, job_key, Reason::PolicyExpired, 1), 1);

    agent.delete_job(job_key).unwrap();
    assert!(scope.leftover_netns().is_empty());
}
