//! `snas policy suggest`: a policy learnt from audit logs (typically of an audit-mode run).
//!
//! Owns the reduction of audit lines ([`crate::audit::AuditLine`], agent and proxy logs alike) to
//! the TOML policy that covers what one job used. Pure: lines in, text out.
//!
//! # What counts as used
//! - A flow: a line of the job about a flow (tier 2 `kind = "flow"`, or a tier-1 packet event,
//!   which has no kind) whose action is `allow` or `would_deny` (it passed), with a protocol of
//!   `tcp` or `udp`, a destination and a port. Denied and refused flows did not work and are
//!   left out.
//! - Its name: the line's `hostname` (tier 2 names flows from its bindings), else every name the
//!   job's DNS lines (`allow` or `would_deny`) answered with that address. A flow with no name
//!   becomes a `cidr` rule for its one address (`/32`, `/128`; `allow_private = true` when the
//!   address is in an always-denied range, which only an allowed flow can have reached).
//! - Names the job resolved but never connected to are listed in a comment, not allowed.
//!
//! # Output
//! One `[[egress]]` per (name, port range, protocol): the ports of a name are merged into a
//! range only where they are contiguous; a range used over both TCP and UDP is one rule with
//! `protocol = "any"`. No wildcards unless [`SuggestOptions::wildcard_depth`] is `N` (≥ 2):
//! then names of exactly `N + 1` labels that share their last `N` labels with another used name
//! become `*.<those N labels>` (a wildcard matches one label). Limits and `mode` are left out
//! (a comment says so): the defaults apply until the operator sets them. The text is checked by
//! [`crate::parse_policy`] before it is returned.
//!
//! # Round trip
//! The suggested policy allows every flow counted as used (by name, or by address for
//! unnamed flows) and, without wildcards, no other name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::audit::{Action, AuditLine, Kind};
use crate::authoring::{parse_policy, CheckErrors};
use crate::hostport::PortRange;
use crate::ranges;

/// What to learn from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuggestOptions {
    /// The job: its name (`job`) or its job key (16 hex digits).
    pub job: String,
    /// Tenant to write; default: the tenant of the job's lines.
    pub tenant: Option<String>,
    /// Wildcards for names of `depth + 1` labels sharing their last `depth` labels (≥ 2).
    pub wildcard_depth: Option<usize>,
}

/// The suggested policy and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// The policy (TOML).
    pub toml: String,
    /// Distinct flows (destination, port, protocol) counted as used.
    pub flows: usize,
    /// Lines of the job read.
    pub job_lines: usize,
    /// `[[egress]]` rules written.
    pub rules: usize,
}

/// Why no policy could be suggested.
#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    /// No line of the job describes a flow that passed.
    #[error("no flow of job `{0}` that passed is in the audit logs ({1} lines of the job read)")]
    NoFlows(String, usize),
    /// The tenant is neither given nor in the lines.
    #[error("the audit lines of job `{0}` name no tenant; pass --tenant")]
    NoTenant(String),
    /// `wildcard_depth` below 2 (a wildcard needs two labels after it).
    #[error("--wildcard-depth {0}: at least 2 (a wildcard may not stand for the label before a top-level domain)")]
    WildcardDepth(usize),
    /// The text does not parse (a bug, or a job name the format does not accept).
    #[error("the suggested policy does not parse: {0}")]
    Invalid(CheckErrors),
}

/// Ports per transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ports {
    tcp: BTreeSet<u16>,
    udp: BTreeSet<u16>,
}

impl Ports {
    fn add(&mut self, proto: &str, port: u16) {
        match proto {
            "tcp" => self.tcp.insert(port),
            _ => self.udp.insert(port),
        };
    }

    fn merge(&mut self, o: &Ports) {
        self.tcp.extend(&o.tcp);
        self.udp.extend(&o.udp);
    }

    /// (range, protocol) pairs: contiguous ports merged, a range of both transports `any`.
    fn rules(&self) -> Vec<(PortRange, &'static str)> {
        let tcp = ranges_of(&self.tcp);
        let udp = ranges_of(&self.udp);
        let mut out: Vec<(PortRange, &'static str)> = Vec::new();
        for r in &tcp {
            out.push((*r, if udp.contains(r) { "any" } else { "tcp" }));
        }
        for r in &udp {
            if !tcp.contains(r) {
                out.push((*r, "udp"));
            }
        }
        out.sort();
        out
    }
}

fn ranges_of(ports: &BTreeSet<u16>) -> Vec<PortRange> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some(last) if u32::from(last.1) + 1 == u32::from(p) => last.1 = p,
            _ => out.push((p, p)),
        }
    }
    out.into_iter()
        .filter_map(|(lo, hi)| PortRange::new(lo, hi))
        .collect()
}

