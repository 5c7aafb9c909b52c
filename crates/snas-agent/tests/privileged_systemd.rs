//! PRIVILEGED (root): `systemctl restart` as systemd does it with the service's fd store,
//! without systemd: the first agent is given its DNS sockets as `LISTEN_FDS` would give them,
//! stores every listening socket over a stand-in `NOTIFY_SOCKET` (`FDSTORE=1`, `FDNAME=`) and
//! says `READY=1`; it is stopped; a query sent while no agent runs waits in the socket; a second
//! agent started with the stored sockets answers it. A passed socket that does not match the
//! configuration is replaced by a fresh one. Stub verifier, in-memory dataplane, unique loopback
//! addresses.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use common::{unix_http, AgentThread, Scope, StubVerifier};
use snas_agent::handover;
use snas_agent::node::RunOptions;
use snas_agent::AgentConfig;

/// What the stand-in systemd received: (state text, descriptors).
fn receive_all(notify: &UnixDatagram, until_ready: bool) -> Vec<(String, Vec<OwnedFd>)> {
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 512];
        let (n, fds) = handover::recv_with_fds(notify.as_fd(), &mut buf, 4).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let ready = text == "READY=1";
        out.push((text, fds));
        if ready && until_ready {
            return out;
        }
    }
}

fn query(id: u16) -> Vec<u8> {
    let mut q = hickory_proto::op::Message::new();
    q.set_id(id).add_query(hickory_proto::op::Query::query(
        "api.example.com.".parse().unwrap(),
        hickory_proto::rr::RecordType::A,
    ));
    q.to_vec().unwrap()
}

#[test]
fn privileged_sockets_stored_with_systemd_survive_a_restart_with_queued_queries_answered() {
    let scope = Scope::new("sysd");
    let base = common::agent_config(&scope, "10.254.61.0/24");
    let n = std::process::id();
    let dns_ip = Ipv4Addr::new(127, 79, (n >> 8) as u8, n as u8);
    let text = format!(
        "node_name = \"test-node\"\nunderlay_interface = \"lo\"\nunderlay_address = \"192.0.2.7\"\ntrust_bundle = \"/t\"\njob_pool = \"{}\"\napi_socket = \"{}\"\npolicy_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nnetns_prefix = \"{}\"\nhost_veth_prefix = \"snt\"\ndns_listen = \"{dns_ip}\"\n",
        base.job_pool,
        base.api_socket.display(),
        base.state_dir.display(),
        base.netns_prefix,
    );
    let config = AgentConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
    let socket = config.api_socket.clone();
    let notify_path = scope.state.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // What socket activation would pass: the DNS sockets, and a policy listener on an address
    // the configuration does not name.
    let dns_addr = SocketAddr::from((dns_ip, 53));
    let udp = std::net::UdpSocket::bind(dns_addr).unwrap();
    let tcp = std::net::TcpListener::bind(dns_addr).unwrap();
    let stray = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let first = AgentThread::start(
        config.clone(),
        Arc::new(StubVerifier),
        RunOptions {
            inherited: vec![
                (handover::DNS_UDP.into(), OwnedFd::from(udp)),
                (handover::DNS_TCP.into(), OwnedFd::from(tcp)),
                (handover::POLICY.into(), OwnedFd::from(stray)),
            ],
            notify_socket: Some(notify_path.display().to_string()),
        },
    );
    let stored = receive_all(&notify, true);
    let names: Vec<&str> = stored.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "FDSTORE=1\nFDNAME=dns-udp",
            "FDSTORE=1\nFDNAME=dns-tcp",
            "FDSTORE=1\nFDNAME=policy",
            "FDSTORE=1\nFDNAME=api",
            "READY=1"
        ]
    );
    assert!(stored[..4].iter().all(|(_, fds)| fds.len() == 1));
    let (status, m) = unix_http(&socket, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let m = m.as_str().unwrap().to_owned();
    for want in [
        "snas_agent_listen_socket{socket=\"dns-udp\",source=\"systemd\"} 1\n",
        "snas_agent_listen_socket{socket=\"dns-tcp\",source=\"systemd\"} 1\n",
        "snas_agent_listen_socket{socket=\"policy\",source=\"bound\"} 1\n",
        "snas_agent_listen_socket{socket=\"api\",source=\"bound\"} 1\n",
    ] {
        assert!(m.contains(want), "{want} missing: {m}");
    }
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_to(&query(1), dns_addr).unwrap();
    let mut buf = [0u8; 512];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(
        hickory_proto::op::Message::from_vec(&buf[..n])
            .unwrap()
            .id(),
        1
    );

    // `systemctl restart`: the agent is stopped; systemd keeps the stored sockets.
    first.stop().unwrap();
    assert!(
        socket.exists(),
        "the API socket's file stays: the socket lives on in the fd store"
    );
    client.send_to(&query(2), dns_addr).unwrap();
    let inherited: Vec<(String, OwnedFd)> = stored
        .into_iter()
        .filter_map(|(text, mut fds)| {
            let name = text.strip_prefix("FDSTORE=1\nFDNAME=")?.to_owned();
            Some((name, fds.pop()?))
        })
        .collect();
    let second = AgentThread::start(
        config,
        Arc::new(StubVerifier),
        RunOptions {
            inherited,
            notify_socket: Some(notify_path.display().to_string()),
        },
    );
    // The query sent while no agent ran is answered by the new one.
    let n = client.recv(&mut buf).unwrap();
    let a = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(a.id(), 2);
    receive_all(&notify, true);
    let (status, m) = unix_http(&socket, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let m = m.as_str().unwrap().to_owned();
    for name in ["dns-udp", "dns-tcp", "policy", "api"] {
        assert!(
            m.contains(&format!(
                "snas_agent_listen_socket{{socket=\"{name}\",source=\"systemd\"}} 1\n"
            )),
            "{name}: {m}"
        );
    }
    second.stop().unwrap();
}
