//! Tier 2 under a live policy update (`Tier2::reevaluate_job`): flows to destinations the new
//! policy no longer allows end at once (audited `policy_updated`, their next segment answered
//! with a RST, new connections refused), flows it still allows continue untouched. Pure: a
//! manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use snas_policy::authoring::parse_policy;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws::{sign, verify};
use snas_policy::keys::PolicyKey;
use snas_proxy::clock::Nanos;
use snas_proxy::tier2::{
    AuditEvent, FlowEnd, JobPolicy, Now, StaticPolicies, Tier2, Tier2Config, Verdict,
    GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, TcpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption};
use snas_wire::{IpPacket, PolicySerial, Reason, TcpFlags};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const DB: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20));
const T0: u64 = 1_800_000_000;
const JTI: &str = "jti-update-00000001";

// The host rule's name check is off: these flows carry test bytes, not TLS, and the check has
// its own tests (tests/names.rs).
const BOTH: &str = "tenant = \"acme\"\njob = \"job-1\"\nnode = \"192.0.2.7\"\n[[egress]]\nhost = \"api.example.com:443\"\nnames = \"off\"\n[[egress]]\ncidr = \"203.0.113.20/32\"\nports = \"5432\"\n";
const API_ONLY: &str = "tenant = \"acme\"\njob = \"job-1\"\nnode = \"192.0.2.7\"\n[[egress]]\nhost = \"api.example.com:443\"\nnames = \"off\"\n";

struct Fx {
    policies: StaticPolicies,
    tier2: Tier2,
    key: PolicyKey,
    bundle: TrustBundle,
    mono: Nanos,
}

impl Fx {
    fn new() -> Fx {
        let key = PolicyKey::from_seed("test-key", [7; 32]).unwrap();
        let bundle = TrustBundle::from_keys([("test-key", key.public_pem().unwrap())]).unwrap();
        let mut f = Fx {
            policies: StaticPolicies::default(),
            tier2: Tier2::new(
                Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]),
                Nanos::ZERO,
            )
            .unwrap(),
            key,
            bundle,
            mono: Nanos::from_nanos(1_000_000_000),
        };
        let p = f.policy(BOTH, 1);
        f.policies.insert(p);
        let job = snas_policy::identity::job_key(JTI);
        let exp = f.mono.saturating_add(Duration::from_secs(300));
        f.tier2
            .bindings_mut()
            .bind(job, API, "api.example.com", exp);
        f
    }

    fn policy(&self, toml: &str, serial: u32) -> JobPolicy {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        let c = parse_policy(toml)
            .unwrap()
            .to_claims(JTI, PolicySerial(serial), now);
        let token = sign(&c, &self.key).unwrap();
        JobPolicy::from_verified(&verify(&token, &self.bundle, now).unwrap(), &[])
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            unix_secs: T0 + 10,
        }
    }

    fn send(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let opt = SnasOption {
            tenant_id: snas_policy::identity::tenant_id("acme"),
            job_key: snas_policy::identity::job_key(JTI),
            policy_serial: PolicySerial(1),
        };
        let mut payload = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        write_geneve_header(&mut payload, &opt, InnerProto::Ipv4).unwrap();
        payload[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let mut refusal = vec![0u8; 2048];
        let now = self.now();
        let v = self
            .tier2
            .from_node(&self.policies, NODE, &mut payload, &mut refusal, now);
        (v, payload)
    }
}

fn seg(sport: u16, dst: IpAddr, dport: u16, flags: TcpFlags) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(dst, dport),
        seq: 1000,
        ack: if flags.contains(TcpFlags::ACK) { 77 } else { 0 },
        flags,
        window: 65535,
        payload: if flags.contains(TcpFlags::ACK) {
            b"x"
        } else {
            b""
        },
    })
    .unwrap()
}

#[test]
fn an_update_ends_flows_to_removed_destinations_and_keeps_the_others() {
    let mut f = Fx::new();
    let job = snas_policy::identity::job_key(JTI);
    // Many connections to both destinations (within the default limit of 256).
    for i in 0..100u16 {
        let (v, _) = f.send(&seg(20000 + i, API, 443, TcpFlags::SYN));
        assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
        let (v, _) = f.send(&seg(30000 + i, DB, 5432, TcpFlags::SYN));
        assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
        f.mono = f.mono.saturating_add(Duration::from_millis(600));
    }
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 200);
    let _ = f.tier2.drain_audit().count();
    // The update drops the database rule.
    let new = f.policy(API_ONLY, 2);
    let now = f.now();
    assert_eq!(f.tier2.reevaluate_job(&new, now), 100);
    f.policies.insert(new);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 100);
    let ends: Vec<_> = f
        .tier2
        .drain_audit()
        .filter_map(|e| match e {
            AuditEvent::FlowEnd(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 100);
    assert!(ends
        .iter()
        .all(|r| r.end == FlowEnd::PolicyUpdated && r.dst.0 == DB));
    assert_eq!(FlowEnd::PolicyUpdated.name(), "policy_updated");
    // The next segment of an ended flow is answered with a RST; a new connection is refused.
    let (v, _) = f.send(&seg(30000, DB, 5432, TcpFlags::ACK));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::NoConntrack,
                ..
            }
        ),
        "{v:?}"
    );
    let (v, _) = f.send(&seg(31000, DB, 5432, TcpFlags::SYN));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::DestinationDenied,
                ..
            }
        ),
        "{v:?}"
    );
    // Flows to the destination still allowed go on.
    let (v, payload) = f.send(&seg(20000, API, 443, TcpFlags::ACK));
    let Verdict::ToInternet { range, .. } = v else {
        panic!("{v:?}")
    };
    assert_eq!(IpPacket::parse(&payload[range]).unwrap().dst(), API);
    // An update that changes nothing for the remaining flows ends none.
    let again = f.policy(API_ONLY, 3);
    let now = f.now();
    assert_eq!(f.tier2.reevaluate_job(&again, now), 0);
}
