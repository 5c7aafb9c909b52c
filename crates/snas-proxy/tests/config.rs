//! `proxy.toml` parsing: the testbed's file parses with the documented defaults, and bad files
//! are rejected with the file, the field and the reason in the message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use snas_proxy::config::{ConfigError, ProxyConfig};

const TESTBED: &str = r#"
name = "proxy-1"
underlay_addr = "192.0.2.21"
nodes = ["192.0.2.11", "192.0.2.12"]
agent_policy_port = 7070
trust = "/run/snas-testbed/P/trust"
egress_pool = ["198.51.100.64/28"]
tun_name = "snastun0"
workers = 1
resolver_listen = "192.0.2.21:5353"
upstream_dns = ["203.0.113.53:53"]
control_token_file = "/run/snas-testbed/P/proxy-1/control.token"
audit_log = "/run/snas-testbed/P/proxy-1/audit.jsonl"
state_dir = "/run/snas-testbed/P/proxy-1"
"#;

fn err(text: &str) -> String {
    ProxyConfig::parse(text, Path::new("/etc/snas/proxy.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn the_testbed_file_parses_with_defaults() {
    let c = ProxyConfig::parse(TESTBED, Path::new("proxy.toml")).unwrap();
    assert_eq!(c.nodes.len(), 2);
    assert_eq!((c.tun_mtu, c.batch, c.negative_cache_secs), (1500, 32, 5));
    assert!(c.peers.is_empty());
    // A /28 has 14 host addresses.
    assert_eq!(c.egress_ips().len(), 14);
    let core = snas_proxy::nat::NatConfig::new(Vec::new());
    assert_eq!(
        (c.max_ports_per_job, c.max_ports_per_tenant),
        (core.max_ports_per_job, core.max_ports_per_tenant),
        "config defaults are the NAT core's"
    );
    assert!(c.tenant_quotas.is_empty());
    assert_eq!(
        c.control_listen.to_string(),
        "127.0.0.1:9090",
        "loopback by default"
    );
    assert_eq!(
        c.service_addr().to_string(),
        "192.0.2.21:9090",
        "the underlay by default"
    );
    let hold = snas_proxy::hold::HoldConfig::default();
    assert_eq!(
        c.hold_config(),
        snas_proxy::hold::HoldConfig {
            max_wait: c.fetch_timeout(),
            ..hold
        },
        "hold defaults are the core's; held packets wait at most the fetch timeout"
    );
    assert_eq!(
        c.pacing_queue_limits(),
        snas_proxy::budget::QueueLimits::default()
    );
    assert_eq!(c.audit_lines_per_job_per_sec, 200);
    assert!(c.infrastructure.is_empty());
    assert_eq!(
        c.fair_config(),
        snas_proxy::fair::FairConfig::default(),
        "fair-queue defaults are the core's"
    );
}

#[test]
fn a_management_endpoint_on_the_service_address_is_rejected() {
    for control in ["192.0.2.21:9090", "0.0.0.0:9090"] {
        let e = err(&format!("{TESTBED}control_listen = \"{control}\"\n"));
        assert!(
            e.contains("control_listen") && e.contains("service_listen"),
            "{control}: {e}"
        );
    }
    let moved = format!(
        "{TESTBED}control_listen = \"192.0.2.21:9090\"\nservice_listen = \"192.0.2.21:9091\"\n"
    );
    let c = ProxyConfig::parse(&moved, Path::new("p.toml")).unwrap();
    assert_eq!(c.service_addr().port(), 9091);
}

#[test]
fn every_deployed_example_config_parses() {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd/proxy.toml.example");
    let text = std::fs::read_to_string(&root).unwrap();
    ProxyConfig::parse(&text, &root).unwrap();
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let e = err(&format!("{TESTBED}\nworkerz = 2\n"));
    assert!(
        e.contains("/etc/snas/proxy.toml") && e.contains("workerz"),
        "{e}"
    );
}

#[test]
fn missing_and_mistyped_fields_name_the_field() {
    let e = err(&TESTBED.replace("tun_name = \"snastun0\"\n", ""));
    assert!(e.contains("tun_name"), "{e}");
    let e = err(&TESTBED.replace("\"192.0.2.21:5353\"", "\"not an address\""));
    assert!(e.contains("resolver_listen"), "{e}");
}

#[test]
fn unusable_values_name_field_and_reason() {
    let cases = [
        (TESTBED.replace("workers = 1", "workers = 0"), "workers"),
        (
            TESTBED.replace("nodes = [\"192.0.2.11\", \"192.0.2.12\"]", "nodes = []"),
            "nodes",
        ),
        (
            TESTBED.replace("snastun0", "a-name-longer-than-15"),
            "tun_name",
        ),
        (
            format!("{TESTBED}peers = [\"192.0.2.22\"]\n"),
            "peer_secret_file",
        ),
        (format!("{TESTBED}tun_mtu = 100\n"), "tun_mtu"),
        (
            format!("{TESTBED}max_ports_per_tenant = 0\n"),
            "max_ports_per_tenant",
        ),
        (
            format!("{TESTBED}[tenant_quotas]\n\"Not A Tenant\" = 5\n"),
            "tenant_quotas",
        ),
        (TESTBED.replace("snastun0", "tun@0"), "tun_name"),
        (
            format!("{TESTBED}hold_job_packets = 0\n"),
            "hold_job_packets",
        ),
        (
            format!("{TESTBED}hold_job_bytes = 100000000\n"),
            "hold_job_bytes",
        ),
        (
            format!("{TESTBED}pacing_queue_total_packets = 10\n"),
            "pacing_queue_total_packets",
        ),
        (
            format!("{TESTBED}audit_lines_per_job_per_sec = 0\n"),
            "audit_lines_per_job_per_sec",
        ),
        (
            format!("{TESTBED}fair_quantum_bytes = 0\n"),
            "fair_quantum_bytes",
        ),
        (
            format!("{TESTBED}fair_tenant_bytes = 0\n"),
            "fair_tenant_bytes",
        ),
        (
            format!("{TESTBED}fair_tenant_packets = 100\nfair_total_packets = 99\n"),
            "fair_total_packets",
        ),
    ];
    for (text, field) in cases {
        match ProxyConfig::parse(&text, Path::new("p.toml")) {
            Err(ConfigError::Invalid { field: f, file, .. }) => {
                assert_eq!((f, file.as_path()), (field, Path::new("p.toml")));
            }
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn the_infrastructure_set_holds_what_the_proxy_knows_and_the_configured_prefixes() {
    let text = format!(
        "{TESTBED}peers = [\"192.0.2.22\"]\npeer_secret_file = \"/etc/snas/peer\"\n\
         infrastructure = [\"10.0.0.0/8\", \"2001:db8:ffff::/48\"]\n"
    );
    let c = ProxyConfig::parse(&text, Path::new("p.toml")).unwrap();
    let set = snas_proxy::infra::InfraSet::new(&c.infrastructure_set());
    for ip in [
        "192.0.2.21", // underlay
        "192.0.2.11", // nodes
        "192.0.2.12",
        "192.0.2.22",      // peer
        "198.51.100.70",   // egress pool
        "203.0.113.53",    // upstream DNS
        "169.254.169.254", // metadata
        "fd00:ec2::254",
        "10.20.30.40", // configured
        "2001:db8:ffff::1",
    ] {
        assert!(set.contains(ip.parse().unwrap()), "{ip}");
    }
    for ip in ["203.0.113.10", "192.0.2.99", "2001:db8::1"] {
        assert!(!set.contains(ip.parse().unwrap()), "{ip}");
    }
}

#[test]
fn a_bad_infrastructure_prefix_names_the_field() {
    let e = err(&format!("{TESTBED}infrastructure = [\"10.0.0.0/33\"]\n"));
    assert!(e.contains("infrastructure"), "{e}");
}

#[test]
fn an_ipv6_egress_pool_adds_its_addresses_after_the_subnet_router_anycast() {
    let text = format!("{TESTBED}egress_pool6 = [\"2001:db8:e9::100/120\"]\n");
    let c = ProxyConfig::parse(&text, Path::new("proxy.toml")).unwrap();
    let ips = c.egress_ips();
    // 14 IPv4 host addresses, then 255 IPv6 ones (::100 is the subnet-router anycast).
    assert_eq!(ips.len(), 14 + 255);
    assert_eq!(ips[14].to_string(), "2001:db8:e9::101");
    assert_eq!(ips[ips.len() - 1].to_string(), "2001:db8:e9::1ff");
    let infra: Vec<String> = c
        .infrastructure_set()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        infra.iter().any(|n| n == "2001:db8:e9::100/120"),
        "{infra:?}"
    );
    // Without the field the proxy is IPv4-only, as before.
    let c = ProxyConfig::parse(TESTBED, Path::new("proxy.toml")).unwrap();
    assert!(c.egress_pool6.is_empty());
    assert!(c.egress_ips().iter().all(|ip| ip.is_ipv4()));
}

#[test]
fn an_ipv6_egress_prefix_shorter_than_112_bits_names_the_field() {
    let e = err(&format!("{TESTBED}egress_pool6 = [\"2001:db8:e9::/64\"]\n"));
    assert!(
        e.contains("egress_pool6") && e.contains("/112") && e.contains("proxy.toml"),
        "{e}"
    );
}
