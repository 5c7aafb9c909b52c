//! The proxy's DNS resolver (UDP and TCP on `resolver_listen`) and DNS bindings.
//!
//! # Contract (agent → proxy)
//! A query from a configured node carries EDNS0 option [`JOB_OPTION_CODE`] (65053) whose
//! 16-byte value is tenant_id u32 BE, job_key u64 BE, policy_serial u32 BE (as the GENEVE
//! option). The proxy answers **REFUSED** when the source is not a node, the option is missing
//! or malformed, the job's policy cannot be verified (fetched like the data path does), the
//! tenant differs, the query is not one A or AAAA question, or the policy refuses the name
//! (`Matcher::name_verdict`: no allow rule leaves it a port, audited `dns_refused`; or deny rules
//! take every port it had, audited `deny_rule` with the deny rule's index). In audit mode every
//! name resolves but those a deny rule takes entirely; the flows decide `would_deny`.
//!
//! Otherwise it resolves upstream with hickory-resolver configured with exactly the
//! `upstream_dns` servers (no system configuration, no search list; UDP with TCP fallback on
//! truncation; CNAME chains followed and returned) and answers NOERROR with the chain and the
//! addresses. NXDOMAIN and NODATA pass through; upstream failures answer SERVFAIL.
//!
//! # TTLs and bindings
//! Every answer TTL is clamped to [[`DNS_TTL_MIN`], [`DNS_TTL_MAX`]] and the answer carries the
//! clamped TTLs, so agent and proxy expire together. Each address is bound (job, address) →
//! queried name in the engine until `now + clamped TTL + `[`BINDING_GRACE`]: applications
//! commonly use an answer a little past its TTL (connection pools, happy eyeballs), and a
//! binding that expires first would turn such a connection into a `destination_denied`.
//! The same binding is pushed to every configured peer (`POST /v1/bindings`), which re-checks
//! it against the policy it verifies itself; the answer waits for the pushes (at most
//! [`PEER_SYNC_WAIT`]) because the job's first connection may land on a peer. A peer that
//! cannot verify the job's policy *yet* — its key is in the trust directory but the peer's
//! 500 ms trust poll has not loaded it (a key rotation) — answers 503, and the push is tried
//! again after each of [`PEER_RETRY_AFTER`] (in the background); any other refusal is final.
//!
//! # Limits
//! UDP answers larger than the client's EDNS payload size (512 without EDNS) are sent
//! truncated (TC bit, no records); the agent retries over TCP. One question per query.

use snas_wire::{JobKey, PolicySerial, TenantId};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{Name, TokioResolver};
use snas_wire::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::ProxyClient;
use crate::audit_log::flow_line;
use crate::metrics::add;
use crate::shared::Shared;
use crate::tier2::JobPolicy;
use snas_policy::audit::{Kind, Slot};

/// EDNS0 option code carrying the job identity.
pub const JOB_OPTION_CODE: u16 = 65053;
pub use snas_policy::binding::{BINDING_GRACE, DNS_TTL_MAX, DNS_TTL_MIN};
/// Timeout of a peer push.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an answer waits for its bindings to reach the peers: a job's first connection
/// often lands on a peer (flows spread over proxies by their 5-tuple), which must already
/// hold the binding, or it refuses the flow as `destination_denied`. A peer push takes a
/// round trip (plus, the first time, the peer's policy fetch): ~1-3 ms.
const PEER_SYNC_WAIT: Duration = Duration::from_millis(150);
/// A peer whose push failed is not waited for during this long (its pushes still go out).
const PEER_TROUBLE: Duration = Duration::from_secs(10);
/// Waits before each new try of a push the peer could not take yet (503): longer in all than
/// two of the peers' trust polls (`lifecycle::POLL`, 500 ms), so that a key just written to
/// its trust directory is loaded in between.
pub const PEER_RETRY_AFTER: [Duration; 3] = [
    Duration::from_millis(600),
    Duration::from_millis(1200),
    Duration::from_millis(2400),
];

pub use snas_policy::binding::clamp_ttl_secs as clamp_ttl;

/// The job identity of a query (EDNS option 65053).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobIdentity {
    /// Tenant id.
    pub tenant_id: TenantId,
    /// Job key.
    pub job_key: JobKey,
    /// Policy serial.
    pub serial: PolicySerial,
}

/// Reads the job identity from a query's EDNS options.
pub fn job_identity(msg: &Message) -> Option<JobIdentity> {
    let edns = msg.extensions().as_ref()?;
    match edns.options().get(EdnsCode::from(JOB_OPTION_CODE))? {
        EdnsOption::Unknown(_, v) if v.len() == 16 => Some(JobIdentity {
            tenant_id: TenantId(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            job_key: JobKey(u64::from_be_bytes([
                v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11],
            ])),
            serial: PolicySerial(u32::from_be_bytes([v[12], v[13], v[14], v[15]])),
        }),
        _ => None,
    }
}

