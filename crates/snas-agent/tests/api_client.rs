//! The typed API client against a stand-in agent on a Unix socket (no root): bodies it reads
//! and sends, chunked answers, refusals with and without the agent's error body, malformed
//! answers, deadlines, escaped job names, a loop of thousands of calls without leaking
//! connections, and calls from inside a tokio runtime.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use snas_agent::api::{
    blocking, paths, AgentClient, ClientError, CreateJob, ErrorBody, JobDrops, JobState, JobView,
};

fn view(name: &str, key: snas_wire::JobKey) -> JobView {
    JobView {
        job: name.into(),
        tenant: "acme".into(),
        job_key: key,
        tenant_id: snas_wire::TenantId(7),
        jti: format!("jti-{name}"),
        serial: snas_wire::PolicySerial(1),
        expires_at: 1_795_000_000,
        state: JobState::Running,
        netns: format!("snt-{key}"),
        netns_path: PathBuf::from(format!("/run/netns/snt-{key}")),
        sandbox_ip: IpAddr::from([192, 0, 2, 2]),
        gateway_ip: IpAddr::from([192, 0, 2, 1]),
        dns_ip: IpAddr::from([192, 0, 2, 1]),
        prefix_len: 30,
        veth: format!("snt{key}"),
        sandbox_ifname: "eth0".into(),
        mtu: 1444,
        sandbox_ip6: None,
        gateway_ip6: None,
    }
}

/// A stand-in agent serving `router` on a socket in a temporary directory, on its own thread.
struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn serve(router: Router) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                axum::serve(l, router)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        FakeAgent {
            _dir: dir,
            socket,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn client(&self) -> blocking::AgentClient {
        blocking::AgentClient::new(&self.socket)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refuse(status: StatusCode, code: &str, detail: &str) -> (StatusCode, Json<ErrorBody>) {
    (
        status,
        Json(ErrorBody {
            error: code.into(),
            detail: detail.into(),
        }),
    )
}

/// The job API of a stand-in agent keeping jobs in memory, keyed by name.
fn job_api(jobs: Arc<Mutex<BTreeMap<String, JobView>>>) -> Router {
    let (j1, j2, j3, j4) = (jobs.clone(), jobs.clone(), jobs.clone(), jobs);
    Router::new()
        .route(
            paths::JOBS,
            get(move || async move { Json(j1.lock().unwrap().values().cloned().collect::<Vec<_>>()) })
                .post(move |Json(c): Json<CreateJob>| async move {
                    // The stand-in's "token" is the job name.
                    let v = view(&c.policy, snas_wire::JobKey(c.policy.len() as u64));
                    j2.lock().unwrap().insert(c.policy, v.clone());
                    (StatusCode::CREATED, Json(v))
                }),
        )
        .route(
            paths::JOB_ROUTE,
            get(move |UrlPath(id): UrlPath<String>| async move {
                match j3.lock().unwrap().get(&id) {
                    Some(v) => Ok(Json(v.clone())),
                    None => Err(refuse(StatusCode::NOT_FOUND, "job_not_found", &format!("no job {id}"))),
                }
            })
            .delete(move |UrlPath(id): UrlPath<String>| async move {
                match j4.lock().unwrap().remove(&id) {
                    Some(_) => Ok(StatusCode::NO_CONTENT),
                    None => Err(refuse(StatusCode::NOT_FOUND, "job_not_found", &format!("no job {id}"))),
                }
            }),
        )
        .route(
            paths::JOB_COUNTERS_ROUTE,
            get(|UrlPath(id): UrlPath<String>| async move {
                Json(JobDrops {
                    // The fake's key of a job is its name's length (as in its create route).
                    job_key: snas_wire::JobKey(id.len() as u64),
                    total: 3,
                    drops: BTreeMap::from([("destination_denied".into(), 3), ("a_reason_from_a_newer_agent".into(), 0)]),
                })
            }),
        )
}

#[test]
fn a_job_is_created_listed_found_by_an_escaped_name_counted_and_deleted() {
    let agent = FakeAgent::serve(job_api(Arc::default()));
    let c = agent.client();
    // A job name may hold any character; the path escapes it and the server reads it back.
    let name = "build 7/α?#";
    let created = c.create_job(&format!("  {name}\n")).unwrap();
    assert_eq!(created.job, name, "the token is sent trimmed");
    assert_eq!(created.resolver(), IpAddr::from([192, 0, 2, 1]));
    assert_eq!(c.list_jobs().unwrap(), vec![created.clone()]);
    assert_eq!(c.job(name).unwrap(), created);
    let drops = c.counters(name).unwrap();
    assert_eq!(drops.job_key, snas_wire::JobKey(name.len() as u64));
    assert_eq!(drops.drops["destination_denied"], 3);
    assert_eq!(drops.drops["a_reason_from_a_newer_agent"], 0);
    c.delete_job(name).unwrap();
    let again = c.delete_job(name).unwrap_err();
    assert!(again.is_job_not_found(), "{again}");
    assert_eq!(again.status(), Some(404));
    assert!(again.to_string().contains("no job build 7/α?#"), "{again}");
    assert!(c.list_jobs().unwrap().is_empty());
}

#[test]
fn a_chunked_answer_is_read_whole() {
    let agent = FakeAgent::serve(Router::new().route(
        paths::JOBS,
        get(|| async {
            // 300 jobs as a stream of small chunks (no Content-Length).
            let list: Vec<JobView> = (0..300)
                .map(|i| view(&format!("j{i}"), snas_wire::JobKey(i as u64)))
                .collect();
            let text = serde_json::to_vec(&list).unwrap();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                text.chunks(97).map(|c| Ok(c.to_vec())).collect();
            Body::from_stream(futures_stream(chunks))
        }),
    ));
    let jobs = agent.client().list_jobs().unwrap();
    assert_eq!(jobs.len(), 300);
    assert_eq!(jobs[299].job, "j299");
}

/// A stream over ready items (axum's `Body::from_stream` wants a `Stream`).
fn futures_stream(
    items: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    struct Iter(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[test]
fn refusals_carry_the_agents_code_or_the_raw_body() {
    let agent = FakeAgent::serve(
        Router::new()
            .route(
                paths::JOBS,
                get(|| async { (StatusCode::BAD_GATEWAY, "upstream went away\n") }).post(
                    || async {
                        refuse(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "policy_invalid",
                            "exp: expired",
                        )
                    },
                ),
            )
            .route(paths::DNS, get(|| async { "{\"queries\": \"many\"}" })),
    );
    let c = agent.client();
    let e = c.create_job("a.b.c").unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(422), Some("policy_invalid")));
    assert!(
        e.to_string()
            .contains("POST /v1/jobs: HTTP 422: policy_invalid: exp: expired"),
        "{e}"
    );
    let e = c.list_jobs().unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(502), Some("http_502")));
    assert!(e.to_string().contains("upstream went away"), "{e}");
    let e = c.dns().unwrap_err();
    assert!(
        matches!(&e, ClientError::Malformed { path, .. } if path == "/v1/dns"),
        "{e}"
    );
    let e = c.proxies().unwrap_err();
    assert_eq!(e.code(), Some("http_404"), "{e}");
}

