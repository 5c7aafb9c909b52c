//! The proxy's typed client against stand-ins that answer the way a real endpoint may (chunked
//! bodies, late answers, oversized answers, text where JSON is due, statuses the call does not
//! expect): every case is an answer or an error naming the address, request and cause — never
//! a hang or a panic. The client against a real proxy is in `tests/control.rs`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use snas_proxy::api::blocking::ProxyClient;
use snas_proxy::api::client::{exchange, Call, Method};
use snas_proxy::api::{ClientError, ProxyHealth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stand-in endpoint: answers every request with `answer` (after `delay`), on a thread of
/// its own; serves until the test process ends.
fn stand_in(answer: Vec<u8>, delay: Duration) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(&answer).await;
                    let _ = s.shutdown().await;
                });
            }
        });
    });
    addr
}

fn answer(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n{body}").into_bytes()
}

#[test]
fn a_chunked_flow_list_is_read_whole() {
    let body = r#"{"flows":[{"job_key":"00000000000000aa","tenant_id":1,"proto":"tcp","src":"10.255.1.2:40000","dst":"203.0.113.10:80","hostnames":[],"egress":"198.51.100.64:2000","state":"tcp_established","idle_ms":5,"age_ms":1500,"bytes_out":1,"bytes_in":2,"packets_out":1,"packets_in":1}]}"#;
    let (a, b) = body.split_at(40);
    let chunked = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
    let addr = stand_in(
        answer("200 OK", "Transfer-Encoding: chunked\r\n", &chunked),
        Duration::ZERO,
    );
    let flows = ProxyClient::new(addr).flows().unwrap().flows;
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].age(), Duration::from_millis(1500));
    assert_eq!(flows[0].tenant, None);
}

#[test]
fn a_late_answer_is_a_timeout_naming_the_request() {
    let addr = stand_in(answer("200 OK", "", "ok\n"), Duration::from_secs(5));
    let began = Instant::now();
    let e = ProxyClient::new(addr)
        .with_timeout(Duration::from_millis(200))
        .health()
        .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(4), "gave up in time");
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("/healthz"),
        "{text}"
    );
}

#[test]
fn an_answer_over_the_bound_is_refused() {
    let big = "x".repeat(4096);
    let addr = stand_in(
        answer(
            "200 OK",
            &format!("Content-Length: {}\r\n", big.len()),
            &big,
        ),
        Duration::ZERO,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let call = |max| Call {
        max_answer: max,
        ..Call::new(Method::GET, "/v1/jobs/00000000000000aa/policy")
    };
    let e = rt.block_on(exchange(addr, call(1024))).unwrap_err();
    assert!(matches!(e, ClientError::Exchange { .. }), "{e}");
    let a = rt.block_on(exchange(addr, call(8192))).unwrap();
    assert_eq!((a.status, a.body.len()), (200, 4096));
}

#[test]
fn text_where_json_is_due_is_malformed_not_a_panic() {
    let addr = stand_in(
        answer("200 OK", "Content-Length: 8\r\n", "not json"),
        Duration::ZERO,
    );
    let e = ProxyClient::new(addr).drops().unwrap_err();
    assert!(matches!(e, ClientError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("/v1/drops"), "{e}");
}

#[test]
fn unexpected_statuses_are_refusals_with_the_body() {
    let addr = stand_in(
        answer(
            "500 Internal Server Error",
            "Content-Length: 5\r\n",
            "oops\n",
        ),
        Duration::ZERO,
    );
    let c = ProxyClient::new(addr);
    for e in [
        c.health().unwrap_err(),
        c.job_ended(snas_wire::JobKey(7)).unwrap_err(),
    ] {
        assert_eq!(e.status(), Some(500), "{e}");
        assert!(e.to_string().ends_with("HTTP 500: oops"), "{e}");
    }
    let draining = stand_in(
        answer(
            "503 Service Unavailable",
            "Content-Length: 9\r\n",
            "draining\n",
        ),
        Duration::ZERO,
    );
    assert_eq!(
        ProxyClient::new(draining).health().unwrap(),
        ProxyHealth::Draining
    );
}

#[test]
fn nobody_listening_is_a_connect_error_naming_the_address() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = ProxyClient::new(addr).health().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

#[test]
fn the_blocking_client_works_from_inside_a_runtime() {
    let addr = stand_in(
        answer("200 OK", "Content-Length: 3\r\n", "ok\n"),
        Duration::ZERO,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(async move { ProxyClient::new(addr).health() });
    assert_eq!(h.unwrap(), ProxyHealth::Ok);
}
