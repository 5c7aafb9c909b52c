//! PRIVILEGED (root): the agent's HTTP API over a real Unix socket and TCP listener, with a stub
//! verifier and the in-memory dataplane; restart adoption; orphan cleanup; the policy endpoint
//! answering only proxies; job-ended notices to the proxies; expiry shown in the job list.
//! The one "proxy" is 127.0.0.1 with a control endpoint that records what it is told.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{http, unix_http, Scope, StubVerifier};
use snas_agent::audit::AuditSink;
use snas_agent::config::AgentConfig;
use snas_agent::jobnet::is_netns_mount;
use snas_agent::netlink::Rtnl;
use snas_agent::proxies::Proxies;
use snas_agent::seams::RecordingDataplane;
use snas_agent::stub::{DnsStub, StubConfig};
use snas_agent::{api, Agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running agent serving on a Unix socket and an ephemeral TCP port.
struct Running {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    socket: PathBuf,
    policy_addr: SocketAddr,
    dataplane: Arc<RecordingDataplane>,
    ops: Arc<api::Ops>,
    /// Request lines the proxy's control endpoint received.
    told: Arc<Mutex<Vec<String>>>,
    /// Added to the real time by the agent's clock.
    skew: Arc<Mutex<Duration>>,
}

/// The proxy's control endpoint on 127.0.0.1: records each request line, answers 204.
async fn control_endpoint(told: Arc<Mutex<Vec<String>>>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let told = told.clone();
            tokio::spawn(async move {
                let mut b = vec![0u8; 1024];
                let n = c.read(&mut b).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&b[..n]).into_owned();
                told.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or_default().to_owned());
                let _ = c.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            });
        }
    });
    port
}

impl Running {
    fn start(config: AgentConfig) -> (Running, snas_agent::StartReport) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dataplane = Arc::new(RecordingDataplane::default());
        let socket = config.api_socket.clone();
        let mode = config.api_socket_mode;
        let skew = Arc::new(Mutex::new(Duration::ZERO));
        let s = skew.clone();
        let (agent, report) = Agent::start_with_clock(
            config,
            Arc::new(StubVerifier),
            dataplane.clone(),
            Arc::new(move || SystemTime::now() + *s.lock().unwrap()),
        )
        .unwrap();
        let agent = Arc::new(agent);
        let told = Arc::new(Mutex::new(Vec::new()));
        let (unix, tcp, control_port) = rt.block_on(async {
            (
                api::bind_unix(&socket, mode).unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                control_endpoint(told.clone()).await,
            )
        });
        let proxies = Arc::new(Proxies::new(&[Ipv4Addr::LOCALHOST], control_port, 9));
        let stub = Arc::new(DnsStub::new(
            agent.clone(),
            dataplane.clone(),
            proxies.clone(),
            AuditSink::discard(),
            StubConfig::from_agent(agent.config()),
        ));
        let ops = Arc::new(api::Ops::new(agent, proxies, stub, AuditSink::discard()));
        let policy_addr = tcp.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(api::serve_listeners(ops.clone(), unix, tcp, async move {
            let _ = rx.await;
        }));
        (
            Running {
                rt,
                stop: Some(tx),
                task: Some(task),
                socket,
                policy_addr,
                dataplane,
                ops,
                told,
                skew,
            },
            report,
        )
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        unix_http(&self.socket, method, path, body)
    }

    fn policy(&self, path: &str) -> (u16, String) {
        http(
            TcpStream::connect(self.policy_addr).unwrap(),
            "GET",
            path,
            "",
        )
    }

    /// A policy request from `from` (a loopback address that is not the proxy).
    fn policy_from(&self, from: Ipv4Addr, path: &str) -> (u16, String) {
        let s = connect_from(from, self.policy_addr);
        http(s, "GET", path, "")
    }

    /// Stops serving; running jobs stay (as when the agent process exits).
    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            self.rt.block_on(task).unwrap().unwrap();
        }
    }
}

