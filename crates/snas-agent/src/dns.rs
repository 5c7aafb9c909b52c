//! DNS decisions of the stub, without I/O.
//!
//! Owns what the stub decides about one query (refuse, answer locally, or forward with the
//! rules that matched the name), the per-job query token bucket, the job identity EDNS option
//! of the agent ↔ proxy contract (code [`IDENTITY_OPTION`], 16 bytes: tenant_id u32 BE,
//! job_key u64 BE, policy_serial u32 BE), the tier-1 port rules for a name, TTL clamping, and
//! the answers the stub builds itself (refusals, NODATA). The answer cache (which builds the
//! answers it gives back) is `crate::dns_cache`, on top of this module. Messages are parsed and
//! built only with hickory-proto.
//!
//! # Invariants
//! - Only single-question standard queries of type A, AAAA or CNAME are forwarded; every other
//!   type (TXT, NULL, MX, HTTPS, ...) is refused: the sandbox gets addresses, nothing else, and
//!   the favourite tunnelling types are closed.
//! - Names are decided by `Matcher::name_verdict`, as the proxy decides them: a name no allow
//!   rule leaves a port is refused (`dns_refused`), one whose every port a deny rule takes is
//!   refused as `deny_rule`; the answers are bound with the ports the deny rules leave. In audit
//!   mode every other name is forwarded too and its answer audited `would_deny` without
//!   binding anything (tier 1's audit flag lets public addresses through).
//! - Every TTL the agent relays is clamped to [[`DNS_TTL_MIN`], [`DNS_TTL_MAX`]], the same
//!   bounds the proxy applies, so a conforming proxy's answer passes unchanged; tier 1 holds an
//!   answered address for [`binding_lifetime`] (the clamped TTL plus [`BINDING_GRACE`]), the
//!   rule tier 2 applies too.
//!
//! # Limits
//! - Names longer than [`MAX_NAME_LEN`] bytes are refused (the DNS limit is 253).
//! - At most [`snas_bpf::config::MAX_PORT_RULES`] port rules per address: further rules matching the same
//!   name are left out of tier 1 (tier 2 still enforces the full policy).

use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::RecordType;
use snas_bpf::PortRule;
use snas_policy::{DenyReason, Matcher, NameVerdict};
use snas_wire::{JobKey, PolicySerial, TenantId};

/// EDNS0 option code carrying the job identity to the proxy resolver.
pub const IDENTITY_OPTION: u16 = 65053;
pub use snas_policy::binding::{
    binding_lifetime, clamp_ttl, BINDING_GRACE, DNS_TTL_MAX, DNS_TTL_MIN,
};
/// Longest query name accepted (without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;
/// UDP payload size the stub advertises and accepts from proxies.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Why a query is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The source address is no job's sandbox.
    UnknownJob,
    /// The job's query rate bucket is empty.
    Rate,
    /// Too many of the job's queries are being forwarded.
    InFlight,
    /// A query type other than A/AAAA/CNAME, or not a plain query.
    QueryType,
    /// No host rule matches the name (or the name is too long).
    Name,
    /// Deny rules take every port the name had.
    DenyRule,
    /// The job's policy has expired (`exp` has passed).
    Expired,
    /// The job already holds its share of the stub's TCP connections.
    TcpConnections,
}

impl Refusal {
    /// Audit reason and metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::UnknownJob => "unknown_job",
            Refusal::Rate => "dns_rate",
            Refusal::InFlight => "dns_inflight",
            Refusal::QueryType => "dns_qtype",
            Refusal::Name => "dns_refused",
            Refusal::DenyRule => "deny_rule",
            Refusal::Expired => "policy_expired",
            Refusal::TcpConnections => "dns_tcp_limit",
        }
    }
}

/// A query-rate token bucket (pure: time is passed in as a monotonic offset).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_sec: u32, burst: u32, now: Duration) -> TokenBucket {
        TokenBucket {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Duration) -> bool {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The question of a query the stub may forward (also the cache key within a job).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// Lower-case name without the trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: RecordType,
}

/// Checks the shape of a query: a standard query with one question of an allowed type.
pub fn question_of(msg: &Message) -> Result<Question, (Refusal, Option<Question>)> {
    let q = match msg.queries() {
        [q] => q,
        _ => return Err((Refusal::QueryType, None)),
    };
    let mut name = q.name().to_ascii().to_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    let question = Question {
        name,
        qtype: q.query_type(),
    };
    if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
        return Err((Refusal::QueryType, Some(question)));
    }
    if !matches!(
        question.qtype,
        RecordType::A | RecordType::AAAA | RecordType::CNAME
    ) {
        return Err((Refusal::QueryType, Some(question)));
    }
    Ok(question)
}

/// What the stub does with a name it may forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameDecision {
    /// Allow rules whose host part matches the name, ascending (empty when `would_deny`).
    pub rules: Vec<usize>,
    /// Tier-1 port rules for the answers (at most `MAX_PORT_RULES`, see the module limits;
    /// empty when `would_deny`: nothing is bound).
    pub ports: Vec<PortRule>,
    /// Audit mode: the reason the name would be refused; the answer is relayed, audited
    /// `would_deny`, and bound nowhere.
    pub would_deny: Option<DenyReason>,
}

