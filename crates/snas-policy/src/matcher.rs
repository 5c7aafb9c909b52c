//! The compiled matcher: (host name or IP, port, transport) → allow with a rule index, or deny
//! with a reason.
//!
//! # Semantics
//! - Rules are numbered from 0 in policy order. When several rules match, the lowest index that
//!   also allows the port and transport wins (so the reported rule is deterministic).
//! - Host names: exact rules, wildcard rules and `0.0.0.0` rules. A name that matches some rule
//!   but on no allowed port/transport is `PortDenied`; otherwise `DestinationDenied` (also for
//!   names that are not valid DNS host names).
//! - `0.0.0.0` is a *name* rule (Snowflake's HOST_PORT: any host name, on 80/443): any name
//!   passes [`Matcher::check_host`] and [`Matcher::name_allowed`], and the addresses it resolves
//!   to pass [`Matcher::check_resolved`]; a raw address does not ([`Matcher::check_ip`] consults
//!   `cidr` rules only). This is what both tiers can enforce: tier 1 opens only addresses the
//!   job resolved through DNS, and tier 2 checks the name on the wire.
//! - Infrastructure first: an address inside the infrastructure ranges given to [`compile_with`]
//!   (underlay, node and proxy addresses, management networks, egress pools, metadata — the
//!   configured set of the agent or proxy) is `Infrastructure` (drop reason
//!   `infrastructure_denied`) in [`Matcher::check_ip`] and [`Matcher::check_resolved`], before
//!   any rule is looked at: no rule opens it, `allow_private` or not, `0.0.0.0/0` included.
//! - IP addresses: `cidr` rules only. Addresses in [`crate::ranges::ALWAYS_DENIED`] are
//!   `AlwaysDenied` unless a `cidr` rule with `allow_private = true` covers them.
//! - An address reached through a name (tier 2: the proxy resolved name N and bound the address)
//!   is checked with [`Matcher::check_resolved`]: the address must not be infrastructure, nor
//!   always-denied (unless an `allow_private` cidr rule allows it), and then the name or the
//!   address must be allowed.
//! - **Deny rules** (`[[deny]]`, numbered from 0 on their own) are checked after infrastructure
//!   and before everything else: a deny rule that matches the destination on this
//!   port/transport decides `DenyRule(n)` (drop reason `deny_rule`), whatever allow rule also
//!   matches, `allow_private` included. A deny `cidr` rule covers every address in it, however
//!   the job reached it (raw, or through any name). A deny `host` rule covers the *name*: an
//!   address reached through a denied name is denied for that name, but the same address bound
//!   from another, allowed name stays allowed for that name (tier 2 checks each name bound to
//!   the address; only a deny `cidr` rule denies the address itself).
//! - Names for DNS ([`Matcher::name_verdict`]): a name resolves when some allow rule names it
//!   on a port/transport no deny rule takes away; the tier-1 binding carries exactly those
//!   ports ([`NameVerdict`]).
//! - **Audit mode** ([`Mode::Audit`]): a decision that would be `DestinationDenied` or
//!   `PortDenied` becomes [`Decision::WouldDeny`] (let through, audited `would_deny`);
//!   infrastructure, always-denied and deny-rule decisions are never relaxed, so audit mode
//!   never opens infrastructure, private ranges or metadata, and deny rules keep denying.
//!   Invalid names stay denied (nothing can resolve them).
//!
//! # Cost
//! Exact names: one hash lookup. Wildcards: indexed by the labels after the wildcard label, so a
//! lookup does one hash probe per label of the name and then checks only the patterns under that
//! parent (a policy with thousands of wildcards under the *same* parent scans them all). CIDRs: one
//! hash map per prefix length present, so at most 33 (IPv4) or 129 (IPv6) probes. Infrastructure
//! ranges are indexed the same way, so a set of thousands of node and proxy addresses costs one
//! probe per distinct prefix length, not one comparison per range. No allocation per lookup
//! (except [`Matcher::host_rules_for_name`], which returns a `Vec`).

use crate::claims::{Mode, PolicyClaims};
use crate::hostport::{normalize_name, HostPattern, HostPorts, PortRange, MAX_NAME_LEN};
use crate::ranges;
use crate::rules::{DenyRule, EgressRule, RuleProtocol, Transport};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

/// Why a destination was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No rule names this destination.
    DestinationDenied,
    /// Some rule names it, but not on this port/transport.
    PortDenied,
    /// An always-denied range that no `allow_private` cidr rule opens.
    AlwaysDenied,
    /// An infrastructure range given to [`compile_with`]: no rule opens it.
    Infrastructure,
    /// Deny rule `n` (index into the policy's `deny`) matches the destination.
    DenyRule(usize),
}

impl DenyReason {
    /// The shared drop reason.
    pub const fn reason(self) -> snas_wire::Reason {
        match self {
            DenyReason::DestinationDenied => snas_wire::Reason::DestinationDenied,
            DenyReason::PortDenied => snas_wire::Reason::PortDenied,
            DenyReason::AlwaysDenied => snas_wire::Reason::AlwaysDenied,
            DenyReason::Infrastructure => snas_wire::Reason::InfrastructureDenied,
            DenyReason::DenyRule(_) => snas_wire::Reason::DenyRule,
        }
    }

