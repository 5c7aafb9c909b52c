//! PRIVILEGED (root): the agent with the real policy verifier and the real tier-1 dataplane —
//! a signed policy creates a job whose veth carries tier 1, adoption after restart keeps it,
//! delete removes it. Pins go to a unique bpffs directory removed by a guard.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use common::Scope;
use snas_agent::dataplane::Tier1Dataplane;
use snas_agent::netlink::Rtnl;
use snas_agent::seams::BundleVerifier;
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
    let token = sign(&draft.to_claims(&jti, 5, SystemTime::now()), &key).unwrap();
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
    assert_eq!(view.job_key, format!("{job_key:016x}"));
    assert_eq!(view.serial, 5);
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
    assert_eq!(report.adopted, vec![view.job_key.clone()]);
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
