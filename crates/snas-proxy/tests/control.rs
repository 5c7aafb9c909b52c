//! The proxy's two HTTP endpoints over real listeners: every route answers on its own endpoint
//! and 404 on the other, drain/undrain need the control token (401 without or with another,
//! 403 when none is configured), and a bad token file stops start-up naming the field.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Keys;
use snas_proxy::config::ProxyConfig;
use snas_proxy::control::secret_eq;
use snas_proxy::daemon::{Daemon, DaemonError};

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