    /// Whether audit mode lets a destination denied for this reason through (only "no rule
    /// allows it": never infrastructure, always-denied ranges or a deny rule).
    pub const fn audit_relaxes(self) -> bool {
        matches!(self, DenyReason::DestinationDenied | DenyReason::PortDenied)
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason().name())
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Allowed by rule `rule` (index into the policy's `egress`).
    Allow {
        /// Rule index.
        rule: usize,
    },
    /// Audit mode: no rule allows it (the reason it would be denied for), let through and
    /// audited `would_deny`.
    WouldDeny(DenyReason),
    /// Denied.
    Deny(DenyReason),
}

impl Decision {
    /// Whether allowed by a rule.
    pub const fn is_allow(self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// Whether the traffic passes: allowed by a rule, or let through by audit mode.
    pub const fn passes(self) -> bool {
        matches!(self, Decision::Allow { .. } | Decision::WouldDeny(_))
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { rule } => write!(f, "allow rule {rule}"),
            Decision::WouldDeny(r) => write!(f, "would_deny {r}"),
            Decision::Deny(DenyReason::DenyRule(n)) => write!(f, "deny deny_rule {n}"),
            Decision::Deny(r) => write!(f, "deny {r}"),
        }
    }
}

/// A fast hasher for integer keys (splitmix64 finaliser). Keys come from signed policies and
/// packet addresses are only probed, never inserted, so collision flooding is not a concern.
#[derive(Debug, Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .rotate_left(23)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// The infrastructure ranges, indexed by prefix length (longest first).
#[derive(Debug, Clone, Default)]
struct InfraSet {
    v4: Vec<(u8, IntMap<u32, ()>)>,
    v6: Vec<(u8, IntMap<u128, ()>)>,
}

impl InfraSet {
    fn new(nets: &[IpNet]) -> InfraSet {
        let mut v4: [Option<IntMap<u32, ()>>; 33] = std::array::from_fn(|_| None);
        let mut v6: Vec<Option<IntMap<u128, ()>>> = (0..=128).map(|_| None).collect();
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => {
                    v4[usize::from(n.prefix_len())]
                        .get_or_insert_with(IntMap::default)
                        .insert(u32::from(n.network()), ());
                }
                IpNet::V6(n) => {
                    v6[usize::from(n.prefix_len())]
                        .get_or_insert_with(IntMap::default)
                        .insert(u128::from(n.network()), ());
                }
            }
        }
        InfraSet {
            v4: by_longest_prefix(v4),
            v6: by_longest_prefix(v6),
        }
    }

    /// The most specific range containing `ip`.
    fn find(&self, ip: IpAddr) -> Option<IpNet> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, set)| {
                    let key = a & mask4(*len);
                    set.contains_key(&key)
                        .then(|| Ipv4Net::new(key.into(), *len).ok().map(IpNet::V4))
                        .flatten()
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, set)| {
                    let key = a & mask6(*len);
                    set.contains_key(&key)
                        .then(|| Ipv6Net::new(key.into(), *len).ok().map(IpNet::V6))
                        .flatten()
                })
            }
        }
    }
}

/// Per-prefix-length tables → the lengths present, longest first (the most specific probes are
/// the likeliest hits in practice).
fn by_longest_prefix<T>(tables: impl IntoIterator<Item = Option<T>>) -> Vec<(u8, T)> {
    let mut out: Vec<(u8, T)> = tables
        .into_iter()
        .enumerate()
        .filter_map(|(len, t)| t.map(|t| (len as u8, t)))
        .collect();
    out.reverse();
    out
}

#[derive(Debug, Clone, Copy)]
struct RuleInfo {
    ports: HostPorts,
    protocol: RuleProtocol,
    allow_private: bool,
}

impl RuleInfo {
    fn allows(&self, port: u16, t: Transport) -> bool {
        self.ports.contains(port) && self.protocol.allows(t.into())
    }
}

#[derive(Debug, Clone)]
struct WildEntry {
    rule: u32,
    before: Box<str>,
    prefix: Box<str>,
    suffix: Box<str>,
}

impl WildEntry {
    /// `head` is the name minus `.parent`.
    fn matches_head(&self, head: &str) -> bool {
        let Some(label) = head.strip_prefix(&*self.before) else {
            return false;
        };
        !label.is_empty()
            && !label.contains('.')
            && label.len() >= self.prefix.len() + self.suffix.len()
            && label.starts_with(&*self.prefix)
            && label.ends_with(&*self.suffix)
    }
}

/// Lowest allowing rule and whether anything matched the destination at all.
#[derive(Default)]
struct Best {
    rule: Option<u32>,
    matched: bool,
}

impl Best {
    fn consider(&mut self, set: &RuleSet, rule: u32, port: u16, t: Transport) {
        self.matched = true;
        if self.rule.is_none_or(|b| rule < b) && set.rules[rule as usize].allows(port, t) {
            self.rule = Some(rule);
        }
    }

    fn decision(&self, otherwise: DenyReason) -> Decision {
        match self.rule {
            Some(r) => Decision::Allow { rule: r as usize },
            None if self.matched => Decision::Deny(DenyReason::PortDenied),
            None => Decision::Deny(otherwise),
        }
    }
}

/// One indexed list of rules (the allow rules, or the deny rules).
#[derive(Debug, Clone, Default)]
struct RuleSet {
    rules: Vec<RuleInfo>,
    exact: HashMap<Box<str>, Vec<u32>>,
    wild: HashMap<Box<str>, Vec<WildEntry>>,
    any_host: Vec<u32>,
    v4: Vec<(u8, IntMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, IntMap<u128, Vec<u32>>)>,
}

/// A compiled policy (see module docs).
#[derive(Debug, Clone)]
pub struct Matcher {
    allow: RuleSet,
    deny: RuleSet,
    infra: InfraSet,
    mode: Mode,
}

/// Compiles the claims' rules.
pub fn compile(claims: &PolicyClaims) -> Matcher {
    compile_with(claims, &[])
}

/// Compiles the claims' rules, denying `infra` ranges (underlay, node and proxy addresses,
/// management networks, egress pools, metadata) as [`DenyReason::Infrastructure`] regardless of
/// any rule. Host bits of `infra` entries are ignored (`192.0.2.7/24` is `192.0.2.0/24`).
pub fn compile_with(claims: &PolicyClaims, infra: &[IpNet]) -> Matcher {
    compile_policy(&claims.egress, &claims.deny, claims.mode, infra)
}

/// Compiles an allow rule list alone (enforce mode, no deny rules).
pub fn compile_rules(egress: &[EgressRule], infra: &[IpNet]) -> Matcher {
    compile_policy(egress, &[], Mode::Enforce, infra)
}

/// Compiles allow rules, deny rules and the mode (what [`compile_with`] does with a policy).
pub fn compile_policy(
    egress: &[EgressRule],
    deny: &[DenyRule],
    mode: Mode,
    infra: &[IpNet],
) -> Matcher {
    Matcher {
        allow: RuleSet::new(egress.iter()),
        deny: RuleSet::new(deny.iter().map(DenyRule::rule)),
        infra: InfraSet::new(infra),
        mode,
    }
}

