//! Privileged (root): builds a testbed's namespaces without daemons, runs the internet services
//! in-process on a thread inside `<prefix>-inet`, and checks every service from the internet
//! itself and from both proxies through their transit links; then `down` removes everything.
#![allow(clippy::unwrap_used)] // guards and helpers outside #[test] fns: a failed step is a failed test

mod common;

use std::time::Duration;

use snas_testbed::internet::{Internet, InternetOptions};
use snas_testbed::topology::Topology;
use snas_testbed::{netns, setup, unique_prefix, Testbed};

struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Testbed::down(&self.0);
    }
}

#[test]
fn internet_services_answer_locally_and_through_each_proxy_transit_then_down_removes_all() {
    common::require_root();
    let prefix = unique_prefix();
    let _guard = Down(prefix.clone());
    let t = Topology::new(&prefix).unwrap();
    setup::build(&t).unwrap();
    // Building twice changes nothing and fails nowhere.
    setup::build(&t).unwrap();
    std::fs::create_dir_all(t.state_dir()).unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let inet_ns = t.inet_ns();
    let server = std::thread::spawn(move || {
        netns::in_netns(&inet_ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let inet = Internet::bind(&InternetOptions::default()).await.unwrap();
                ready_tx.send(()).unwrap();
                inet.run(async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        })
        .unwrap();
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    netns::in_netns(&t.inet_ns(), common::check_internet_services).unwrap();
    netns::in_netns(&t.proxy_ns(1), common::check_internet_services).unwrap();
    netns::in_netns(&t.proxy_ns(2), common::check_internet_services).unwrap();
    // Nodes have only the underlay: the internet is not reachable from them directly.
    let direct = netns::in_netns(&t.node_ns(1), || {
        std::net::TcpStream::connect_timeout(
            &"203.0.113.10:80".parse().unwrap(),
            Duration::from_millis(300),
        )
        .is_ok()
    })
    .unwrap();
    assert!(!direct, "node 1 reached the internet without a proxy");
    // The underlay connects node 1 and proxy 2: nothing listens on port 1, so a reachable
    // proxy refuses at once while an unreachable one would time out.
    let refused = netns::in_netns(&t.node_ns(1), || {
        std::net::TcpStream::connect_timeout(
            &"192.0.2.22:1".parse().unwrap(),
            Duration::from_secs(3),
        )
        .map_err(|e| e.kind())
    })
    .unwrap();
    assert_eq!(
        refused.err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "node 1 cannot reach proxy 2 over the underlay"
    );

    stop_tx.send(()).unwrap();
    server.join().unwrap();
    Testbed::down(&prefix).unwrap();
    common::assert_nothing_left(&t);
}
