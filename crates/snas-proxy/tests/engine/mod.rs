//! The pure tier-2 engine driven the way the daemon drives it, shared by the engine tests
//! (`tests/resets.rs`, `tests/tier2_update.rs`, …): a signing key with its trust bundle and the
//! job policies it signs, a manual clock, and packets handed in from a node (GENEVE header in
//! front) or from the internet. No sockets, no threads: every test owns its engine.
//!
//! Addresses are documentation ranges: the node and the proxy in 192.0.2.0/24, the proxy's egress
//! address in 198.51.100.0/24, destinations (chosen by each test) in 203.0.113.0/24.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use snas_policy::authoring::parse_policy;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws::{sign, verify};
use snas_policy::keys::PolicyKey;
use snas_proxy::clock::Nanos;
use snas_proxy::tier2::{
    JobPolicy, Now, StaticPolicies, Tier2, Tier2Config, Verdict, GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, TcpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption};
use snas_wire::{PolicySerial, TcpFlags};

/// The node the jobs run on.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// The proxy's underlay address.
pub const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The proxy's one egress (SNAT) address.
pub const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
/// The job's address inside its sandbox.
pub const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
/// Wall-clock seconds at which the policies are signed (their `iat`).
pub const T0: u64 = 1_800_000_000;
/// PSH|ACK: a segment carrying data.
pub const DATA: TcpFlags = TcpFlags(0x18);

/// A control plane's signing key and the trust bundle holding its public half.
pub struct Signer {
    pub key: PolicyKey,
    pub bundle: TrustBundle,
}

impl Signer {
    pub fn new() -> Signer {
        let key = PolicyKey::from_seed("test-key", [7; 32]).unwrap();
        let bundle = TrustBundle::from_keys([("test-key", key.public_pem().unwrap())]).unwrap();
        Signer { key, bundle }
    }

    /// The policy `toml` signed as job `jti` with `serial` at [`T0`], verified as a proxy does.
    pub fn policy(&self, toml: &str, jti: &str, serial: u32) -> JobPolicy {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        let claims = parse_policy(toml)
            .unwrap()
            .to_claims(jti, PolicySerial(serial), now);
        let token = sign(&claims, &self.key).unwrap();
        JobPolicy::from_verified(&verify(&token, &self.bundle, now).unwrap(), &[])
    }
}

/// The overlay option tier 1 puts on job `jti`'s packets (tenant `acme`).
pub fn option(jti: &str, serial: u32) -> SnasOption {
    SnasOption {
        tenant_id: snas_policy::identity::tenant_id("acme"),
        job_key: snas_policy::identity::job_key(jti),
        policy_serial: PolicySerial(serial),
    }
}

/// What the engine made of a packet from a node.
pub struct FromNode {
    pub verdict: Verdict,
    /// The GENEVE payload as the engine left it (the inner packet NATed when it goes out).
    pub payload: Vec<u8>,
    /// The refusal buffer (a RST or ICMP error for the job when the verdict is `Refuse`).
    pub refusal: Vec<u8>,
}

/// A [`Tier2`] engine with the policies it knows and a manual clock.
pub struct Engine {
    pub policies: StaticPolicies,
    pub tier2: Tier2,
    pub signer: Signer,
    pub mono: Nanos,
}

impl Engine {
    /// An engine for `cfg` with no policy yet; its clock starts at 1 s.
    pub fn new(cfg: Tier2Config) -> Engine {
        Engine {
            policies: StaticPolicies::default(),
            tier2: Tier2::new(cfg, Nanos::ZERO).unwrap(),
            signer: Signer::new(),
            mono: Nanos::from_nanos(1_000_000_000),
        }
    }

    /// An engine serving [`NODE`] from [`PROXY`] with the one egress address [`EGRESS`].
    pub fn single_node() -> Engine {
        Engine::new(Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]))
    }

    /// Signs `toml` for `jti` and makes it the policy the engine holds for that job.
    pub fn hold_policy(&mut self, toml: &str, jti: &str, serial: u32) {
        let p = self.signer.policy(toml, jti, serial);
        self.policies.insert(p);
    }

    pub fn now(&self) -> Now {
        Now {
            mono: self.mono,
            unix_secs: T0 + self.mono.as_nanos() / 1_000_000_000,
        }
    }

    /// Moves the clock only.
    pub fn advance(&mut self, d: Duration) {
        self.mono = self.mono.saturating_add(d);
    }

    /// Moves the clock and runs the engine's periodic work, as the daemon's timer does.
    pub fn tick(&mut self, d: Duration) {
        self.advance(d);
        let now = self.now();
        self.tier2.tick(&self.policies, now);
    }

    /// `inner` (an IPv4 packet) from the sandbox, sent by node `from` with `opt`.
    pub fn packet_from_node(&mut self, from: Ipv4Addr, opt: &SnasOption, inner: &[u8]) -> FromNode {
        self.packet_from_node_proto(from, opt, InnerProto::Ipv4, inner)
    }

    /// `inner` (of protocol `proto`) from the sandbox, sent by node `from` with `opt`.
    pub fn packet_from_node_proto(
        &mut self,
        from: Ipv4Addr,
        opt: &SnasOption,
        proto: InnerProto,
        inner: &[u8],
    ) -> FromNode {
        let mut payload = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        write_geneve_header(&mut payload, opt, proto).unwrap();
        payload[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let mut refusal = vec![0u8; 2048];
        let now = self.now();
        let verdict = self
            .tier2
            .from_node(&self.policies, from, &mut payload, &mut refusal, now);
        FromNode {
            verdict,
            payload,
            refusal,
        }
    }

    /// `inner` from the internet to an egress address, with room for the GENEVE header in front
    /// as the daemon leaves it; returns the verdict and the buffer it refers to.
    pub fn packet_from_internet(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        buf[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let n = buf.len();
        let now = self.now();
        let v = self
            .tier2
            .from_internet(&mut buf, GENEVE_HEADER_LEN..n, now);
        (v, buf)
    }
}

/// A TCP segment from the sandbox's port `sport` to `dst`:`dport`.
pub fn sandbox_segment(
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        ack,
        flags,
        window: 65535,
        payload,
    })
    .unwrap()
}

/// A TCP segment from `src`:`sport` on the internet to the flow's SNAT port on [`EGRESS`].
pub fn internet_segment(
    src: IpAddr,
    sport: u16,
    egress_port: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(EGRESS, egress_port),
        seq,
        ack,
        flags,
        window: 65535,
        payload,
    })
    .unwrap()
}