impl RuleSet {
    fn new<'a>(list: impl ExactSizeIterator<Item = &'a EgressRule>) -> RuleSet {
        let mut m = RuleSet {
            rules: Vec::with_capacity(list.len()),
            ..RuleSet::default()
        };
        let mut v4: [Option<IntMap<u32, Vec<u32>>>; 33] = std::array::from_fn(|_| None);
        let mut v6: Vec<Option<IntMap<u128, Vec<u32>>>> = (0..=128).map(|_| None).collect();
        for (i, rule) in list.enumerate() {
            let idx = i as u32;
            match rule {
                EgressRule::Host { host, protocol, .. } => {
                    m.rules.push(RuleInfo {
                        ports: host.ports,
                        protocol: *protocol,
                        allow_private: false,
                    });
                    match &host.pattern {
                        HostPattern::AnyHost => m.any_host.push(idx),
                        HostPattern::Exact(n) => {
                            m.exact.entry(n.as_str().into()).or_default().push(idx)
                        }
                        HostPattern::Wildcard(w) => m
                            .wild
                            .entry(w.parent.as_str().into())
                            .or_default()
                            .push(WildEntry {
                                rule: idx,
                                before: w.before.as_str().into(),
                                prefix: w.prefix.as_str().into(),
                                suffix: w.suffix.as_str().into(),
                            }),
                    }
                }
                EgressRule::Cidr {
                    cidr,
                    ports,
                    protocol,
                    allow_private,
                } => {
                    m.rules.push(RuleInfo {
                        ports: HostPorts::Range(*ports),
                        protocol: *protocol,
                        allow_private: *allow_private,
                    });
                    match cidr {
                        IpNet::V4(n) => {
                            let key = u32::from(n.network());
                            v4[usize::from(n.prefix_len())]
                                .get_or_insert_with(IntMap::default)
                                .entry(key)
                                .or_default()
                                .push(idx);
                        }
                        IpNet::V6(n) => {
                            let key = u128::from(n.network());
                            v6[usize::from(n.prefix_len())]
                                .get_or_insert_with(IntMap::default)
                                .entry(key)
                                .or_default()
                                .push(idx);
                        }
                    }
                }
            }
        }
        m.v4 = by_longest_prefix(v4);
        m.v6 = by_longest_prefix(v6);
        m
    }
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl RuleSet {
    fn for_each_name_rule(&self, name: &str, mut f: impl FnMut(u32)) {
        if let Some(v) = self.exact.get(name) {
            v.iter().for_each(|&r| f(r));
        }
        if !self.wild.is_empty() {
            for (i, b) in name.bytes().enumerate() {
                if b != b'.' {
                    continue;
                }
                let parent = &name[i + 1..];
                if !parent.contains('.') {
                    // Wildcard parents have at least two labels.
                    break;
                }
                if let Some(entries) = self.wild.get(parent) {
                    let head = &name[..i];
                    entries
                        .iter()
                        .filter(|e| e.matches_head(head))
                        .for_each(|e| f(e.rule));
                }
            }
        }
        self.any_host.iter().for_each(|&r| f(r));
    }

    fn for_each_cidr_rule(&self, ip: IpAddr, mut f: impl FnMut(u32)) {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for (len, map) in &self.v4 {
                    if let Some(v) = map.get(&(a & mask4(*len))) {
                        v.iter().for_each(|&r| f(r));
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for (len, map) in &self.v6 {
                    if let Some(v) = map.get(&(a & mask6(*len))) {
                        v.iter().for_each(|&r| f(r));
                    }
                }
            }
        }
    }

    /// The lowest rule matching the (normalised) name on this port/transport.
    fn name_hit(&self, name: &str, port: u16, t: Transport) -> Option<usize> {
        let mut best = Best::default();
        self.for_each_name_rule(name, |r| best.consider(self, r, port, t));
        best.rule.map(|r| r as usize)
    }

    /// The lowest cidr rule covering `ip` on this port/transport.
    fn cidr_hit(&self, ip: IpAddr, port: u16, t: Transport) -> Option<usize> {
        let mut best = Best::default();
        self.for_each_cidr_rule(ip, |r| best.consider(self, r, port, t));
        best.rule.map(|r| r as usize)
    }

    /// The ports (per transport) of every rule whose host part matches the name, and the
    /// lowest such rule.
    fn name_ports(&self, name: &str) -> (PortSet, Option<usize>, Vec<usize>) {
        let mut set = PortSet::default();
        let mut rules = Vec::new();
        self.for_each_name_rule(name, |r| {
            rules.push(r as usize);
            let info = &self.rules[r as usize];
            let ranges: &[PortRange] = match info.ports {
                HostPorts::Range(ref p) => std::slice::from_ref(p),
                HostPorts::HttpAndHttps => &[PortRange::HTTP, PortRange::HTTPS],
            };
            for range in ranges {
                set.add(info.protocol, *range);
            }
        });
        rules.sort_unstable();
        rules.dedup();
        (set, rules.first().copied(), rules)
    }
}

/// Sorted, merged inclusive port intervals of one transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Intervals(Vec<(u16, u16)>);

impl Intervals {
    fn add(&mut self, lo: u16, hi: u16) {
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(self.0.len());
        for &(l, h) in &self.0 {
            match out.last_mut() {
                Some(last) if u32::from(l) <= u32::from(last.1) + 1 => last.1 = last.1.max(h),
                _ => out.push((l, h)),
            }
        }
        self.0 = out;
    }

    fn remove(&mut self, other: &Intervals) {
        let mut cur = std::mem::take(&mut self.0);
        for &(dl, dh) in &other.0 {
            let mut next = Vec::with_capacity(cur.len() + 1);
            for (l, h) in cur {
                if dh < l || dl > h {
                    next.push((l, h));
                    continue;
                }
                if dl > l {
                    next.push((l, dl - 1));
                }
                if dh < h {
                    next.push((dh + 1, h));
                }
            }
            cur = next;
        }
        self.0 = cur;
    }

    fn is_all(&self) -> bool {
        self.0 == [(PortRange::ALL.lo(), PortRange::ALL.hi())]
    }
}

/// Ports per transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortSet {
    tcp: Intervals,
    udp: Intervals,
}

impl PortSet {
    fn add(&mut self, p: RuleProtocol, r: PortRange) {
        if matches!(p, RuleProtocol::Tcp | RuleProtocol::Any) {
            self.tcp.add(r.lo(), r.hi());
        }
        if matches!(p, RuleProtocol::Udp | RuleProtocol::Any) {
            self.udp.add(r.lo(), r.hi());
        }
    }

    fn remove(&mut self, other: &PortSet) {
        self.tcp.remove(&other.tcp);
        self.udp.remove(&other.udp);
    }

    fn is_empty(&self) -> bool {
        self.tcp.0.is_empty() && self.udp.0.is_empty()
    }