fn port_text(r: PortRange) -> String {
    if r.lo() == r.hi() {
        r.lo().to_string()
    } else {
        format!("{}-{}", r.lo(), r.hi())
    }
}

fn is_job(l: &AuditLine, job: &str) -> bool {
    l.job == job || l.job_key.is_some_and(|k| k.to_string() == job)
}

/// Suggests a policy for `opts.job` from audit lines (see the module docs).
pub fn suggest(
    lines: impl IntoIterator<Item = AuditLine>,
    opts: &SuggestOptions,
) -> Result<Suggestion, SuggestError> {
    if let Some(d) = opts.wildcard_depth {
        if d < 2 {
            return Err(SuggestError::WildcardDepth(d));
        }
    }
    let mut tenant = opts.tenant.clone();
    let mut job_name: Option<String> = None;
    let mut job_lines = 0usize;
    let mut by_addr: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    let mut resolved: BTreeSet<String> = BTreeSet::new();
    // (hostname from the line, destination, port, protocol)
    let mut flows: BTreeSet<(Option<String>, IpAddr, u16, String)> = BTreeSet::new();
    for l in lines {
        if !is_job(&l, &opts.job) {
            continue;
        }
        job_lines += 1;
        if tenant.is_none() && !l.tenant.is_empty() {
            tenant = Some(l.tenant.clone());
        }
        if job_name.is_none() && !l.job.is_empty() {
            job_name = Some(l.job.clone());
        }
        let passed = matches!(l.action, Action::Allow | Action::WouldDeny);
        match l.kind {
            Some(Kind::Dns) if passed => {
                let name = l.hostname().to_owned();
                if name.is_empty() || l.addrs.is_empty() {
                    continue;
                }
                for a in &l.addrs {
                    by_addr.entry(*a).or_default().insert(name.clone());
                }
                resolved.insert(name);
            }
            Some(Kind::Flow) | None if passed => {
                let (Some(dst), Some(port)) = (l.dst.value(), l.port.value()) else {
                    continue;
                };
                if !matches!(l.proto.as_str(), "tcp" | "udp") || *port == 0 {
                    continue;
                }
                let host = Some(l.hostname().to_owned()).filter(|h| !h.is_empty());
                flows.insert((host, *dst, *port, l.proto.clone()));
            }
            _ => {}
        }
    }
    let job = job_name.unwrap_or_else(|| opts.job.clone());
    if flows.is_empty() {
        return Err(SuggestError::NoFlows(opts.job.clone(), job_lines));
    }
    let tenant = tenant.ok_or_else(|| SuggestError::NoTenant(opts.job.clone()))?;

    let mut names: BTreeMap<String, Ports> = BTreeMap::new();
    let mut addrs: BTreeMap<IpAddr, Ports> = BTreeMap::new();
    let distinct: BTreeSet<(IpAddr, u16, &str)> = flows
        .iter()
        .map(|(_, ip, port, proto)| (*ip, *port, proto.as_str()))
        .collect();
    for (host, ip, port, proto) in &flows {
        let named: Vec<String> = match host {
            Some(h) => vec![h.clone()],
            None => by_addr
                .get(ip)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        };
        if named.is_empty() {
            addrs.entry(*ip).or_default().add(proto, *port);
        }
        for n in named {
            names.entry(n).or_default().add(proto, *port);
        }
    }
    if let Some(depth) = opts.wildcard_depth {
        names = wildcards(names, depth);
    }
    let unused: Vec<&String> = resolved
        .iter()
        .filter(|n| !names.contains_key(*n) && !covered_by_wildcard(&names, n))
        .collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by `snas policy suggest` from {job_lines} audit lines of job `{job}`: {} \
         flows ({} names, {} addresses without a name).",
        distinct.len(),
        names.len(),
        addrs.len()
    );
    out.push_str(
        "# Limits are left out: the defaults of docs/policy.md §3 apply; add [limits] for what \
         this job needs.\n# mode is left out (enforce): add mode = \"audit\" to keep learning.\n",
    );
    for n in &unused {
        let _ = writeln!(out, "# resolved but never connected to: {n}");
    }
    let _ = writeln!(out, "tenant = \"{tenant}\"\njob = \"{job}\"");
    let mut rules = 0usize;
    for (name, ports) in &names {
        for (r, proto) in ports.rules() {
            let _ = write!(out, "\n[[egress]]\nhost = \"{name}:{}\"\n", port_text(r));
            if proto != "tcp" {
                let _ = writeln!(out, "protocol = \"{proto}\"");
            }
            rules += 1;
        }
    }
    for (ip, ports) in &addrs {
        let net = crate::IpNet::from(*ip);
        for (r, proto) in ports.rules() {
            let _ = write!(
                out,
                "\n[[egress]]\ncidr = \"{net}\"\nports = \"{}\"\n",
                port_text(r)
            );
            if proto != "tcp" {
                let _ = writeln!(out, "protocol = \"{proto}\"");
            }
            if ranges::always_denied(*ip).is_some() {
                out.push_str("allow_private = true\n");
            }
            rules += 1;
        }
    }
    parse_policy(&out).map_err(SuggestError::Invalid)?;
    Ok(Suggestion {
        toml: out,
        flows: distinct.len(),
        job_lines,
        rules,
    })
}