#[test]
fn an_agent_that_does_not_answer_is_given_up_at_the_deadline() {
    let agent = FakeAgent::serve(Router::new().route(
        paths::METRICS,
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    ));
    let e = agent
        .client()
        .with_timeout(Duration::from_millis(200))
        .metrics()
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Timeout { path, after, .. } if path == "/metrics" && *after == Duration::from_millis(200)),
        "{e}"
    );
}

#[test]
fn a_missing_socket_is_named() {
    let c = blocking::AgentClient::new("/nonexistent/snas/agent.sock");
    let e = c.list_jobs().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(
        e.to_string().contains("/nonexistent/snas/agent.sock"),
        "{e}"
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn thousands_of_calls_leave_no_connection_open() {
    let jobs = Arc::new(Mutex::new(BTreeMap::new()));
    let agent = FakeAgent::serve(job_api(jobs));
    let c = agent.client();
    c.create_job("loop").unwrap();
    let before = open_fds();
    for i in 0..3_000 {
        let v = c.job("loop").unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(v.job, "loop");
    }
    // The server side may still be closing its last connections; ours are closed.
    let after = open_fds();
    assert!(after <= before + 8, "fds before {before}, after {after}");
}

#[test]
fn the_blocking_client_works_inside_a_tokio_runtime() {
    let agent = FakeAgent::serve(job_api(Arc::default()));
    let c = agent.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt.block_on(async { c.create_job("inside").unwrap() });
    assert_eq!(created.job, "inside");
    // And the async client from the same runtime.
    let a = AgentClient::new(agent.socket.as_path());
    let listed = rt.block_on(a.list_jobs()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(a.socket(), Path::new(&agent.socket));
}