/// A TCP connection from the loopback address `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((from, 0))).unwrap();
        let c = s.connect(to).await.unwrap();
        let c = c.into_std().unwrap();
        c.set_nonblocking(false).unwrap();
        c
    })
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[test]
fn privileged_api_creates_lists_counts_serves_policy_and_deletes() {
    let scope = Scope::new("api");
    let (agent, report) = Running::start(common::agent_config(&scope, "10.254.10.0/24"));
    assert!(report.adopted.is_empty());
    let mode = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let token = "stub.acme.build-7.policy-1.3.192_0_2_7";
    let (status, job) = agent.call("POST", "/v1/jobs", token);
    assert_eq!(status, 201, "{job}");
    let key = job["job_key"].as_str().unwrap().to_owned();
    assert_eq!(key, common::job_key("policy-1").to_string());
    assert_eq!(job["job"], "build-7");
    assert_eq!(job["tenant"], "acme");
    assert_eq!(job["mtu"], 1444);
    assert_eq!(job["gateway_ip"], "10.254.10.1");
    assert_eq!(job["sandbox_ip"], "10.254.10.2");
    assert_eq!(job["dns_ip"], "10.254.10.1");
    assert_eq!(job["state"], "running");
    let netns_path = PathBuf::from(job["netns_path"].as_str().unwrap());
    assert!(is_netns_mount(&netns_path));
    let veth = job["veth"].as_str().unwrap().to_owned();
    assert!(Rtnl::open().unwrap().link_index(&veth).unwrap().is_some());
    assert!(agent
        .dataplane
        .attached()
        .contains_key(&common::job_key("policy-1")));

    // JSON body form; a second job gets the next subnet.
    let (status, job2) = agent.call(
        "POST",
        "/v1/jobs",
        r#"{"policy":"stub.acme.test-2.policy-2.1"}"#,
    );
    assert_eq!(status, 201, "{job2}");
    assert_eq!(job2["sandbox_ip"], "10.254.10.6");

    // Refusals.
    let (status, err) = agent.call("POST", "/v1/jobs", token);
    assert_eq!((status, err["error"].as_str()), (409, Some("job_exists")));
    let (status, err) = agent.call("POST", "/v1/jobs", "garbage");
    assert_eq!(
        (status, err["error"].as_str()),
        (422, Some("policy_invalid"))
    );
    let (status, err) = agent.call("POST", "/v1/jobs", "stub.expired.j.p-9.1");
    assert_eq!(
        (status, err["error"].as_str()),
        (422, Some("policy_expired"))
    );
    let (status, err) = agent.call("POST", "/v1/jobs", "stub.acme.j.p-10.1.198_51_100_9");
    assert_eq!(
        (status, err["error"].as_str()),
        (403, Some("node_mismatch"))
    );
    let (status, err) = agent.call("POST", "/v1/jobs", "");
    assert_eq!((status, err["error"].as_str()), (400, Some("bad_request")));

    // Listing and lookup by key and by name.
    let (status, list) = agent.call("GET", "/v1/jobs", "");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (status, by_name) = agent.call("GET", "/v1/jobs/build-7", "");
    assert_eq!(
        (status, by_name["job_key"].as_str()),
        (200, Some(key.as_str()))
    );
    let (status, _) = agent.call("GET", "/v1/jobs/nope", "");
    assert_eq!(status, 404);

    // Counters from the dataplane seam.
    let (status, c) = agent.call("GET", &format!("/v1/jobs/{key}/counters"), "");
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["total"], 0);
    assert_eq!(c["drops"]["destination_denied"], 0);

    // Policy endpoint: raw token for a known job (to the proxy), 404 otherwise, nothing else
    // served; any other caller gets 403 whatever it asks.
    let (status, body) = agent.policy(&format!("/v1/jobs/{key}/policy"));
    assert_eq!((status, body.as_str()), (200, token));
    let stranger = Ipv4Addr::new(127, 0, 0, 2);
    for path in [format!("/v1/jobs/{key}/policy"), "/v1/jobs".to_owned()] {
        let (status, body) = agent.policy_from(stranger, &path);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("\"forbidden\""), "{body}");
        assert!(!body.contains(token), "{body}");
    }
    let served = agent.ops.policy.outcomes();
    assert_eq!((served["served"], served["forbidden"]), (1, 2));
    let (status, _) = agent.policy("/v1/jobs/0000000000000001/policy");
    assert_eq!(status, 404);
    let (status, _) = agent.policy("/v1/jobs");
    assert_eq!(status, 404);
    let (status, body) = http(
        TcpStream::connect(agent.policy_addr).unwrap(),
        "DELETE",
        &format!("/v1/jobs/{key}/policy"),
        "",
    );
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");
    let (status, err) = agent.call("PUT", "/v1/jobs", "x");
    assert_eq!(
        (status, err["error"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Delete ends the job at once (namespace gone); the kernel destroys the veth pair with the
    // namespace shortly after.
    let (status, _) = agent.call("DELETE", &format!("/v1/jobs/{key}"), "");
    assert_eq!(status, 204);
    assert!(!netns_path.exists());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while Rtnl::open().unwrap().link_index(&veth).unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "host veth {veth} still exists 2 s after DELETE"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (status, _) = agent.policy(&format!("/v1/jobs/{key}/policy"));
    assert_eq!(status, 404);
    // The proxy has been told the job ended (after the answer, not before it).
    let ended = format!("POST /v1/jobs/{key}/ended HTTP/1.1");
    while !agent.told.lock().unwrap().contains(&ended) {
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(5),
            "no job-ended notice: {:?}",
            agent.told.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    while agent.ops.ended.outcomes()["ended"] != 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, _) = agent.call("DELETE", "/v1/jobs/test-2", "");
    assert_eq!(status, 204);
    agent.stop();
    assert!(scope.leftover_netns().is_empty());
}

#[test]
fn privileged_restarted_agent_adopts_jobs_without_touching_them() {
    let scope = Scope::new("restart");
    let cfg = common::agent_config(&scope, "10.254.11.0/24");
    let (first, _) = Running::start(cfg.clone());
    let (status, job) = first.call("POST", "/v1/jobs", "stub.acme.keep.policy-keep.1");
    assert_eq!(status, 201, "{job}");
    let key = job["job_key"].as_str().unwrap().to_owned();
    let veth = job["veth"].as_str().unwrap().to_owned();
    let ifindex_before = Rtnl::open().unwrap().link_index(&veth).unwrap();
    first.stop();

    // A namespace with the agent's prefix that no record names (crash mid-create).
    let orphan = scope
        .netns_dir
        .join(format!("{}deadbeef", scope.netns_prefix));
    std::fs::write(&orphan, b"").unwrap();

    let (second, report) = Running::start(cfg);
    assert_eq!(report.adopted, vec![key.clone()]);
    assert_eq!(
        report.orphans_removed,
        vec![format!("{}deadbeef", scope.netns_prefix)]
    );
    assert!(!orphan.exists());
    // Same interface (not recreated), job listed, policy still served, next job gets a new subnet.
    assert_eq!(
        Rtnl::open().unwrap().link_index(&veth).unwrap(),
        ifindex_before
    );
    let (status, again) = second.call("GET", &format!("/v1/jobs/{key}"), "");
    assert_eq!((status, &again["sandbox_ip"]), (200, &job["sandbox_ip"]));
    let (status, _) = second.policy(&format!("/v1/jobs/{key}/policy"));
    assert_eq!(status, 200);
    let (status, other) = second.call("POST", "/v1/jobs", "stub.acme.new.policy-new.1");
    assert_eq!(status, 201);
    assert_ne!(other["sandbox_ip"], job["sandbox_ip"]);
    assert!(second.dataplane.attached().len() == 2);

    for id in [key.as_str(), "new"] {
        let (status, _) = second.call("DELETE", &format!("/v1/jobs/{id}"), "");
        assert_eq!(status, 204);
    }
    second.stop();
    assert!(scope.leftover_netns().is_empty());
}

#[test]
fn privileged_start_cleans_up_a_job_whose_network_is_partly_gone() {
    let scope = Scope::new("partial");
    let cfg = common::agent_config(&scope, "10.254.12.0/24");
    let (first, _) = Running::start(cfg.clone());
    let (status, job) = first.call("POST", "/v1/jobs", "stub.acme.half.policy-half.1");
    assert_eq!(status, 201);
    first.stop();
    // Someone deleted the host veth while the agent was down.
    let veth = job["veth"].as_str().unwrap();
    assert!(Rtnl::open().unwrap().delete_link(veth).unwrap());

    let (second, report) = Running::start(cfg);
    assert_eq!(
        report.cleaned,
        vec![job["job_key"].as_str().unwrap().to_owned()]
    );
    assert!(report.adopted.is_empty());
    let (status, list) = second.call("GET", "/v1/jobs", "");
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(0)));
    assert!(scope.leftover_netns().is_empty());
    second.stop();
}

