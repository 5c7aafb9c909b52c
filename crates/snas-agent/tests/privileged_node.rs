//! PRIVILEGED (root): the whole agent (`serve_with`) with a stub verifier and the in-memory
//! dataplane: the DNS stub, the health checker, the audit log, the node endpoints
//! (`/v1/proxies`, `/v1/dns`, `/metrics`) and the periodic work (flow ageing, tier 1's
//! infrastructure set at start and after discovery) are wired and answer; a dataplane that
//! cannot take the infrastructure set stops the start. The stub listens on a unique loopback
//! address; the one static "proxy" is a tiny control endpoint on loopback that answers 503, and
//! a DNS server on loopback names one more proxy for discovery.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{unix_http, Scope, StubVerifier};
use snas_agent::seams::RecordingDataplane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn privileged_agent_serves_dns_proxies_and_metrics() {
    let scope = Scope::new("node");
    let base = common::agent_config(&scope, "10.254.40.0/24");
    let n = std::process::id();
    let dns_ip = Ipv4Addr::new(127, 77, (n >> 8) as u8, n as u8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The proxy's control endpoint: always draining.
    let control_port = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut b = [0u8; 256];
                let _ = c.read(&mut b).await;
                let _ = c
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\ndraining")
                    .await;
            }
        });
        port
    });
    let discovery = rt.block_on(common::service_dns(Arc::new(std::sync::Mutex::new(Some(
        vec![DISCOVERED],
    )))));
    let text = format!(
        "{}\ndns_listen = \"{dns_ip}\"\nproxies = [\"127.0.0.1\"]\nproxy_control_port = {control_port}\nproxy_service = \"proxies.test\"\nproxy_service_dns = \"{discovery}\"\n",
        toml_of(&base)
    );
    let config =
        snas_agent::AgentConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
    let audit_path = config.audit_log_path();
    let socket = config.api_socket.clone();
    let dp = Arc::new(RecordingDataplane::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(snas_agent::serve_with(
        config,
        Arc::new(StubVerifier),
        dp.clone(),
        async move {
            let _ = rx.await;
        },
    ));

    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stub answers (REFUSED: no job has this source address).
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut q = hickory_proto::op::Message::new();
    q.set_id(31).add_query(hickory_proto::op::Query::query(
        "api.example.com.".parse().unwrap(),
        hickory_proto::rr::RecordType::A,
    ));
    sock.send_to(&q.to_vec().unwrap(), (dns_ip, 53)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let a = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(a.id(), 31);
    assert_eq!(a.response_code(), hickory_proto::op::ResponseCode::Refused);

    // The health checker marks the proxy draining and tells tier 1.
    loop {
        let (status, v) = unix_http(&socket, "GET", "/v1/proxies", "");
        assert_eq!(status, 200);
        if v[0]["health"] == "draining" {
            break;
        }
        assert!(Instant::now() < deadline, "proxy never draining: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sets = dp.proxy_sets();
    assert!(sets.last().unwrap()[0].draining && sets.last().unwrap()[0].alive);

    let (status, v) = unix_http(&socket, "GET", "/v1/dns", "");
    assert_eq!(status, 200);
    assert_eq!(v["outcomes"]["refused_unknown_job"], 1);

    // Tier 1's infrastructure set: installed at start (the node, the configured proxy), then
    // again with the discovered proxy; the flow table is aged from the start.
    let infra = dp.infrastructure();
    assert!(
        infra.contains(&"192.0.2.7/32".parse().unwrap()),
        "{infra:?}"
    );
    while !dp
        .infrastructure()
        .contains(&ipnet::IpNet::from(std::net::IpAddr::V4(DISCOVERED)))
    {
        assert!(
            Instant::now() < deadline,
            "discovered proxy never infrastructure: {:?}",
            dp.infrastructure()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dp
        .infrastructure()
        .contains(&"127.0.0.1/32".parse().unwrap()));
    while dp.agings() == 0 {
        assert!(Instant::now() < deadline, "flow table never aged");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (status, v) = unix_http(&socket, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let m = v.as_str().unwrap().to_owned();
    assert!(m.contains("snas_agent_jobs 0\n"), "{m}");
    assert!(m.contains("snas_agent_jobs_expired 0\n"), "{m}");
    assert!(!m.contains("snas_agent_flow_ageing_runs_total 0\n"), "{m}");
    assert!(
        m.contains("snas_agent_flow_ageing_failures_total 0\n"),
        "{m}"
    );
    assert!(
        !m.contains("snas_agent_infrastructure_updates_total 0\n"),
        "{m}"
    );
    assert!(
        m.contains("snas_agent_listen_socket{socket=\"dns-udp\",source=\"bound\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("snas_agent_policy_requests_total{outcome=\"forbidden\"} 0\n"),
        "{m}"
    );
    assert!(m.contains("snas_agent_dns_queries_total{outcome=\"refused_unknown_job\"} 1\n"));
    assert!(m.contains("snas_agent_proxy_health{proxy=\"127.0.0.1\",state=\"draining\"} 1\n"));
    assert!(m.contains("# TYPE snas_agent_job_setup_seconds histogram"));

    let _ = tx.send(());
    rt.block_on(task).unwrap().unwrap();
    assert!(audit_path.exists(), "audit log opened");
    assert!(!socket.exists(), "socket removed at exit");
}

const DISCOVERED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 31);

/// Tier 1 that cannot take an infrastructure set (everything else is recorded).
#[derive(Debug, Default)]
struct NoInfrastructure(RecordingDataplane);

impl snas_agent::Dataplane for NoInfrastructure {
    fn attach_job(
        &self,
        j: &snas_agent::seams::JobAttachment<'_>,
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.attach_job(j)
    }
    fn adopt_job(
        &self,
        j: &snas_agent::seams::JobAttachment<'_>,
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.adopt_job(j)
    }
    fn detach_job(
        &self,
        k: snas_wire::JobKey,
        n: &snas_agent::JobNetInfo,
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.detach_job(k, n)
    }
    fn counters(
        &self,
        k: snas_wire::JobKey,
    ) -> Result<std::collections::BTreeMap<snas_wire::Reason, u64>, snas_agent::seams::DataplaneError>
    {
        self.0.counters(k)
    }
    fn allow_resolved(
        &self,
        k: snas_wire::JobKey,
        ip: std::net::IpAddr,
        r: &[snas_bpf::PortRule],
        ttl: Duration,
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.allow_resolved(k, ip, r, ttl)
    }
    fn set_proxies(
        &self,
        p: &[snas_bpf::ProxyEntry],
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.set_proxies(p)
    }
    fn set_infrastructure(
        &self,
        _: &[ipnet::IpNet],
    ) -> Result<(), snas_agent::seams::DataplaneError> {
        Err(snas_agent::seams::DataplaneError(
            "no infrastructure map".into(),
        ))
    }
    fn age_flows(&self) -> Result<(), snas_agent::seams::DataplaneError> {
        self.0.age_flows()
    }
}

#[test]
fn privileged_an_agent_whose_tier1_refuses_the_infrastructure_set_does_not_start() {
    let scope = Scope::new("noinfra");
    let base = common::agent_config(&scope, "10.254.41.0/24");
    let n = std::process::id();
    let text = format!(
        "{}\ndns_listen = \"127.78.{}.{}\"\n",
        toml_of(&base),
        (n >> 8) as u8,
        n as u8
    );
    let config =
        snas_agent::AgentConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
    let socket = config.api_socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(snas_agent::serve_with(
            config,
            Arc::new(StubVerifier),
            Arc::new(NoInfrastructure::default()),
            std::future::pending(),
        ))
        .unwrap_err();
    assert!(
        matches!(err, snas_agent::RunError::Infrastructure(_)),
        "{err}"
    );
    assert!(err.to_string().contains("no infrastructure map"), "{err}");
    assert!(!socket.exists(), "nothing served");
}

/// The test config back as TOML (only the fields `agent_config` sets).
fn toml_of(c: &snas_agent::AgentConfig) -> String {
    format!(
        "node_name = \"{}\"\nunderlay_interface = \"{}\"\nunderlay_address = \"{}\"\ntrust_bundle = \"{}\"\njob_pool = \"{}\"\napi_socket = \"{}\"\npolicy_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nnetns_prefix = \"{}\"\nhost_veth_prefix = \"{}\"\n",
        c.node_name,
        c.underlay_interface,
        c.underlay_address,
        c.trust_bundle.display(),
        c.job_pool,
        c.api_socket.display(),
        c.state_dir.display(),
        c.netns_prefix,
        c.host_veth_prefix,
    )
}
