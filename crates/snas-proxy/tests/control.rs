//! The proxy's two HTTP endpoints over real listeners: every route answers on its own endpoint
//! and 404 on the other, drain/undrain need the control token (401 without or with another,
//! 403 when none is configured), and a bad token file stops start-up naming the field.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Keys;
use snas_proxy::api::blocking::ProxyClient;
use snas_proxy::api::server::secret_eq;
use snas_proxy::api::{DropCounts, ProxyHealth};
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::{Daemon, DaemonError};
use snas_wire::Reason;

const TOKEN: &str = "0123456789abcdef-control";
const PEER_SECRET: &str = "fedcba9876543210-peer";

fn config(keys: &Keys, extra: &str) -> ProxyConfig {
    let d = keys.dir.path();
    let text = format!(
        r#"
name = "proxy-ctl"
underlay_addr = "127.0.0.1"
nodes = ["127.0.0.1"]
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "unused0"
resolver_listen = "127.0.0.1:0"
upstream_dns = ["127.0.0.1:9"]
control_listen = "127.0.0.1:0"
service_listen = "127.0.0.1:0"
audit_log = "{audit}"
state_dir = "{state}"
{extra}
"#,
        trust = keys.trust().display(),
        audit = d.join("audit.jsonl").display(),
        state = d.join("state").display(),
    );
    ProxyConfig::parse(&text, std::path::Path::new("proxy.toml")).unwrap()
}

/// A daemon with a control token and a peer secret.
fn daemon(keys: &Keys) -> Daemon {
    let d = keys.dir.path();
    std::fs::write(d.join("control.token"), format!("  {TOKEN}\n")).unwrap();
    std::fs::write(d.join("peer.secret"), PEER_SECRET).unwrap();
    let extra = format!(
        "control_token_file = \"{}\"\npeer_secret_file = \"{}\"",
        d.join("control.token").display(),
        d.join("peer.secret").display()
    );
    Daemon::start_control_plane(config(keys, &extra)).unwrap()
}

/// One request; returns the status, the headers and the body.
fn call(to: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_owned(),
    )
}