/// Names of `depth + 1` labels sharing their last `depth` labels with another name become one
/// wildcard (ports merged); other names stay.
fn wildcards(names: BTreeMap<String, Ports>, depth: usize) -> BTreeMap<String, Ports> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in names.keys() {
        let labels: Vec<&str> = n.split('.').collect();
        if labels.len() == depth + 1 {
            groups
                .entry(labels[1..].join("."))
                .or_default()
                .push(n.clone());
        }
    }
    let mut out: BTreeMap<String, Ports> = BTreeMap::new();
    let mut folded: BTreeSet<String> = BTreeSet::new();
    for (parent, members) in groups {
        if members.len() < 2 {
            continue;
        }
        let mut ports = Ports::default();
        for m in &members {
            if let Some(p) = names.get(m) {
                ports.merge(p);
            }
            folded.insert(m.clone());
        }
        out.insert(format!("*.{parent}"), ports);
    }
    for (n, p) in names {
        if !folded.contains(&n) {
            out.entry(n).or_default().merge(&p);
        }
    }
    out
}

fn covered_by_wildcard(names: &BTreeMap<String, Ports>, name: &str) -> bool {
    name.split_once('.')
        .is_some_and(|(_, parent)| names.contains_key(&format!("*.{parent}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Slot;
    use crate::rules::Transport;
    use crate::{compile, Decision};
    use snas_wire::{JobKey, PolicySerial};
    use std::time::SystemTime;

    fn line(tier: u8, kind: Option<Kind>, action: Action) -> AuditLine {
        let mut l = AuditLine::new("2026-12-06T04:00:00Z".into(), tier, kind, action);
        l.tenant = "acme".into();
        l.job = "learn".into();
        l.job_key = Some(JobKey(0x1f0c_0000_0000_0001));
        l
    }

    fn flow(
        tier: u8,
        action: Action,
        proto: &str,
        dst: &str,
        port: u16,
        host: Option<&str>,
    ) -> AuditLine {
        let mut l = line(
            tier,
            if tier == 2 { Some(Kind::Flow) } else { None },
            action,
        );
        l.proto = proto.into();
        l.dst = Slot::Value(dst.parse().unwrap());
        l.port = Slot::Value(port);
        l.hostname = host.map_or(Slot::Null, |h| Slot::Value(h.into()));
        l
    }

    fn dns(name: &str, addrs: &[&str], action: Action) -> AuditLine {
        let mut l = line(1, Some(Kind::Dns), action);
        l.proto = "udp".into();
        l.hostname = Slot::Value(name.into());
        l.addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        l
    }

    fn opts(depth: Option<usize>) -> SuggestOptions {
        SuggestOptions {
            job: "learn".into(),
            tenant: None,
            wildcard_depth: depth,
        }
    }

    fn run() -> Vec<AuditLine> {
        vec![
            dns("www.example.org", &["203.0.113.10"], Action::WouldDeny),
            dns("api.example.com", &["203.0.113.20"], Action::Allow),
            dns("unused.example.com", &["203.0.113.30"], Action::WouldDeny),
            dns("a.cdn.example.net", &["198.51.100.1"], Action::WouldDeny),
            dns("b.cdn.example.net", &["198.51.100.2"], Action::WouldDeny),
            // Tier 1 sees the address only; the DNS lines name it.
            flow(1, Action::WouldDeny, "tcp", "203.0.113.10", 443, None),
            flow(1, Action::WouldDeny, "tcp", "203.0.113.10", 8000, None),
            flow(1, Action::WouldDeny, "tcp", "203.0.113.10", 8001, None),
            flow(1, Action::WouldDeny, "udp", "203.0.113.10", 8000, None),
            flow(1, Action::WouldDeny, "udp", "203.0.113.10", 8001, None),
            flow(
                2,
                Action::Allow,
                "tcp",
                "203.0.113.20",
                443,
                Some("api.example.com"),
            ),
            flow(
                2,
                Action::WouldDeny,
                "tcp",
                "198.51.100.1",
                443,
                Some("a.cdn.example.net"),
            ),
            flow(
                2,
                Action::WouldDeny,
                "tcp",
                "198.51.100.2",
                443,
                Some("b.cdn.example.net"),
            ),
            // No name at all: an address rule.
            flow(2, Action::WouldDeny, "udp", "192.0.2.53", 5353, None),
            // Denied and refused flows were not used; other jobs are not this one.
            flow(2, Action::Deny, "tcp", "203.0.113.99", 22, None),
            flow(2, Action::Refuse, "tcp", "203.0.113.98", 443, None),
            {
                let mut l = flow(2, Action::Allow, "tcp", "203.0.113.97", 443, None);
                l.job = "other".into();
                l.job_key = Some(JobKey(2));
                l
            },
        ]
    }

    #[test]
    fn the_suggestion_allows_exactly_what_the_run_used() {
        let s = suggest(run(), &opts(None)).unwrap();
        let d = parse_policy(&s.toml).unwrap();
        assert_eq!((d.tenant.as_str(), d.job.as_str()), ("acme", "learn"));
        assert!(
            s.toml
                .contains("host = \"www.example.org:8000-8001\"\nprotocol = \"any\""),
            "{}",
            s.toml
        );
        assert!(s
            .toml
            .contains("# resolved but never connected to: unused.example.com"));
        assert!(s
            .toml
            .contains("cidr = \"192.0.2.53/32\"\nports = \"5353\"\nprotocol = \"udp\""));
        assert!(s.toml.contains("Limits are left out"));
        let c = d.to_claims("AAAAAAAAAAAAAAAAAAAAAA", PolicySerial(1), SystemTime::now());
        let m = compile(&c);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let tcp = Transport::Tcp;
        let udp = Transport::Udp;
        for (name, a, port, t) in [
            ("www.example.org", "203.0.113.10", 443, tcp),
            ("www.example.org", "203.0.113.10", 8000, tcp),
            ("www.example.org", "203.0.113.10", 8001, udp),
            ("api.example.com", "203.0.113.20", 443, tcp),
            ("a.cdn.example.net", "198.51.100.1", 443, tcp),
        ] {
            assert!(
                m.check_resolved(name, ip(a), port, t).is_allow(),
                "{name}:{port}/{t}"
            );
        }
        assert!(m.check_ip(ip("192.0.2.53"), 5353, udp).is_allow());
        // What was not used stays denied.
        for (name, port, t) in [
            ("www.example.org", 8002, tcp),
            ("www.example.org", 443, udp),
            ("unused.example.com", 443, tcp),
            ("c.cdn.example.net", 443, tcp),
        ] {
            assert!(!m.check_host(name, port, t).is_allow(), "{name}:{port}/{t}");
        }
        assert!(matches!(
            m.check_ip(ip("203.0.113.99"), 22, tcp),
            Decision::Deny(_)
        ));
        assert!(!m.check_ip(ip("192.0.2.53"), 5354, udp).is_allow());
        assert_eq!(s.flows, 9);
    }

    #[test]
    fn wildcards_only_when_asked_and_only_over_shared_parents() {
        let plain = suggest(run(), &opts(None)).unwrap();
        assert!(!plain.toml.contains('*'));
        let wild = suggest(run(), &opts(Some(3))).unwrap();
        assert!(
            wild.toml.contains("host = \"*.cdn.example.net:443\""),
            "{}",
            wild.toml
        );
        assert!(wild.toml.contains("host = \"api.example.com:443\""));
        assert!(matches!(
            suggest(run(), &opts(Some(1))),
            Err(SuggestError::WildcardDepth(1))
        ));
    }

    #[test]
    fn a_job_without_flows_or_tenant_is_an_error() {
        let other = SuggestOptions {
            job: "nobody".into(),
            ..opts(None)
        };
        assert!(matches!(
            suggest(run(), &other),
            Err(SuggestError::NoFlows(_, 0))
        ));
        let by_key = SuggestOptions {
            job: "1f0c000000000001".into(),
            ..opts(None)
        };
        assert!(suggest(run(), &by_key).is_ok());
        let mut lines = run();
        for l in &mut lines {
            l.tenant.clear();
        }
        assert!(matches!(
            suggest(lines, &opts(None)),
            Err(SuggestError::NoTenant(_))
        ));
    }
}