/// The EDNS option carrying `id` (the agent's side of the contract; tests use it).
pub fn job_option(id: JobIdentity) -> EdnsOption {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&id.tenant_id.get().to_be_bytes());
    v.extend_from_slice(&id.job_key.get().to_be_bytes());
    v.extend_from_slice(&id.serial.get().to_be_bytes());
    EdnsOption::Unknown(JOB_OPTION_CODE, v)
}

/// The resolver's bound sockets (bound at start-up so errors surface there).
#[derive(Debug)]
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds UDP and TCP on `addr` (port 0: one port free for both; the UDP port the kernel picks
/// may be taken for TCP, so a few are tried).
pub fn bind(addr: SocketAddr) -> std::io::Result<Sockets> {
    let attempts = if addr.port() == 0 { 32 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(addr)?;
        match std::net::TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok(Sockets { udp, tcp });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

impl Sockets {
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// The upstream resolver: exactly the configured servers, UDP then TCP.
pub fn upstream(servers: &[SocketAddr]) -> TokioResolver {
    let mut cfg = ResolverConfig::new();
    for s in servers {
        cfg.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
        cfg.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
    }
    let mut opts = ResolverOpts::default();
    opts.ndots = 0;
    opts.preserve_intermediates = true;
    opts.edns0 = true;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.cache_size = 1024;
    TokioResolver::builder_with_config(cfg, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

#[derive(Debug)]
struct Ctx {
    shared: Arc<Shared>,
    upstream: TokioResolver,
    peer_secret: Option<Arc<str>>,
    /// Peers whose last push failed, and when.
    peer_trouble: Arc<std::sync::Mutex<std::collections::HashMap<Ipv4Addr, std::time::Instant>>>,
}

/// Starts the UDP and TCP servers on the current runtime.
pub fn spawn(
    sockets: Sockets,
    shared: Arc<Shared>,
    peer_secret: Option<Arc<str>>,
) -> std::io::Result<()> {
    let udp = tokio::net::UdpSocket::from_std(sockets.udp)?;
    let tcp = tokio::net::TcpListener::from_std(sockets.tcp)?;
    let ctx = Arc::new(Ctx {
        upstream: upstream(&shared.cfg.upstream_dns),
        shared,
        peer_secret,
        peer_trouble: Arc::default(),
    });
    tokio::spawn(serve_udp(Arc::new(udp), Arc::clone(&ctx)));
    tokio::spawn(serve_tcp(tcp, ctx));
    Ok(())
}

async fn serve_udp(sock: Arc<tokio::net::UdpSocket>, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "resolver UDP receive failed");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let sock = Arc::clone(&sock);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Some(resp) = handle(&ctx, src, &query, true).await {
                let _ = sock.send_to(&resp, src).await;
            }
        });
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((mut stream, src)) = listener.accept().await else {
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let work = async {
                loop {
                    let mut len = [0u8; 2];
                    stream.read_exact(&mut len).await?;
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    stream.read_exact(&mut q).await?;
                    if let Some(resp) = handle(&ctx, src, &q, false).await {
                        let Ok(l) = u16::try_from(resp.len()) else {
                            return Ok::<(), std::io::Error>(());
                        };
                        stream.write_all(&l.to_be_bytes()).await?;
                        stream.write_all(&resp).await?;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
        });
    }
}

fn reply_to(q: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(q.queries().iter().cloned());
    if q.extensions().is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn encode(m: &Message, q: &Message, udp: bool) -> Option<Vec<u8>> {
    let bytes = m.to_vec().ok()?;
    let limit = if q.extensions().is_some() {
        usize::from(q.max_payload().max(512))
    } else {
        512
    };
    if udp && bytes.len() > limit {
        let mut t = reply_to(q, m.response_code());
        t.set_truncated(true);
        return t.to_vec().ok();
    }
    Some(bytes)
}

/// Answers one query; `None` when the bytes are not a DNS query (no answer at all).
async fn handle(ctx: &Ctx, src: SocketAddr, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(bytes).ok()?;
    if q.message_type() != MessageType::Query {
        return None;
    }
    let m = &ctx.shared.metrics;
    let resp = match answer(ctx, src, &q).await {
        Ok(r) => {
            if r.response_code() == ResponseCode::ServFail {
                add(&m.dns_failed, 1);
            } else {
                add(&m.dns_answered, 1);
            }
            r
        }
        Err(why) => {
            tracing::debug!(%src, why, "DNS query refused");
            add(&m.dns_refused, 1);
            reply_to(&q, ResponseCode::Refused)
        }
    };
    encode(&resp, &q, udp)
}

/// The job's verified policy for a query from `node` carrying `id`.
async fn job_policy(ctx: &Ctx, node: Ipv4Addr, id: JobIdentity) -> Result<Arc<JobPolicy>, Reason> {
    let p = ctx.shared.fetcher.ensure(id.job_key, node).await?;
    if p.tenant_id != id.tenant_id {
        return Err(Reason::GeneveUnknownJob);
    }
    if id.serial > p.serial {
        // A newer policy exists on the node: refresh in the background.
        ctx.shared.fetcher.request_refetch(id.job_key, node);
    }
    Ok(p)
}

async fn answer(ctx: &Ctx, src: SocketAddr, q: &Message) -> Result<Message, &'static str> {
    let node = match src.ip() {
        IpAddr::V4(a) if ctx.shared.cfg.nodes.contains(&a) => a,
        _ => return Err("source is not a configured node"),
    };
    let id = job_identity(q).ok_or("no job option")?;
    let policy = job_policy(ctx, node, id)
        .await
        .map_err(|_| "job policy not verified")?;
    let [question] = q.queries() else {
        return Err("not exactly one question");
    };
    let rtype = question.query_type();
    if !matches!(rtype, RecordType::A | RecordType::AAAA) {
        return Err("only A and AAAA are answered");
    }
    let name = question.name().to_ascii();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if let snas_policy::NameVerdict::Deny(why) = policy.matcher.name_verdict(&name) {
        audit_refusal(ctx, &policy, &name, why);
        return Err("name not allowed by the policy");
    }
    let fqdn = Name::from_ascii(format!("{name}.")).map_err(|_| "bad name")?;
    let mut resp = reply_to(q, ResponseCode::NoError);
    match ctx.upstream.lookup(fqdn, rtype).await {
        Ok(lookup) => {
            let mut addrs = Vec::new();
            let mut min_ttl = DNS_TTL_MAX.as_secs() as u32;
            let mut records: Vec<Record> = Vec::new();
            for r in lookup.records() {
                let mut r = r.clone();
                let ttl = clamp_ttl(r.ttl());
                r.set_ttl(ttl);
                match r.data() {
                    RData::A(a) => {
                        addrs.push(IpAddr::V4(a.0));
                        min_ttl = min_ttl.min(ttl);
                    }
                    RData::AAAA(a) => {
                        addrs.push(IpAddr::V6(a.0));
                        min_ttl = min_ttl.min(ttl);
                    }
                    _ => {}
                }
                records.push(r);
            }
            resp.add_answers(records);
            if !addrs.is_empty() {
                bind_addrs(&ctx.shared, policy.job_key, &name, &addrs, min_ttl);
                push_to_peers(ctx, policy.job_key, node, &name, &addrs, min_ttl).await;
            }
        }
        Err(e) if e.is_nx_domain() => {
            resp.set_response_code(ResponseCode::NXDomain);
        }
        Err(e) if e.is_no_records_found() => {}
        Err(e) => {
            tracing::warn!(error = %e, %name, "upstream resolution failed");
            resp.set_response_code(ResponseCode::ServFail);
        }
    }
    Ok(resp)
}

/// Audits a refused name: `dns_refused`, or `deny_rule` with the deny rule's index.
fn audit_refusal(ctx: &Ctx, p: &JobPolicy, name: &str, why: snas_policy::DenyReason) {
    let now = ctx.shared.now();
    let Some(suppressed) = ctx.shared.engine().admit_audit(p.job_key, now.mono) else {
        return;
    };
    let r = crate::tier2::AuditRecord {
        unix_secs: now.unix_secs,
        action: crate::tier2::Action::Refuse,
        reason: Some(match why {
            snas_policy::DenyReason::DenyRule(_) => Reason::DenyRule,
            _ => Reason::DnsRefused,
        }),
        tenant: Arc::clone(&p.tenant),
        job: Arc::clone(&p.job),
        job_key: p.job_key,
        proto: snas_wire::L4Proto::Udp,
        src: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        dst: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        hostname: Some(Arc::from(name)),
        rule: match why {
            snas_policy::DenyReason::DenyRule(n) => Some(n),
            _ => None,
        },
        egress: None,
        bytes: 0,
        suppressed,
    };
    let mut line = flow_line(&r);
    line.kind = Some(Kind::Dns);
    line.proto = "dns".into();
    line.src = Slot::Absent;
    line.dst = Slot::Absent;
    line.port = Slot::Absent;
    ctx.shared.audit.send(line);
}

/// Binds every address to `name` for `job` in the engine until now + TTL + grace.
pub fn bind_addrs(shared: &Shared, job: JobKey, name: &str, addrs: &[IpAddr], ttl_secs: u32) {
    let ttl = Duration::from_secs(u64::from(clamp_ttl(ttl_secs)));
    let expires = shared.clock_now().saturating_add(ttl + BINDING_GRACE);
    let mut eng = shared.engine();
    for a in addrs {
        let _ = eng.bindings_mut().bind(job, *a, name, expires);
    }
}

pub use crate::api::types::PeerBinding;

/// Why a peer binding was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PeerBindingError {
    /// the node is not one of ours
    #[error("node {0} is not a configured node")]
    Node(Ipv4Addr),
    /// the policy could not be verified
    #[error("policy of job {0} not verified: {1}")]
    Policy(JobKey, &'static str),
    /// the policy does not allow the name
    #[error("name {0:?} not allowed by the job's policy")]
    Name(String),
}

impl PeerBindingError {
    /// Whether the pushing proxy should try again shortly: the policy is signed by a key this
    /// proxy does not trust yet (a new key it has not loaded; its trust poll runs every 500 ms).
    pub fn retry_later(&self) -> bool {
        matches!(self, PeerBindingError::Policy(_, r) if *r == Reason::KeyUntrusted.name())
    }
}

/// Checks a peer's binding against the job's policy (fetched and verified here) and binds it.
/// Returns the number of addresses bound.
pub async fn apply_peer_binding(
    shared: &Shared,
    b: &PeerBinding,
) -> Result<usize, PeerBindingError> {
    let job = b.job_key;
    if !shared.cfg.nodes.contains(&b.node) {
        return Err(PeerBindingError::Node(b.node));
    }
    let p = shared
        .fetcher
        .ensure(job, b.node)
        .await
        .map_err(|r| PeerBindingError::Policy(job, r.name()))?;
    let name = b.name.trim_end_matches('.').to_ascii_lowercase();
    if !p.matcher.name_allowed(&name) {
        return Err(PeerBindingError::Name(name));
    }
    bind_addrs(shared, job, &name, &b.addrs, b.ttl_secs);
    add(&shared.metrics.peer_bindings, 1);
    Ok(b.addrs.len())
}

/// Pushes the binding to every peer and returns once the peers that are not known to be in
/// trouble have it (or after [`PEER_SYNC_WAIT`]), so that the answer reaches the job only when
/// every proxy its flows may land on can allow them. Pushes that take longer finish in the
/// background.
async fn push_to_peers(
    ctx: &Ctx,
    job: JobKey,
    node: Ipv4Addr,
    name: &str,
    addrs: &[IpAddr],
    ttl: u32,
) {
    let (Some(secret), false) = (&ctx.peer_secret, ctx.shared.cfg.peers.is_empty()) else {
        return;
    };
    let body = Arc::new(PeerBinding {
        job_key: job,
        node,
        name: name.to_owned(),
        addrs: addrs.to_vec(),
        ttl_secs: ttl,
    });
    let port = ctx.shared.cfg.service_addr().port();
    let deadline = tokio::time::Instant::now() + PEER_SYNC_WAIT;
    let mut waited = Vec::new();
    for peer in &ctx.shared.cfg.peers {
        let addr = SocketAddr::from((*peer, port));
        let client = ProxyClient::new(addr)
            .with_timeout(PEER_TIMEOUT)
            .with_token(Arc::clone(secret));
        let body = Arc::clone(&body);
        let trouble = Arc::clone(&ctx.peer_trouble);
        let peer = *peer;
        let in_trouble = trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&peer)
            .is_some_and(|t| t.elapsed() < PEER_TROUBLE);
        let push = tokio::spawn(async move {
            let mut r = client.push_binding(&body).await;
            for wait in PEER_RETRY_AFTER {
                match &r {
                    Err(e) if e.status() == Some(503) => {
                        tracing::debug!(%addr, error = %e, ?wait, "peer cannot take the binding yet; trying again");
                        tokio::time::sleep(wait).await;
                        r = client.push_binding(&body).await;
                    }
                    _ => break,
                }
            }
            match &r {
                Ok(()) => {}
                Err(e) if e.status().is_some() => {
                    tracing::warn!(%addr, error = %e, "peer refused binding")
                }
                Err(e) => tracing::warn!(%addr, error = %e, "binding push failed"),
            }
            let mut t = trouble
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if r.is_ok() {
                t.remove(&peer);
            } else {
                t.insert(peer, std::time::Instant::now());
            }
        });
        if !in_trouble {
            waited.push(push);
        }
    }
    for push in waited {
        if tokio::time::timeout_at(deadline, push).await.is_err() {
            tracing::debug!("a binding push outlasted the answer's wait; it goes on");
            break;
        }
    }
}