fn status(to: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> u16 {
    call(to, method, path, auth).0
}

#[test]
fn every_route_answers_on_its_own_endpoint_only() {
    let keys = Keys::new();
    let d = daemon(&keys);
    let (ctl, svc) = (d.control_addr(), d.service_addr());
    assert_ne!(ctl, svc);
    let bearer = format!("Bearer {TOKEN}");
    let auth = Some(bearer.as_str());

    // Management.
    assert_eq!(call(ctl, "GET", "/healthz", None).2, "ok\n");
    let (code, _, metrics) = call(ctl, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(metrics.contains("snas_proxy_flows 0"), "{metrics}");
    let (code, _, flows) = call(ctl, "GET", "/v1/flows", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&flows).unwrap();
    assert_eq!(v["flows"], serde_json::json!([]));
    assert_eq!(status(ctl, "POST", "/v1/drain", auth), 503);
    assert_eq!(status(ctl, "POST", "/v1/undrain", auth), 200);
    assert_eq!(status(ctl, "POST", "/v1/bindings", Some("Bearer x")), 404);

    // Service.
    assert_eq!(call(svc, "GET", "/healthz", None).2, "ok\n");
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/v1/flows"),
        ("POST", "/v1/drain"),
        ("POST", "/v1/undrain"),
    ] {
        assert_eq!(status(svc, method, path, auth), 404, "{method} {path}");
    }
    // The peer route exists there (a bad secret is 401, not 404).
    assert_eq!(status(svc, "POST", "/v1/bindings", Some("Bearer x")), 401);
    assert!(
        !d.shared()
            .draining
            .load(std::sync::atomic::Ordering::SeqCst),
        "the service endpoint drained nothing"
    );
}

#[test]
fn drain_and_undrain_need_the_control_token() {
    let keys = Keys::new();
    let d = daemon(&keys);
    let (ctl, svc) = (d.control_addr(), d.service_addr());
    let wrong_same_length = format!("Bearer {}", "x".repeat(TOKEN.len()));
    for auth in [
        None,
        Some("Bearer "),
        Some("Bearer 0123456789abcdef"),
        Some(wrong_same_length.as_str()),
        Some("Basic MDEyMzQ1Njc4OWFiY2RlZi1jb250cm9s"),
        Some(TOKEN),
    ] {
        for path in ["/v1/drain", "/v1/undrain"] {
            let (code, head, _) = call(ctl, "POST", path, auth);
            assert_eq!(code, 401, "{auth:?} {path}");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
        }
    }
    assert_eq!(status(svc, "GET", "/healthz", None), 200, "nothing drained");

    let bearer = format!("Bearer {TOKEN}");
    let (code, _, body) = call(ctl, "POST", "/v1/drain", Some(&bearer));
    assert_eq!((code, body.as_str()), (503, "draining\n"));
    // Agents see it on the service endpoint.
    assert_eq!(call(svc, "GET", "/healthz", None).2, "draining\n");
    assert_eq!(status(svc, "GET", "/healthz", None), 503);
    assert_eq!(status(ctl, "POST", "/v1/undrain", Some(&bearer)), 200);
    assert_eq!(status(svc, "GET", "/healthz", None), 200);
}

#[test]
fn without_a_control_token_drain_is_forbidden_and_the_answer_names_the_field() {
    let keys = Keys::new();
    let d = Daemon::start_control_plane(config(&keys, "")).unwrap();
    for path in ["/v1/drain", "/v1/undrain"] {
        let (code, _, body) = call(
            d.control_addr(),
            "POST",
            path,
            Some("Bearer anything-at-all"),
        );
        assert_eq!(code, 403, "{path}");
        assert!(body.contains("control_token_file"), "{body}");
    }
    assert_eq!(status(d.control_addr(), "GET", "/healthz", None), 200);
}

#[test]
fn a_short_or_missing_control_token_file_stops_start_up_naming_the_field() {
    let keys = Keys::new();
    let short = keys.dir.path().join("short.token");
    std::fs::write(&short, "too-short\n").unwrap();
    for file in [short, keys.dir.path().join("absent.token")] {
        let extra = format!("control_token_file = \"{}\"", file.display());
        let err = Daemon::start_control_plane(config(&keys, &extra)).unwrap_err();
        assert!(
            matches!(
                &err,
                DaemonError::Secret {
                    field: "control_token_file",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn secrets_compare_equal_only_when_identical() {
    assert!(secret_eq(b"0123456789abcdef", b"0123456789abcdef"));
    assert!(!secret_eq(b"0123456789abcdef", b"0123456789abcdeF"));
    assert!(!secret_eq(b"0123456789abcdef", b"0123456789abcde"));
    assert!(!secret_eq(b"0123456789abcde", b"0123456789abcdef"));
    assert!(!secret_eq(b"", b"x"));
    assert!(secret_eq(b"", b""));
}

mod job_ended {
    use super::*;
    use common::{open_udp_flow, post_from};
    use std::net::Ipv4Addr;
    use std::time::{Instant, SystemTime};

    use snas_policy::identity::{job_key, tenant_id};
    use snas_proxy::tier2::JobPolicy;
    use snas_wire::geneve::SnasOption;

    const JTI: &str = "jti-ended-0000001";
    const NODE: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
    const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const POLICY: &str = r#"
tenant = "acme"
job = "ended"
node = "127.0.0.1"
[[egress]]
cidr = "203.0.113.10/32"
ports = "7"
protocol = "udp"
"#;

    fn option() -> SnasOption {
        SnasOption {
            tenant_id: tenant_id("acme"),
            job_key: job_key(JTI),
            policy_serial: snas_wire::PolicySerial(1),
        }
    }

    /// Opens `n` UDP flows of the job in the engine, as datagrams from NODE would.
    fn open_flows(d: &Daemon, n: u16) {
        for i in 0..n {
            open_udp_flow(d, &option(), NODE, 5000 + i, Ipv4Addr::new(203, 0, 113, 10));
        }
    }

    fn audit_lines(path: &std::path::Path, want: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn only_the_jobs_own_node_ends_it_and_its_flows_and_ports_are_freed() {
        let keys = Keys::new();
        let mut cfg = config(&keys, "");
        cfg.nodes = vec![NODE, OTHER_NODE];
        let audit = cfg.audit_log.clone();
        let d = Daemon::start_control_plane(cfg).unwrap();
        let bundle = snas_policy::bundle_fs::load_trust_bundle(&keys.trust()).unwrap();
        let token = keys.token(POLICY, JTI, 1);
        let v = snas_policy::jws::verify(&token, &bundle, SystemTime::now()).unwrap();
        d.shared().store.insert(JobPolicy::from_verified(&v, &[]));
        open_flows(&d, 3);
        let job = job_key(JTI);
        assert_eq!(d.shared().engine().conntrack().live_flows_of_job(job), 3);

        let svc = d.service_addr();
        let path = snas_proxy::api::paths::job_ended(job);
        assert_eq!(post_from(STRANGER, svc, &path).0, 403, "not a node");
        let (code, body) = post_from(OTHER_NODE, svc, &path);
        assert_eq!((code, body.as_str()), (403, "not the job's node\n"));
        assert_eq!(
            post_from(NODE, svc, "/v1/jobs/00000000000000ff/ended").0,
            404,
            "unknown job"
        );
        assert_eq!(post_from(NODE, svc, "/v1/jobs/nothex/ended").0, 400);
        assert_eq!(
            post_from(NODE, d.control_addr(), &path).0,
            404,
            "not on the management endpoint"
        );
        assert_eq!(d.shared().engine().conntrack().live_flows_of_job(job), 3);

        assert_eq!(post_from(NODE, svc, &path).0, 204);
        // Carried out by the engine's next housekeeping tick.
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.shared().engine().conntrack().live_flows_of_job(job) > 0 {
            assert!(Instant::now() < deadline, "the flows were never removed");
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            let eng = d.shared().engine();
            let usage = eng.conntrack().nat().job_usage(job);
            assert_eq!((usage.live, usage.held), (0, 3), "ports quarantined");
            assert!(!eng.knows_job(job));
        }
        assert!(d.shared().store.snapshot().get(job).is_none());
        assert_eq!(post_from(NODE, svc, &path).0, 404, "ended: nothing left");

        let lines = audit_lines(&audit, 4);
        let ends: Vec<_> = lines.iter().filter(|l| l["kind"] == "flow_end").collect();
        assert_eq!(ends.len(), 3, "{lines:?}");
        assert!(ends
            .iter()
            .all(|l| l["end"] == "job_ended" && l["packets_out"] == 1 && l["bytes_out"] == 29));
        let job_line: Vec<_> = lines.iter().filter(|l| l["kind"] == "job").collect();
        assert_eq!(job_line.len(), 1, "{lines:?}");
        assert_eq!(job_line[0]["reason"], "job_ended");
        assert_eq!(job_line[0]["job"], "ended");
        assert_eq!(job_line[0]["flows"], 3);
        assert!(job_line[0].get("proto").is_none());
    }

    #[test]
    fn flows_list_bytes_packets_and_age() {
        let keys = Keys::new();
        let d = Daemon::start_control_plane(config(&keys, "")).unwrap();
        let bundle = snas_policy::bundle_fs::load_trust_bundle(&keys.trust()).unwrap();
        let token = keys.token(POLICY, JTI, 1);
        let v = snas_policy::jws::verify(&token, &bundle, SystemTime::now()).unwrap();
        d.shared().store.insert(JobPolicy::from_verified(&v, &[]));
        open_flows(&d, 1);
        std::thread::sleep(Duration::from_millis(30));
        let list = ProxyClient::new(d.control_addr()).flows().unwrap();
        let f = &list.flows[0];
        assert_eq!(
            (f.packets_out, f.bytes_out, f.packets_in, f.bytes_in),
            (1, 29, 0, 0)
        );
        assert!(f.age() >= Duration::from_millis(30), "{f:?}");
        assert!(f.idle() >= Duration::from_millis(30), "{f:?}");
        assert_eq!(f.job.as_deref(), Some("ended"));
        assert_eq!(f.tenant.as_deref(), Some("acme"));
        assert_eq!(f.job_key, job_key(JTI));
        assert_eq!((f.proto.as_str(), f.dst.port()), ("udp", 7));
    }

    #[test]
    fn the_typed_client_names_the_refusals_of_job_ended_notices() {
        let keys = Keys::new();
        let d = Daemon::start_control_plane(config(&keys, "")).unwrap();
        let svc = ProxyClient::new(d.service_addr());
        let e = svc.job_ended(snas_wire::JobKey(0xff)).unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert!(e.to_string().contains("unknown job"), "{e}");
        let e = ProxyClient::new(d.control_addr())
            .job_ended(snas_wire::JobKey(0xff))
            .unwrap_err();
        assert_eq!(e.status(), Some(404), "not on the management endpoint: {e}");
    }
}

#[test]
fn the_typed_client_reads_health_flows_drops_and_metrics_and_drains_with_the_token() {
    let keys = Keys::new();
    let d = daemon(&keys);
    let ctl = ProxyClient::new(d.control_addr());
    assert_eq!(ctl.health().unwrap(), ProxyHealth::Ok);
    assert!(ctl.flows().unwrap().flows.is_empty());
    assert_eq!(ctl.drops().unwrap(), DropCounts::default());
    assert!(ctl.metrics().unwrap().contains("snas_proxy_flows 0"));

    let e = ctl.drain().unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let e = ctl
        .clone()
        .with_token("x".repeat(TOKEN.len()))
        .drain()
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let ctl = ctl.with_token(TOKEN);
    assert_eq!(ctl.drain().unwrap(), ProxyHealth::Draining);
    let svc = ProxyClient::new(d.service_addr());
    assert_eq!(svc.health().unwrap(), ProxyHealth::Draining);
    assert_eq!(ctl.undrain().unwrap(), ProxyHealth::Ok);
    assert_eq!(svc.health().unwrap(), ProxyHealth::Ok);
    // The service endpoint has no management routes.
    assert_eq!(svc.flows().unwrap_err().status(), Some(404));
    assert_eq!(svc.drops().unwrap_err().status(), Some(404));
}

#[test]
fn drops_are_listed_per_reason_as_json_and_as_metrics_alike() {
    let keys = Keys::new();
    let d = daemon(&keys);
    {
        let mut eng = d.shared().engine();
        for _ in 0..3 {
            eng.count_drop(Reason::PortDenied);
        }
        eng.count_drop(Reason::UntrustedSource);
    }
    let ctl = ProxyClient::new(d.control_addr());
    let drops = ctl.drops().unwrap();
    assert_eq!(drops.total, 4);
    assert_eq!(
        drops.drops,
        std::collections::BTreeMap::from([
            ("port_denied".to_owned(), 3),
            ("untrusted_source".to_owned(), 1)
        ])
    );
    // Counted without a verified job: all under tenant `unknown`.
    assert_eq!(
        drops.tenants.keys().collect::<Vec<_>>(),
        [&snas_proxy::api::DropTenant::Unknown]
    );
    assert_eq!(
        drops.tenants[&snas_proxy::api::DropTenant::Unknown].drops,
        drops.drops
    );
    let text = ctl.metrics().unwrap();
    assert!(
        text.contains("snas_proxy_drops_total{tenant=\"unknown\",reason=\"port_denied\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("snas_proxy_drops_total{tenant=\"unknown\",reason=\"untrusted_source\"} 1"),
        "{text}"
    );
    assert!(!text.contains("reason=\"destination_denied\""), "{text}");
}