#[test]
fn privileged_concurrent_creates_get_distinct_subnets_and_exhaustion_is_503() {
    let scope = Scope::new("conc");
    // A /28 holds four /30 job subnets.
    let (agent, _) = Running::start(common::agent_config(&scope, "10.254.13.0/28"));
    let socket = agent.socket.clone();
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                unix_http(
                    &socket,
                    "POST",
                    "/v1/jobs",
                    &format!("stub.acme.c{i}.pc-{i}.1"),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created: Vec<_> = results.iter().filter(|(s, _)| *s == 201).collect();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert_eq!((created.len(), refused.len()), (4, 1), "{results:?}");
    assert_eq!(refused[0].1["error"], "pool_exhausted");
    let mut ips: Vec<_> = created
        .iter()
        .map(|(_, v)| v["sandbox_ip"].to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4);
    for (_, v) in created {
        let (status, _) = agent.call(
            "DELETE",
            &format!("/v1/jobs/{}", v["job_key"].as_str().unwrap()),
            "",
        );
        assert_eq!(status, 204);
    }
    agent.stop();
    assert!(scope.leftover_netns().is_empty());
}

#[test]
fn privileged_a_job_past_its_exp_is_listed_expired_and_noticed_once() {
    let scope = Scope::new("exp");
    let (agent, _) = Running::start(common::agent_config(&scope, "10.254.14.0/24"));
    let (status, job) = agent.call("POST", "/v1/jobs", "stub.acme.short.policy-exp.1");
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["state"], "running");
    assert!(agent.ops.agent.newly_expired().is_empty());
    // The stub verifier's policies expire 600 s after creation.
    *agent.skew.lock().unwrap() = Duration::from_secs(601);
    let (status, v) = agent.call("GET", "/v1/jobs/short", "");
    assert_eq!((status, v["state"].as_str()), (200, Some("expired")));
    let noticed = agent.ops.agent.newly_expired();
    assert_eq!(noticed.len(), 1);
    assert_eq!(noticed[0].job, "short");
    assert!(agent.ops.agent.newly_expired().is_empty(), "noticed once");
    // Still listed and deletable.
    let (status, _) = agent.call("DELETE", "/v1/jobs/short", "");
    assert_eq!(status, 204);
    agent.stop();
    assert!(scope.leftover_netns().is_empty());
}