/// Decides a name: forward (with its rules and ports), or refuse (with the deny rule that
/// refused it, if one did). Names longer than [`MAX_NAME_LEN`] are refused.
pub fn name_decision(
    matcher: &Matcher,
    name: &str,
) -> Result<NameDecision, (Refusal, Option<usize>)> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err((Refusal::Name, None));
    }
    match matcher.name_verdict(name) {
        NameVerdict::Allow { rules, ports } => Ok(NameDecision {
            rules,
            ports: ports
                .into_iter()
                .take(snas_bpf::config::MAX_PORT_RULES)
                .map(|(proto, r)| PortRule {
                    proto,
                    lo: r.lo(),
                    hi: r.hi(),
                })
                .collect(),
            would_deny: None,
        }),
        NameVerdict::WouldDeny(r) => Ok(NameDecision {
            rules: Vec::new(),
            ports: Vec::new(),
            would_deny: Some(r),
        }),
        NameVerdict::Deny(DenyReason::DenyRule(n)) => Err((Refusal::DenyRule, Some(n))),
        NameVerdict::Deny(_) => Err((Refusal::Name, None)),
    }
}

/// The 16-byte identity value of the EDNS option.
pub fn identity_value(tenant_id: TenantId, job_key: JobKey, serial: PolicySerial) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..4].copy_from_slice(&tenant_id.get().to_be_bytes());
    v[4..12].copy_from_slice(&job_key.get().to_be_bytes());
    v[12..].copy_from_slice(&serial.get().to_be_bytes());
    v
}

/// Reads the identity option of a forwarded query (what the proxy does; used in tests).
pub fn identity_of(msg: &Message) -> Option<(TenantId, JobKey, PolicySerial)> {
    let edns = msg.extensions().as_ref()?;
    match edns.option(IDENTITY_OPTION.into())? {
        EdnsOption::Unknown(_, v) if v.len() == 16 => {
            let mut t = [0u8; 4];
            let mut k = [0u8; 8];
            let mut s = [0u8; 4];
            t.copy_from_slice(&v[..4]);
            k.copy_from_slice(&v[4..12]);
            s.copy_from_slice(&v[12..]);
            Some((
                TenantId(u32::from_be_bytes(t)),
                JobKey(u64::from_be_bytes(k)),
                PolicySerial(u32::from_be_bytes(s)),
            ))
        }
        _ => None,
    }
}

/// The query sent to the proxy: the sandbox's question under a fresh `id`, recursion desired,
/// and only our EDNS (payload [`EDNS_PAYLOAD`], the identity option); the sandbox's own EDNS
/// options (e.g. client subnet) are not passed on.
pub fn forward_query(
    original: &Message,
    id: u16,
    tenant_id: TenantId,
    job_key: JobKey,
    serial: PolicySerial,
) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    for q in original.queries() {
        m.add_query(q.clone());
    }
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns.options_mut().insert(EdnsOption::Unknown(
        IDENTITY_OPTION,
        identity_value(tenant_id, job_key, serial).to_vec(),
    ));
    m.set_edns(edns);
    m
}

/// Whether `answer` answers `query` (ID, response flag and the same question).
pub fn answers_query(query: &Message, answer: &Message) -> bool {
    answer.id() == query.id()
        && answer.message_type() == MessageType::Response
        && answer.queries() == query.queries()
}

/// An answer to the sandbox with no records: same ID, question and RD flag.
pub fn empty_answer(query: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    for q in query.queries() {
        m.add_query(q.clone());
    }
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// The proxy's answer made into the sandbox's: the sandbox's ID and RD flag, TTLs clamped, no
/// EDNS options, EDNS only if the sandbox used it.
pub fn relay_answer(query: &Message, mut answer: Message) -> Message {
    answer
        .set_id(query.id())
        .set_recursion_desired(query.recursion_desired());
    for r in answer.answers_mut() {
        let ttl = clamp_ttl(r.ttl()).as_secs();
        r.set_ttl(u32::try_from(ttl).unwrap_or(u32::MAX));
    }
    *answer.extensions_mut() = query.extensions().as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns
    });
    answer
}

