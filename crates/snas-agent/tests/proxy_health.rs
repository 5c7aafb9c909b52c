//! The proxy health checker against tiny HTTP control endpoints on loopback addresses that
//! answer 200, answer 503 (draining) or go away; tier 1 is a recording dataplane that keeps
//! every proxy set pushed to it.
#![allow(clippy::unwrap_used)]

mod common;

use common::service_dns;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snas_agent::proxies::{self, Health, Proxies};
use snas_agent::RecordingDataplane;
use snas_bpf::ProxyEntry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const OK: u8 = 0;
const DRAINING: u8 = 1;
const GONE: u8 = 2;

/// A control endpoint on `ip:port` whose answer follows `mode` (GONE closes the listener).
async fn control(ip: Ipv4Addr, port: u16, mode: Arc<AtomicU8>) -> u16 {
    let l = TcpListener::bind((ip, port)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut listener = Some(l);
        loop {
            if mode.load(Ordering::SeqCst) == GONE {
                listener = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let l = match &listener {
                Some(l) => l,
                None => {
                    listener = Some(TcpListener::bind((ip, port)).await.unwrap());
                    continue;
                }
            };
            let Ok(Ok((mut c, _))) =
                tokio::time::timeout(Duration::from_millis(20), l.accept()).await
            else {
                continue;
            };
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf).await;
            let body: &[u8] = if mode.load(Ordering::SeqCst) == DRAINING {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\ndraining"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            let _ = c.write_all(body).await;
        }
    });
    port
}

async fn wait_for(
    dp: &RecordingDataplane,
    what: &str,
    pred: impl Fn(&[ProxyEntry]) -> bool,
) -> Vec<ProxyEntry> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(last) = dp.proxy_sets().last() {
            if pred(last) {
                return last.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "never saw: {what}: {:?}",
            dp.proxy_sets()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dead_and_draining_proxies_are_pushed_to_tier1_in_stable_positions() {
    let ips = [
        Ipv4Addr::new(127, 0, 0, 21),
        Ipv4Addr::new(127, 0, 0, 22),
        Ipv4Addr::new(127, 0, 0, 23),
    ];
    let modes: Vec<Arc<AtomicU8>> = (0..3).map(|_| Arc::new(AtomicU8::new(OK))).collect();
    let port = control(ips[0], 0, modes[0].clone()).await;
    control(ips[1], port, modes[1].clone()).await;
    control(ips[2], port, modes[2].clone()).await;

    let table = Arc::new(Proxies::new(&ips, port, 5353));
    let dp = Arc::new(RecordingDataplane::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(proxies::run_health_checks(
        table.clone(),
        dp.clone(),
        Duration::from_millis(50),
        Duration::from_millis(200),
        rx,
    ));

    // Proxy 2 goes away: after two failed probes it is dead, in place.
    modes[1].store(GONE, Ordering::SeqCst);
    let e = wait_for(&dp, "proxy 2 dead", |e| !e[1].alive).await;
    assert_eq!(e.iter().map(|p| p.ip).collect::<Vec<_>>(), ips.to_vec());
    assert!(e[0].alive && e[2].alive);
    assert_eq!(table.snapshot().statuses()[1].health, Health::Dead);
    // The job DNS of every job now goes to a live proxy first.
    for k in 0..20u64 {
        let first = table.resolvers_for(snas_wire::JobKey(k))[0];
        assert_ne!(first, SocketAddr::from((ips[1], 5353)));
    }

    // Proxy 3 drains: alive (pinned flows stay) but flagged (no new flows).
    modes[2].store(DRAINING, Ordering::SeqCst);
    let e = wait_for(&dp, "proxy 3 draining", |e| e[2].draining).await;
    assert!(e[2].alive);
    assert!(!e[0].draining);

    // Proxy 2 returns: one good probe brings it back.
    modes[1].store(OK, Ordering::SeqCst);
    let e = wait_for(&dp, "proxy 2 back", |e| e[1].alive).await;
    assert!(e[2].draining, "proxy 3 is still draining");
    assert_eq!(table.snapshot().statuses()[1].health, Health::Alive);

    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_proxy_that_answers_garbage_counts_as_failed() {
    let ip = Ipv4Addr::new(127, 0, 0, 24);
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let _ = c.write_all(b"SSH-2.0-nope\r\n").await;
        }
    });
    assert_eq!(
        proxies::probe(addr, Duration::from_millis(500)).await,
        proxies::Probe::Failed
    );
    // Nothing listening at all.
    let closed = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 25), addr.port()));
    assert_eq!(
        proxies::probe(closed, Duration::from_millis(500)).await,
        proxies::Probe::Failed
    );
}

#[tokio::test]
async fn discovery_appends_and_unlists_proxies_and_survives_a_failed_lookup() {
    let stat = Ipv4Addr::new(192, 0, 2, 21);
    let (a, b) = (Ipv4Addr::new(192, 0, 2, 31), Ipv4Addr::new(192, 0, 2, 32));
    let answer = Arc::new(std::sync::Mutex::new(Some(vec![a, b])));
    let dns = service_dns(answer.clone()).await;
    let found = proxies::lookup_service("proxies.example.net", dns, Duration::from_secs(2)).await;
    assert_eq!(found, Some(vec![a, b]));
    let table = Arc::new(Proxies::new(&[stat], 9, 5353));
    let dp = Arc::new(RecordingDataplane::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(proxies::run_discovery(
        table.clone(),
        dp.clone(),
        "proxies.example.net".into(),
        dns,
        Duration::from_millis(30),
        rx,
    ));
    let e = wait_for(&dp, "two discovered proxies", |e| e.len() == 3).await;
    assert_eq!(e.iter().map(|p| p.ip).collect::<Vec<_>>(), vec![stat, a, b]);
    assert!(e.iter().all(|p| p.alive));

    *answer.lock().unwrap() = Some(vec![b]);
    let e = wait_for(&dp, "a unlisted", |e| !e[1].alive).await;
    assert_eq!(e[1].ip, a, "positions never move");
    assert!(e[0].alive && e[2].alive);

    // A failing lookup keeps the set; the next good one applies.
    let pushes = dp.proxy_sets().len();
    *answer.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(dp.proxy_sets().len(), pushes, "SERVFAIL changes nothing");
    *answer.lock().unwrap() = Some(vec![a, b]);
    wait_for(&dp, "a back", |e| e[1].alive).await;

    stop.send(true).unwrap();
    task.await.unwrap();
}
