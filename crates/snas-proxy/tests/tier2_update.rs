//! Tier 2 under a live policy update (`Tier2::reevaluate_job`): flows to destinations the new
//! policy no longer allows end at once (audited `policy_updated`, their next segment answered
//! with a RST, new connections refused), flows it still allows continue untouched. Pure: a
//! manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use snas_proxy::tier2::{AuditEvent, FlowEnd, Verdict};
use snas_wire::build::{tcp, TcpSpec};
use snas_wire::{IpPacket, Reason, TcpFlags};

mod engine;
use engine::{Engine, NODE, SANDBOX};

const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const DB: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20));
const JTI: &str = "jti-update-00000001";

// The host rule's name check is off: these flows carry test bytes, not TLS, and the check has
// its own tests (tests/names.rs).
const BOTH: &str = "tenant = \"acme\"\njob = \"job-1\"\nnode = \"192.0.2.7\"\n[[egress]]\nhost = \"api.example.com:443\"\nnames = \"off\"\n[[egress]]\ncidr = \"203.0.113.20/32\"\nports = \"5432\"\n";
const API_ONLY: &str = "tenant = \"acme\"\njob = \"job-1\"\nnode = \"192.0.2.7\"\n[[egress]]\nhost = \"api.example.com:443\"\nnames = \"off\"\n";

/// One job whose DNS bound api.example.com, holding [`BOTH`] at serial 1.
struct Fx(Engine);

impl std::ops::Deref for Fx {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.0
    }
}

impl std::ops::DerefMut for Fx {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.0
    }
}

impl Fx {
    fn new() -> Fx {
        let mut e = Engine::single_node();
        e.hold_policy(BOTH, JTI, 1);
        let job = snas_policy::identity::job_key(JTI);
        let exp = e.mono.saturating_add(Duration::from_secs(300));
        e.tier2
            .bindings_mut()
            .bind(job, API, "api.example.com", exp);
        Fx(e)
    }

    fn policy(&self, toml: &str, serial: u32) -> snas_proxy::tier2::JobPolicy {
        self.0.signer.policy(toml, JTI, serial)
    }

    fn send(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let r = self
            .0
            .packet_from_node(NODE, &engine::option(JTI, 1), inner);
        (r.verdict, r.payload)
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