/// The UDP payload limit the sandbox announced (512 without EDNS).
pub fn client_udp_limit(query: &Message) -> usize {
    query.extensions().as_ref().map_or(512, |e| {
        usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snas_bpf::RuleProtocol;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;
    use std::time::SystemTime;

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(4242)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_str(name).unwrap(), t));
        m
    }

    fn claims(hosts: &[&str]) -> snas_policy::PolicyClaims {
        let mut d = snas_policy::PolicyDraft::new("acme", "build");
        for h in hosts {
            d.egress.push(snas_policy::EgressRule::host(
                snas_policy::HostPort::parse(h).unwrap(),
                RuleProtocol::Tcp,
            ));
        }
        d.to_claims("jti-1", PolicySerial(1), SystemTime::now())
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let mut b = TokenBucket::new(20, 40, Duration::ZERO);
        let n = (0..100).filter(|_| b.take(Duration::ZERO)).count();
        assert_eq!(n, 40);
        assert!(!b.take(Duration::from_millis(10)));
        let later = (0..100)
            .filter(|_| b.take(Duration::from_millis(510)))
            .count();
        assert_eq!(later, 10);
    }

    #[test]
    fn only_address_queries_pass_the_shape_check() {
        assert!(question_of(&query("api.example.com.", RecordType::A)).is_ok());
        assert!(question_of(&query("api.example.com.", RecordType::AAAA)).is_ok());
        for t in [
            RecordType::TXT,
            RecordType::NULL,
            RecordType::MX,
            RecordType::ANY,
        ] {
            let e = question_of(&query("api.example.com.", t)).unwrap_err();
            assert_eq!(e.0, Refusal::QueryType, "{t}");
        }
        let mut two = query("a.example.com.", RecordType::A);
        two.add_query(Query::query(
            Name::from_str("b.example.com.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(question_of(&two).unwrap_err().0, Refusal::QueryType);
    }

    #[test]
    fn names_are_lowercased_and_undotted() {
        let q = question_of(&query("API.Example.COM.", RecordType::A)).unwrap();
        assert_eq!(q.name, "api.example.com");
    }

    #[test]
    fn names_outside_the_policy_are_refused() {
        let c = claims(&["api.example.com", "*.cdn.example.net:8443"]);
        let m = snas_policy::compile(&c);
        assert_eq!(
            name_decision(&m, "api.example.com").map(|d| d.rules),
            Ok(vec![0])
        );
        assert_eq!(
            name_decision(&m, "x1.cdn.example.net").map(|d| d.rules),
            Ok(vec![1])
        );
        assert_eq!(
            name_decision(&m, "evil.example.org"),
            Err((Refusal::Name, None))
        );
        assert_eq!(
            name_decision(&m, &"a.".repeat(140)),
            Err((Refusal::Name, None)),
            "too long"
        );
    }

    #[test]
    fn port_rules_follow_the_matching_rules() {
        let c = claims(&["api.example.com", "api.example.com:8000-8010"]);
        let m = snas_policy::compile(&c);
        let d = name_decision(&m, "api.example.com").unwrap();
        assert_eq!(
            d.ports,
            vec![
                PortRule::port(RuleProtocol::Tcp, 443),
                PortRule {
                    proto: RuleProtocol::Tcp,
                    lo: 8000,
                    hi: 8010
                }
            ]
        );
        assert_eq!(d.would_deny, None);
    }

    #[test]
    fn deny_rules_refuse_names_or_take_their_ports_and_audit_mode_forwards_the_rest() {
        let src = "tenant = \"acme\"\njob = \"build\"\n[[egress]]\nhost = \"*.example.com:0\"\n\
                   [[deny]]\nhost = \"tracker.example.com:0\"\nprotocol = \"any\"\n[[deny]]\nhost = \"api.example.com:22\"\n";
        for mode in ["enforce", "audit"] {
            let d = snas_policy::parse_policy(&format!("mode = \"{mode}\"\n{src}")).unwrap();
            let c = d.to_claims("jti-1", PolicySerial(1), SystemTime::now());
            let m = snas_policy::compile(&c);
            assert_eq!(
                name_decision(&m, "tracker.example.com"),
                Err((Refusal::DenyRule, Some(0))),
                "{mode}"
            );
            assert_eq!(
                name_decision(&m, "api.example.com").unwrap().ports,
                vec![
                    PortRule {
                        proto: RuleProtocol::Tcp,
                        lo: 1,
                        hi: 21
                    },
                    PortRule {
                        proto: RuleProtocol::Tcp,
                        lo: 23,
                        hi: 65535
                    }
                ]
            );
            let other = name_decision(&m, "www.example.org");
            if mode == "audit" {
                assert_eq!(
                    other,
                    Ok(NameDecision {
                        rules: vec![],
                        ports: vec![],
                        would_deny: Some(DenyReason::DestinationDenied)
                    })
                );
            } else {
                assert_eq!(other, Err((Refusal::Name, None)));
            }
        }
        assert_eq!(Refusal::DenyRule.name(), "deny_rule");
    }

    #[test]
    fn forwarded_query_carries_identity_and_question() {
        let q = query("api.example.com.", RecordType::A);
        let f = forward_query(
            &q,
            7,
            TenantId(0xA1B2_C3D4),
            JobKey(0x0102_0304_0506_0708),
            PolicySerial(9),
        );
        let bytes = f.to_vec().unwrap();
        let back = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            identity_of(&back),
            Some((
                TenantId(0xA1B2_C3D4),
                JobKey(0x0102_0304_0506_0708),
                PolicySerial(9)
            ))
        );
        assert_eq!(back.queries(), q.queries());
        assert_eq!(back.id(), 7);
    }
}