#[test]
fn privileged_the_typed_client_reads_every_endpoint_of_a_running_agent() {
    use snas_agent::api::{blocking::AgentClient, JobState};
    let scope = Scope::new("client");
    let (agent, _) = Running::start(common::agent_config(&scope, "10.254.15.0/24"));
    let c = AgentClient::new(&agent.socket);
    let token = "stub.acme.typed-1.policy-typed.2.192_0_2_7";
    let job = c.create_job(token).unwrap();
    assert_eq!(job.job_key, common::job_key("policy-typed"));
    assert_eq!(
        (job.job.as_str(), job.serial, job.state),
        ("typed-1", snas_wire::PolicySerial(2), JobState::Running)
    );
    assert_eq!(job.resolver(), job.gateway_ip);
    assert!(is_netns_mount(&job.netns_path));
    // The same view by key, by name and in the list.
    assert_eq!(c.job(&job.job_key.to_string()).unwrap(), job);
    assert_eq!(c.job("typed-1").unwrap(), job);
    assert_eq!(c.list_jobs().unwrap(), vec![job.clone()]);
    let drops = c.counters("typed-1").unwrap();
    assert_eq!((drops.job_key, drops.total), (job.job_key, 0));
    assert!(drops.drops.contains_key("destination_denied"), "{drops:?}");
    let proxies = c.proxies().unwrap();
    assert_eq!(proxies.len(), 1);
    assert_eq!(proxies[0].ip, Ipv4Addr::LOCALHOST);
    assert_eq!(c.dns().unwrap().queries, 0);
    assert!(c.metrics().unwrap().contains("snas_agent_jobs 1\n"));
    // Refusals keep the agent's code.
    let e = c.create_job(token).unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), Some("job_exists")));
    let e = c.create_job("garbage").unwrap_err();
    assert_eq!(e.code(), Some("policy_invalid"), "{e}");
    c.delete_job("typed-1").unwrap();
    let e = c.delete_job(&job.job_key.to_string()).unwrap_err();
    assert!(e.is_job_not_found(), "{e}");
    assert!(c.list_jobs().unwrap().is_empty());
    agent.stop();
    assert!(scope.leftover_netns().is_empty());
}