    /// As rules: a range open on both transports is one `any` rule.
    fn to_rules(&self) -> Vec<(RuleProtocol, PortRange)> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.tcp.0 {
            let p = if self.udp.0.contains(&(lo, hi)) {
                RuleProtocol::Any
            } else {
                RuleProtocol::Tcp
            };
            out.extend(PortRange::new(lo, hi).map(|r| (p, r)));
        }
        for &(lo, hi) in &self.udp.0 {
            if !self.tcp.0.contains(&(lo, hi)) {
                out.extend(PortRange::new(lo, hi).map(|r| (RuleProtocol::Udp, r)));
            }
        }
        out.sort_by_key(|(p, r)| (*r, p.name()));
        out
    }
}

/// What DNS does with a name ([`Matcher::name_verdict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Resolve and bind the answers on `ports`: the allow rules naming it (ascending) minus
    /// what deny rules take away.
    Allow {
        /// Allow rules whose host part matches the name, ascending.
        rules: Vec<usize>,
        /// The ports each transport keeps (a range open on both is one `any` entry).
        ports: Vec<(RuleProtocol, PortRange)>,
    },
    /// Audit mode: no allow rule leaves the name a port, but the name resolves (audited
    /// `would_deny` for `reason`); nothing is bound for it.
    WouldDeny(DenyReason),
    /// Refused: `DenyRule(n)` when deny rules take every port the name had (enforce), or every
    /// port of both transports (audit); `DestinationDenied` when no rule names it or the name
    /// is invalid.
    Deny(DenyReason),
}

impl Matcher {
    /// Number of allow rules.
    pub fn len(&self) -> usize {
        self.allow.rules.len()
    }

    /// Whether the policy has no allow rules (everything is denied, or audited in audit mode).
    pub fn is_empty(&self) -> bool {
        self.allow.rules.is_empty()
    }

    /// Number of deny rules.
    pub fn deny_len(&self) -> usize {
        self.deny.rules.len()
    }

    /// The policy's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Audit mode turns "no rule allows it" into [`Decision::WouldDeny`].
    fn relax(&self, d: Decision) -> Decision {
        match d {
            Decision::Deny(r) if self.mode == Mode::Audit && r.audit_relaxes() => {
                Decision::WouldDeny(r)
            }
            d => d,
        }
    }

    /// Checks a host name (case-insensitive, trailing dot ignored): a deny rule naming it on
    /// this port/transport first, then the allow rules.
    pub fn check_host(&self, name: &str, port: u16, t: Transport) -> Decision {
        let mut buf = [0u8; MAX_NAME_LEN];
        let Some(name) = normalize_name(name, &mut buf) else {
            return Decision::Deny(DenyReason::DestinationDenied);
        };
        self.relax(self.check_name(name, port, t))
    }

    /// [`Matcher::check_host`] of a normalised name, enforce mode.
    fn check_name(&self, name: &str, port: u16, t: Transport) -> Decision {
        if let Some(n) = self.deny.name_hit(name, port, t) {
            return Decision::Deny(DenyReason::DenyRule(n));
        }
        let mut best = Best::default();
        self.allow
            .for_each_name_rule(name, |r| best.consider(&self.allow, r, port, t));
        best.decision(DenyReason::DestinationDenied)
    }

    /// Indices of the allow rules whose host part matches `name` (any port), ascending. Empty
    /// for invalid names.
    pub fn host_rules_for_name(&self, name: &str) -> Vec<usize> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let mut out = Vec::new();
        if let Some(name) = normalize_name(name, &mut buf) {
            self.allow
                .for_each_name_rule(name, |r| out.push(r as usize));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Indices of the deny rules whose host part matches `name` (any port), ascending.
    pub fn deny_rules_for_name(&self, name: &str) -> Vec<usize> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let mut out = Vec::new();
        if let Some(name) = normalize_name(name, &mut buf) {
            self.deny.for_each_name_rule(name, |r| out.push(r as usize));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// What DNS does with `name` (see [`NameVerdict`] and the module docs).
    pub fn name_verdict(&self, name: &str) -> NameVerdict {
        let mut buf = [0u8; MAX_NAME_LEN];
        let Some(name) = normalize_name(name, &mut buf) else {
            return NameVerdict::Deny(DenyReason::DestinationDenied);
        };
        let (mut ports, _, rules) = self.allow.name_ports(name);
        let (denied, first_deny, _) = self.deny.name_ports(name);
        ports.remove(&denied);
        if !ports.is_empty() {
            return NameVerdict::Allow {
                rules,
                ports: ports.to_rules(),
            };
        }
        let enforce = match (first_deny, rules.is_empty()) {
            (Some(n), false) => DenyReason::DenyRule(n),
            _ => DenyReason::DestinationDenied,
        };
        match (self.mode, first_deny) {
            (Mode::Audit, Some(n)) if denied.tcp.is_all() && denied.udp.is_all() => {
                NameVerdict::Deny(DenyReason::DenyRule(n))
            }
            (Mode::Audit, _) => NameVerdict::WouldDeny(enforce),
            (Mode::Enforce, _) => NameVerdict::Deny(enforce),
        }
    }

    /// Whether `name` resolves (allowed on some port, or let through by audit mode).
    pub fn name_allowed(&self, name: &str) -> bool {
        !matches!(self.name_verdict(name), NameVerdict::Deny(_))
    }

    /// The infrastructure or always-denied range containing `ip` (infrastructure first: it
    /// decides), with its label (for explanations), ignoring rules. Infrastructure ranges are
    /// labelled `"infrastructure"`.
    pub fn denied_range(&self, ip: IpAddr) -> Option<(IpNet, &'static str)> {
        if let Some(n) = self.infra.find(ip) {
            return Some((n, "infrastructure"));
        }
        ranges::always_denied(ip).map(|r| (r.net, r.label))
    }

    /// Checks a destination address reached without a name: infrastructure first, then deny
    /// `cidr` rules, then allow `cidr` rules (see module docs; `0.0.0.0` rules allow names, not
    /// raw addresses).
    pub fn check_ip(&self, ip: IpAddr, port: u16, t: Transport) -> Decision {
        self.relax(self.check_addr(ip, port, t))
    }

    /// [`Matcher::check_ip`], enforce mode.
    fn check_addr(&self, ip: IpAddr, port: u16, t: Transport) -> Decision {
        if self.infra.find(ip).is_some() {
            return Decision::Deny(DenyReason::Infrastructure);
        }
        if let Some(n) = self.deny.cidr_hit(ip, port, t) {
            return Decision::Deny(DenyReason::DenyRule(n));
        }
        let private = ranges::always_denied(ip).is_some();
        let mut best = Best::default();
        self.allow.for_each_cidr_rule(ip, |r| {
            if !private || self.allow.rules[r as usize].allow_private {
                best.consider(&self.allow, r, port, t);
            }
        });
        best.decision(if private {
            DenyReason::AlwaysDenied
        } else {
            DenyReason::DestinationDenied
        })
    }

    /// Checks an address the proxy resolved from `name` (tier 2): an infrastructure address is
    /// `Infrastructure`; a deny rule on the address or on the name decides `DenyRule`; an
    /// always-denied address is decided by [`Matcher::check_ip`] alone (only `allow_private`
    /// cidr rules open it); otherwise the name or the address must be allowed on this
    /// port/transport.
    pub fn check_resolved(&self, name: &str, ip: IpAddr, port: u16, t: Transport) -> Decision {
        if self.infra.find(ip).is_some() {
            return Decision::Deny(DenyReason::Infrastructure);
        }
        if let Some(n) = self.deny.cidr_hit(ip, port, t) {
            return Decision::Deny(DenyReason::DenyRule(n));
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        let norm = normalize_name(name, &mut buf);
        if let Some(n) = norm.and_then(|name| self.deny.name_hit(name, port, t)) {
            return Decision::Deny(DenyReason::DenyRule(n));
        }
        if ranges::always_denied(ip).is_some() {
            return self.check_addr(ip, port, t);
        }
        let by_name = norm.map_or(Decision::Deny(DenyReason::DestinationDenied), |n| {
            self.check_name(n, port, t)
        });
        let by_ip = self.check_addr(ip, port, t);
        self.relax(match (by_name, by_ip) {
            (Decision::Allow { rule: a }, Decision::Allow { rule: b }) => {
                Decision::Allow { rule: a.min(b) }
            }
            (d @ Decision::Allow { .. }, _) | (_, d @ Decision::Allow { .. }) => d,
            (Decision::Deny(DenyReason::PortDenied), _)
            | (_, Decision::Deny(DenyReason::PortDenied)) => Decision::Deny(DenyReason::PortDenied),
            _ => Decision::Deny(DenyReason::DestinationDenied),
        })
    }

    /// Checks only the port/transport of allow rule `rule` (for callers that already know
    /// which rule matched the destination). An unknown index is `DestinationDenied`.
    pub fn check_port_for_rule(&self, rule: usize, port: u16, t: Transport) -> Decision {
        match self.allow.rules.get(rule) {
            None => Decision::Deny(DenyReason::DestinationDenied),
            Some(r) if r.allows(port, t) => Decision::Allow { rule },
            Some(_) => Decision::Deny(DenyReason::PortDenied),
        }
    }

    /// The ports allow rule `rule` allows: one range, or 80 and 443 for bare `0.0.0.0`.
    pub fn rule_ports(&self, rule: usize) -> Option<Vec<PortRange>> {
        self.allow.rules.get(rule).map(|r| match r.ports {
            HostPorts::Range(p) => vec![p],
            HostPorts::HttpAndHttps => vec![PortRange::HTTP, PortRange::HTTPS],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleFields;

    fn rules(specs: &[&str]) -> Vec<EgressRule> {
        specs
            .iter()
            .map(|s| {
                let mut host = None;
                let mut cidr = None;
                let mut ports = None;
                let mut proto = None;
                let mut private = None;
                for kv in s.split_whitespace() {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    match k {
                        "host" => host = Some(v),
                        "cidr" => cidr = Some(v),
                        "ports" => ports = Some(v),
                        "proto" => proto = Some(v),
                        "private" => private = Some(v == "true"),
                        _ => panic!("{k}"),
                    }
                }
                EgressRule::from_fields(RuleFields {
                    host,
                    cidr,
                    ports,
                    protocol: proto,
                    allow_private: private,
                    ..RuleFields::default()
                })
                .expect("rule")
            })
            .collect()
    }

    fn m(specs: &[&str]) -> Matcher {
        compile_rules(&rules(specs), &[])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const TCP: Transport = Transport::Tcp;
    const UDP: Transport = Transport::Udp;

    fn allow(rule: usize) -> Decision {
        Decision::Allow { rule }
    }

    fn deny(r: DenyReason) -> Decision {
        Decision::Deny(r)
    }

    #[test]
    fn exact_names_match_case_insensitively_on_their_port() {
        let m = m(&["host=api.example.com"]);
        assert_eq!(m.check_host("API.example.com.", 443, TCP), allow(0));
        assert_eq!(
            m.check_host("api.example.com", 80, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_host("api.example.com", 443, UDP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_host("www.example.com", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(
            m.check_host("bad name", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
    }

    #[test]
    fn wildcards_match_one_label() {
        let m = m(&[
            "host=*.example.com",
            "host=api-*.example.org:0 proto=any",
            "host=eu.*.example.net",
        ]);
        assert_eq!(m.check_host("a.example.com", 443, TCP), allow(0));
        assert_eq!(
            m.check_host("example.com", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(
            m.check_host("a.b.example.com", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(m.check_host("api-eu.example.org", 53, UDP), allow(1));
        assert_eq!(
            m.check_host("web.example.org", 53, UDP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(m.check_host("eu.x.example.net", 443, TCP), allow(2));
        assert_eq!(
            m.check_host("us.x.example.net", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
    }

    #[test]
    fn lowest_allowing_rule_wins_across_kinds() {
        let m = m(&[
            "host=*.example.com:8443",
            "host=a.example.com:0",
            "host=0.0.0.0",
        ]);
        assert_eq!(m.check_host("a.example.com", 8443, TCP), allow(0));
        assert_eq!(m.check_host("a.example.com", 22, TCP), allow(1));
        assert_eq!(m.check_host("b.example.com", 443, TCP), allow(2));
        assert_eq!(
            m.check_host("b.example.com", 22, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(m.host_rules_for_name("a.example.com"), vec![0, 1, 2]);
    }

    #[test]
    fn any_host_allows_every_name_and_its_resolved_addresses_on_80_and_443_only() {
        let m = m(&["host=0.0.0.0"]);
        assert_eq!(m.check_host("anything.example", 80, TCP), allow(0));
        assert_eq!(m.check_host("anything.example", 443, TCP), allow(0));
        assert!(m.name_allowed("anything.example"));
        assert_eq!(m.host_rules_for_name("anything.example"), vec![0]);
        assert_eq!(
            m.check_host("anything.example", 8080, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_resolved("anything.example", ip("198.51.100.1"), 443, TCP),
            allow(0)
        );
        assert_eq!(
            m.check_resolved("anything.example", ip("198.51.100.1"), 8080, TCP),
            deny(DenyReason::PortDenied)
        );
        // A name resolving to a private, metadata or infrastructure address does not open it.
        assert_eq!(
            m.check_resolved("anything.example", ip("10.0.0.1"), 443, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            m.check_resolved("anything.example", ip("169.254.169.254"), 80, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        let infra = compile_rules(&rules(&["host=0.0.0.0"]), &[IpNet::from(ip("192.0.2.21"))]);
        assert_eq!(
            infra.check_resolved("anything.example", ip("192.0.2.21"), 443, TCP),
            deny(DenyReason::Infrastructure)
        );
    }

    #[test]
    fn any_host_does_not_allow_raw_addresses_only_cidr_rules_do() {
        // Tier 1 opens an address only when the job resolved it, so a `0.0.0.0` rule cannot mean
        // "any public address": check_ip agrees with what both tiers enforce.
        let m = m(&["host=0.0.0.0", "cidr=203.0.113.0/24 ports=443"]);
        for a in ["198.51.100.1", "8.8.8.8", "2001:db8::1"] {
            for port in [80, 443] {
                assert_eq!(
                    m.check_ip(ip(a), port, TCP),
                    deny(DenyReason::DestinationDenied),
                    "{a}:{port}"
                );
            }
        }
        assert_eq!(m.check_ip(ip("203.0.113.9"), 443, TCP), allow(1));
        assert_eq!(
            m.check_ip(ip("203.0.113.9"), 80, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_ip(ip("10.0.0.1"), 443, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        // An address bound from an allowed name is allowed by the name, on the name's ports.
        assert_eq!(
            m.check_resolved("www.example.net", ip("198.51.100.1"), 80, TCP),
            allow(0)
        );
        // The lowest allowing rule still wins between the name and the address.
        assert_eq!(
            m.check_resolved("www.example.net", ip("203.0.113.9"), 443, TCP),
            allow(0)
        );
    }

    #[test]
    fn cidr_rules_use_longest_and_all_prefixes() {
        let m = m(&[
            "cidr=203.0.113.0/24 ports=5432",
            "cidr=203.0.113.128/25 ports=0 proto=udp",
            "cidr=2001:db8::/32 ports=443",
        ]);
        assert_eq!(m.check_ip(ip("203.0.113.7"), 5432, TCP), allow(0));
        assert_eq!(m.check_ip(ip("203.0.113.200"), 5432, TCP), allow(0));
        assert_eq!(m.check_ip(ip("203.0.113.200"), 9999, UDP), allow(1));
        assert_eq!(
            m.check_ip(ip("203.0.113.7"), 9999, UDP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_ip(ip("198.51.100.1"), 5432, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(m.check_ip(ip("2001:db8:1::9"), 443, TCP), allow(2));
        assert_eq!(
            m.check_ip(ip("2001:db9::9"), 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
    }

    #[test]
    fn always_denied_ranges_need_allow_private() {
        let wide = m(&["cidr=0.0.0.0/0 ports=0 proto=any", "cidr=::/0 ports=0"]);
        assert_eq!(wide.check_ip(ip("192.0.2.1"), 22, TCP), allow(0));
        for a in [
            "10.0.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.1.1",
            "224.0.0.1",
            "::1",
            "::ffff:10.0.0.1",
            "fd00::1",
        ] {
            assert_eq!(
                wide.check_ip(ip(a), 443, TCP),
                deny(DenyReason::AlwaysDenied),
                "{a}"
            );
        }
        let private = m(&["cidr=10.1.0.0/16 ports=5432 private=true"]);
        assert_eq!(private.check_ip(ip("10.1.2.3"), 5432, TCP), allow(0));
        assert_eq!(
            private.check_ip(ip("10.1.2.3"), 22, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            private.check_ip(ip("10.2.0.1"), 5432, TCP),
            deny(DenyReason::AlwaysDenied)
        );
    }

    fn nets(specs: &[&str]) -> Vec<IpNet> {
        specs.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn infrastructure_ranges_are_denied_whatever_the_rules() {
        // The widest policy there is: every address, port and protocol, private ranges opened,
        // plus every name.
        let r = rules(&[
            "cidr=0.0.0.0/0 ports=0 proto=any private=true",
            "cidr=::/0 ports=0 proto=any private=true",
            "cidr=10.0.0.0/8 ports=0 private=true",
            "cidr=192.0.2.21/32 ports=9090",
            "host=0.0.0.0",
            "host=*.example.com:0 proto=any",
        ]);
        let infra = nets(&["10.99.0.0/16", "192.0.2.0/24", "2001:db8:ff::/48"]);
        let m = compile_rules(&r, &infra);
        assert_eq!(m.check_ip(ip("10.1.0.1"), 80, TCP), allow(0));
        assert_eq!(m.check_ip(ip("198.51.100.1"), 9090, UDP), allow(0));
        for a in [
            "10.99.0.1",
            "192.0.2.21",
            "192.0.2.0",
            "192.0.2.255",
            "2001:db8:ff::1",
        ] {
            for (port, t) in [(9090, TCP), (443, TCP), (6081, UDP), (53, UDP)] {
                assert_eq!(
                    m.check_ip(ip(a), port, t),
                    deny(DenyReason::Infrastructure),
                    "{a}:{port}/{t}"
                );
                assert_eq!(
                    m.check_resolved("api.example.com", ip(a), port, t),
                    deny(DenyReason::Infrastructure),
                    "resolved {a}:{port}/{t}"
                );
            }
        }
        assert_eq!(
            m.denied_range(ip("10.99.0.1")),
            Some(("10.99.0.0/16".parse().expect("net"), "infrastructure"))
        );
        // The neighbours of an infrastructure range are not infrastructure.
        assert_eq!(m.check_ip(ip("192.0.3.1"), 9090, TCP), allow(0));
        assert_eq!(m.check_ip(ip("2001:db8:fe::1"), 9090, TCP), allow(1));
    }

    #[test]
    fn infrastructure_is_decided_before_always_denied_and_reports_the_most_specific_range() {
        let m = compile_rules(
            &rules(&["cidr=0.0.0.0/0 ports=0"]),
            &nets(&[
                "169.254.169.254/32",
                "10.0.0.0/8",
                "10.1.0.0/16",
                "10.1.2.7/24",
            ]),
        );
        assert_eq!(
            m.check_ip(ip("169.254.169.254"), 80, TCP),
            deny(DenyReason::Infrastructure)
        );
        assert_eq!(
            m.check_ip(ip("169.254.169.253"), 80, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            m.denied_range(ip("10.1.2.9")),
            Some(("10.1.2.0/24".parse().expect("net"), "infrastructure"))
        );
        assert_eq!(
            m.denied_range(ip("10.1.9.9")),
            Some(("10.1.0.0/16".parse().expect("net"), "infrastructure"))
        );
        assert_eq!(
            m.denied_range(ip("10.9.9.9")),
            Some(("10.0.0.0/8".parse().expect("net"), "infrastructure"))
        );
        assert_eq!(
            m.denied_range(ip("169.254.1.1")).map(|(_, l)| l),
            Some("link-local / cloud metadata")
        );
    }

    #[test]
    fn thousands_of_infrastructure_addresses_are_each_denied_and_nothing_else_is() {
        // A fleet: every node and proxy address as a /32, plus the underlay /16 of another site.
        let mut infra: Vec<IpNet> = (0u32..4_000)
            .map(|i| IpNet::V4(Ipv4Net::new((0xC633_0000 | (i & 0xffff)).into(), 32).expect("net")))
            .collect();
        infra.push("203.0.0.0/16".parse().expect("net"));
        let m = compile_rules(&rules(&["cidr=0.0.0.0/0 ports=0 proto=any"]), &infra);
        for i in 0u32..=0xffff {
            let a = IpAddr::V4((0xC633_0000 | i).into());
            let want = if i < 4_000 {
                deny(DenyReason::Infrastructure)
            } else {
                allow(0)
            };
            assert_eq!(m.check_ip(a, 443, TCP), want, "{a}");
        }
        assert_eq!(
            m.check_ip(ip("203.0.113.9"), 443, TCP),
            deny(DenyReason::Infrastructure)
        );
        assert_eq!(m.check_ip(ip("203.1.0.1"), 443, TCP), allow(0));
    }

    #[test]
    fn resolved_addresses_need_a_public_address_and_an_allowed_name_or_cidr() {
        let m = m(&["host=api.example.com", "cidr=198.51.100.0/24 ports=8080"]);
        assert_eq!(
            m.check_resolved("api.example.com", ip("203.0.113.5"), 443, TCP),
            allow(0)
        );
        assert_eq!(
            m.check_resolved("api.example.com", ip("10.0.0.5"), 443, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            m.check_resolved("api.example.com", ip("127.0.0.1"), 443, TCP),
            deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            m.check_resolved("other.example.com", ip("198.51.100.9"), 8080, TCP),
            allow(1)
        );
        assert_eq!(
            m.check_resolved("api.example.com", ip("203.0.113.5"), 22, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_resolved("other.example.com", ip("203.0.113.5"), 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
    }

    #[test]
    fn port_check_for_a_known_rule() {
        let m = m(&["host=api.example.com:1000-2000 proto=udp"]);
        assert_eq!(m.check_port_for_rule(0, 1500, UDP), allow(0));
        assert_eq!(
            m.check_port_for_rule(0, 1500, TCP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_port_for_rule(0, 2001, UDP),
            deny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_port_for_rule(1, 1500, UDP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(
            m.rule_ports(0),
            Some(vec![PortRange::new(1000, 2000).expect("range")])
        );
    }

    #[test]
    fn empty_policy_denies_everything() {
        let m = m(&[]);
        assert!(m.is_empty());
        assert_eq!(
            m.check_host("a.example.com", 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert_eq!(
            m.check_ip(ip("192.0.2.1"), 443, TCP),
            deny(DenyReason::DestinationDenied)
        );
        assert!(!m.name_allowed("a.example.com"));
    }

    #[test]
    fn deny_reasons_map_to_wire_reasons() {
        assert_eq!(
            DenyReason::DestinationDenied.reason(),
            snas_wire::Reason::DestinationDenied
        );
        assert_eq!(
            DenyReason::PortDenied.reason(),
            snas_wire::Reason::PortDenied
        );
        assert_eq!(
            DenyReason::AlwaysDenied.reason(),
            snas_wire::Reason::AlwaysDenied
        );
        assert_eq!(
            DenyReason::Infrastructure.reason(),
            snas_wire::Reason::InfrastructureDenied
        );
        assert_eq!(
            DenyReason::Infrastructure.to_string(),
            "infrastructure_denied"
        );
    }

    fn policy(allow: &[&str], deny: &[&str], mode: Mode, infra: &[&str]) -> Matcher {
        let deny: Vec<DenyRule> = rules(deny)
            .into_iter()
            .map(|r| match r {
                EgressRule::Host { host, protocol, .. } => DenyRule::from_fields(
                    RuleFields::host(&host.to_string()).protocol(protocol.name()),
                ),
                EgressRule::Cidr {
                    cidr,
                    ports,
                    protocol,
                    ..
                } => DenyRule::from_fields(
                    RuleFields::cidr(&cidr.to_string())
                        .ports(&ports.to_string())
                        .protocol(protocol.name()),
                ),
            })
            .collect::<Result<_, _>>()
            .expect("deny");
        compile_policy(&rules(allow), &deny, mode, &nets(infra))
    }

    fn pr(lo: u16, hi: u16) -> PortRange {
        PortRange::new(lo, hi).expect("range")
    }

    #[test]
    fn a_deny_rule_beats_every_allow_rule_on_its_ports_only() {
        let m = policy(
            &[
                "host=*.example.com:0 proto=any",
                "cidr=0.0.0.0/0 ports=0 proto=any private=true",
            ],
            &[
                "host=tracker.example.com:0 proto=any",
                "host=api.example.com:22",
                "cidr=198.51.100.0/24 ports=0 proto=any",
                "cidr=203.0.113.0/24 ports=5432",
                "cidr=10.9.0.0/16 ports=0 private=true",
            ],
            Mode::Enforce,
            &[],
        );
        assert_eq!(
            m.check_host("tracker.example.com", 443, TCP),
            deny(DenyReason::DenyRule(0))
        );
        assert_eq!(
            m.check_host("api.example.com", 22, TCP),
            deny(DenyReason::DenyRule(1))
        );
        assert_eq!(m.check_host("api.example.com", 22, UDP), allow(0));
        assert_eq!(m.check_host("api.example.com", 443, TCP), allow(0));
        assert_eq!(
            m.check_ip(ip("198.51.100.7"), 443, TCP),
            deny(DenyReason::DenyRule(2))
        );
        assert_eq!(
            m.check_ip(ip("203.0.113.7"), 5432, TCP),
            deny(DenyReason::DenyRule(3))
        );
        assert_eq!(m.check_ip(ip("203.0.113.7"), 5432, UDP), allow(1));
        // allow_private does not beat a deny rule either.
        assert_eq!(
            m.check_ip(ip("10.9.1.1"), 80, TCP),
            deny(DenyReason::DenyRule(4))
        );
        assert_eq!(m.check_ip(ip("10.8.1.1"), 80, TCP), allow(1));
        // A deny cidr rule covers the address through any name; a deny host rule covers the
        // name, not the address another allowed name resolves to.
        assert_eq!(
            m.check_resolved("www.example.com", ip("198.51.100.7"), 443, TCP),
            deny(DenyReason::DenyRule(2))
        );
        assert_eq!(
            m.check_resolved("tracker.example.com", ip("192.0.2.8"), 443, TCP),
            deny(DenyReason::DenyRule(0))
        );
        assert_eq!(
            m.check_resolved("www.example.com", ip("192.0.2.8"), 443, TCP),
            allow(0)
        );
        assert_eq!(m.deny_rules_for_name("TRACKER.example.com."), vec![0]);
        assert_eq!(m.deny_len(), 5);
    }

    #[test]
    fn dns_binds_the_ports_the_deny_rules_leave_and_refuses_names_left_with_none() {
        let m = policy(
            &[
                "host=api.example.com:0 proto=any",
                "host=db.example.com:5432",
                "host=0.0.0.0",
            ],
            &[
                "host=api.example.com:22",
                "host=api.example.com:1000-2000 proto=udp",
                "host=db.example.com:5432",
                "host=*.ads.example.net:0 proto=any",
            ],
            Mode::Enforce,
            &[],
        );
        match m.name_verdict("api.example.com") {
            NameVerdict::Allow { rules, ports } => {
                assert_eq!(rules, vec![0, 2]);
                assert_eq!(
                    ports,
                    vec![
                        (RuleProtocol::Tcp, pr(1, 21)),
                        (RuleProtocol::Udp, pr(1, 999)),
                        (RuleProtocol::Tcp, pr(23, 65535)),
                        (RuleProtocol::Udp, pr(2001, 65535)),
                    ]
                );
            }
            v => panic!("{v:?}"),
        }
        // db.example.com keeps 80/443 from `0.0.0.0`, but not 5432.
        match m.name_verdict("db.example.com") {
            NameVerdict::Allow { ports, .. } => assert_eq!(
                ports,
                vec![
                    (RuleProtocol::Tcp, pr(80, 80)),
                    (RuleProtocol::Tcp, pr(443, 443))
                ]
            ),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            m.name_verdict("x.ads.example.net"),
            NameVerdict::Deny(DenyReason::DenyRule(3))
        );
        assert!(!m.name_allowed("x.ads.example.net"));
        assert!(m.name_allowed("www.example.org"));
        let strict = policy(
            &["host=api.example.com"],
            &["host=*.example.com"],
            Mode::Enforce,
            &[],
        );
        assert_eq!(
            strict.name_verdict("api.example.com"),
            NameVerdict::Deny(DenyReason::DenyRule(0))
        );
        assert_eq!(
            strict.name_verdict("www.example.org"),
            NameVerdict::Deny(DenyReason::DestinationDenied)
        );
    }

    #[test]
    fn audit_mode_lets_unallowed_public_destinations_through_but_never_infrastructure_private_or_denied(
    ) {
        let m = policy(
            &["host=api.example.com", "cidr=203.0.113.0/24 ports=5432"],
            &[
                "cidr=198.51.100.0/24 ports=0 proto=any",
                "host=*.tracker.example.com:0 proto=any",
            ],
            Mode::Audit,
            &["192.0.2.0/24"],
        );
        assert_eq!(m.mode(), Mode::Audit);
        assert_eq!(m.check_host("api.example.com", 443, TCP), allow(0));
        assert_eq!(
            m.check_host("api.example.com", 8443, TCP),
            Decision::WouldDeny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_host("other.example.org", 443, TCP),
            Decision::WouldDeny(DenyReason::DestinationDenied)
        );
        assert_eq!(
            m.check_ip(ip("203.0.113.9"), 22, TCP),
            Decision::WouldDeny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_ip(ip("2001:db8::9"), 9999, UDP),
            Decision::WouldDeny(DenyReason::DestinationDenied)
        );
        for a in [
            "10.0.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "fd00::1",
            "224.0.0.1",
        ] {
            assert_eq!(
                m.check_ip(ip(a), 80, TCP),
                deny(DenyReason::AlwaysDenied),
                "{a}"
            );
            assert_eq!(
                m.check_resolved("metadata.example.com", ip(a), 80, TCP),
                deny(DenyReason::AlwaysDenied),
                "{a}"
            );
        }
        assert_eq!(
            m.check_ip(ip("192.0.2.21"), 443, TCP),
            deny(DenyReason::Infrastructure)
        );
        assert_eq!(
            m.check_ip(ip("198.51.100.1"), 443, TCP),
            deny(DenyReason::DenyRule(0))
        );
        assert_eq!(
            m.check_resolved("a.tracker.example.com", ip("203.0.113.80"), 443, TCP),
            deny(DenyReason::DenyRule(1))
        );
        assert_eq!(
            m.check_resolved("www.example.org", ip("203.0.113.80"), 443, TCP),
            Decision::WouldDeny(DenyReason::PortDenied)
        );
        assert_eq!(
            m.check_resolved("www.example.org", ip("192.0.2.80"), 443, TCP),
            deny(DenyReason::Infrastructure)
        );
        // DNS: any name resolves but those every port of which a deny rule takes.
        assert_eq!(
            m.name_verdict("www.example.org"),
            NameVerdict::WouldDeny(DenyReason::DestinationDenied)
        );
        assert!(m.name_allowed("www.example.org"));
        assert_eq!(
            m.name_verdict("a.tracker.example.com"),
            NameVerdict::Deny(DenyReason::DenyRule(1))
        );
        assert!(!m.name_allowed("bad name"));
        assert_eq!(
            Decision::WouldDeny(DenyReason::PortDenied).to_string(),
            "would_deny port_denied"
        );
        assert_eq!(
            Decision::Deny(DenyReason::DenyRule(3)).to_string(),
            "deny deny_rule 3"
        );
        assert!(Decision::WouldDeny(DenyReason::PortDenied).passes());
        assert!(!Decision::WouldDeny(DenyReason::PortDenied).is_allow());
    }
}
