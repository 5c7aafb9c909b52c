//! The audit line: one JSON object per line of an audit log, written once for both tiers — the
//! agent's writer (tier 1 and DNS decisions), the proxy's writer (tier 2) and every reader
//! (`snas run`'s egress summary) use this type.
//!
//! # Why here
//! An audit line records a policy decision (tenant, job, the rule that matched, the reason),
//! and this is the lowest crate of the layering (wire ← policy ← proxy / bpf ← agent ← snas)
//! that both writers and the reader depend on and that already speaks serde. `snas-wire` stays
//! a packet codec without serde.
//!
//! # Format (what is on disk; operator docs: `docs/dns.md` for tier 1, `docs/proxy.md` for
//! tier 2)
//! Fields in this order: `time`, `tier`, `kind`, `action`, `tenant`, `job`, `job_key`,
//! `proto`, `src`, `dst`, `port`, `hostname`, `rule`, `reason`, `bytes`, then the DNS fields
//! (`qtype`, `addrs`), the flow fields (`egress`, `end`, `bytes_out`, `bytes_in`,
//! `packets_out`, `packets_in`, `duration_ms`), `flows` and `suppressed`.
//! Empty values are left out, except `src`, `dst`, `port`, `hostname` and `rule`, which the
//! agent's lines always carry (`null` when empty) and the proxy's leave out: those are
//! [`Slot`]s, which keep the difference. A test pins one line of each kind.
//!
//! # Reading
//! Lenient: unknown fields are ignored and missing ones take their empty value, so a reader
//! keeps working across versions and on hand-written test lines.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use snas_wire::JobKey;

/// `Option<JobKey>` as the audit format has always spelt it: the 16 hex digits, or `""`.
mod job_key_or_empty {
    use super::JobKey;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &Option<JobKey>, s: S) -> Result<S::Ok, S::Error> {
        match k {
            Some(k) => s.collect_str(k),
            None => s.serialize_str(""),
        }
    }

    /// `""` (or `null`) is `None`; anything else must be a job key.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<JobKey>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        match s.as_deref() {
            None | Some("") => Ok(None),
            Some(k) => k.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// What a line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A new-flow decision (tier 2), or a refused packet of an expired job.
    Flow,
    /// A flow ended (tier 2).
    FlowEnd,
    /// A DNS decision (agent: every one; proxy: refusals).
    Dns,
    /// The job's node said the job ended (tier 2).
    Job,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Allowed (a new flow, a forwarded DNS answer).
    Allow,
    /// Denied by policy or infrastructure.
    Deny,
    /// Allowed by policy but refused (a limit, draining, expiry; DNS refusals).
    Refuse,
    /// The end of a flow or a job.
    End,
    /// Audit mode (`mode = "audit"`): the rules do not allow it (`reason` says why it would be
    /// denied), but it was let through.
    #[serde(rename = "would_deny")]
    WouldDeny,
}

impl Action {
    /// The name written in lines.
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Refuse => "refuse",
            Action::End => "end",
            Action::WouldDeny => "would_deny",
        }
    }
}

/// A field some lines always carry (`null` when empty: the agent's) and others leave out when
/// empty (the proxy's). Reading gives [`Slot::Null`] for `null` and [`Slot::Absent`] for a
/// missing field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Slot<T> {
    /// Not written.
    #[default]
    Absent,
    /// Written as `null`.
    Null,
    /// Written.
    Value(T),
}

impl<T> Slot<T> {
    /// `Value`, or `Null` when `None` (the field is always written).
    pub fn or_null(v: Option<T>) -> Slot<T> {
        v.map_or(Slot::Null, Slot::Value)
    }

    /// `Value`, or `Absent` when `None` (the field is left out when empty).
    pub fn or_absent(v: Option<T>) -> Slot<T> {
        v.map_or(Slot::Absent, Slot::Value)
    }

    /// The value, if any.
    pub fn value(&self) -> Option<&T> {
        match self {
            Slot::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the field is left out.
    pub fn is_absent(&self) -> bool {
        matches!(self, Slot::Absent)
    }
}

impl<T: Serialize> Serialize for Slot<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Slot::Value(v) => v.serialize(s),
            Slot::Absent | Slot::Null => s.serialize_none(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Slot<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Slot<T>, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Slot::Null, Slot::Value))
    }
}

/// The sandbox side of a line: an address (the agent's lines) or an address and port (the
/// proxy's flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Source {
    /// `address:port`.
    Socket(SocketAddr),
    /// `address`.
    Addr(IpAddr),
}

impl Source {
    /// The address.
    pub fn ip(&self) -> IpAddr {
        match self {
            Source::Socket(s) => s.ip(),
            Source::Addr(a) => *a,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One audit line (see the module documentation for the format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditLine {
    /// RFC 3339 UTC ([`rfc3339_millis`] in the agent's lines, [`rfc3339_secs`] in the proxy's).
    #[serde(default)]
    pub time: String,
    /// Enforcement tier: 1 (agent) or 2 (proxy).
    #[serde(default)]
    pub tier: u8,
    /// What the line is about (absent on the agent's packet events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// The decision.
    pub action: Action,
    /// Tenant name (empty when the job is unknown).
    #[serde(default)]
    pub tenant: String,
    /// Job name (empty when the job is unknown).
    #[serde(default)]
    pub job: String,
    /// Job key: 16 hex digits, or `""` on disk when the line has none (`None`; always written,
    /// as it always was; a missing field reads as `None`).
    #[serde(default, with = "job_key_or_empty")]
    pub job_key: Option<JobKey>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `dns` or a protocol number (absent on job lines).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proto: String,
    /// The sandbox's address (and port, for the proxy's flows).
    #[serde(default, skip_serializing_if = "Slot::is_absent")]
    pub src: Slot<Source>,
    /// Destination address (for the agent's DNS lines: the stub the query reached, if known).
    #[serde(default, skip_serializing_if = "Slot::is_absent")]
    pub dst: Slot<IpAddr>,
    /// Destination port.
    #[serde(default, skip_serializing_if = "Slot::is_absent")]
    pub port: Slot<u16>,
    /// The name the destination was bound from, or the queried name (DNS).
    #[serde(default, skip_serializing_if = "Slot::is_absent")]
    pub hostname: Slot<String>,
    /// Index of the policy rule that matched.
    #[serde(default, skip_serializing_if = "Slot::is_absent")]
    pub rule: Slot<usize>,
    /// A `snas_wire::Reason` name, `allowed`, `new_flow`, `job_ended`, ….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'static, str>>,
    /// Bytes of the packet or DNS message decided on; for `flow_end`, the flow's both ways.
    #[serde(default)]
    pub bytes: u64,
    /// DNS: the query type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    /// DNS: the addresses installed into tier 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<IpAddr>,
    /// Name check (`sni_mismatch`, `host_mismatch`): the names the job's DNS bound to the
    /// destination address (`hostname` is the name on the wire).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound: Vec<String>,
    /// The SNAT address and port (allowed flows, flow ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<SocketAddr>,
    /// `flow_end`: why it ended (`idle`, `closed`, `policy_expired`, `job_ended`,
    /// `policy_gone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Cow<'static, str>>,
    /// `flow_end`: bytes sandbox → internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// `flow_end`: bytes internet → sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// `flow_end`: packets sandbox → internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_out: Option<u32>,
    /// `flow_end`: packets internet → sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_in: Option<u32>,
    /// `flow_end`: first to last packet, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `job`: flows removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
    /// Lines of this job left out (over its audit budget) since its previous line.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

impl AuditLine {
    /// A line with every optional field empty (left out).
    pub fn new(time: String, tier: u8, kind: Option<Kind>, action: Action) -> AuditLine {
        AuditLine {
            time,
            tier,
            kind,
            action,
            tenant: String::new(),
            job: String::new(),
            job_key: None,
            proto: String::new(),
            src: Slot::Absent,
            dst: Slot::Absent,
            port: Slot::Absent,
            hostname: Slot::Absent,
            rule: Slot::Absent,
            reason: None,
            bytes: 0,
            qtype: None,
            addrs: Vec::new(),
            bound: Vec::new(),
            egress: None,
            end: None,
            bytes_out: None,
            bytes_in: None,
            packets_out: None,
            packets_in: None,
            duration_ms: None,
            flows: None,
            suppressed: 0,
        }
    }

    /// The reason, or `""`.
    pub fn reason(&self) -> &str {
        self.reason.as_deref().unwrap_or("")
    }

    /// The host name, or `""`.
    pub fn hostname(&self) -> &str {
        self.hostname.value().map_or("", String::as_str)
    }
}

/// RFC 3339 UTC time with milliseconds (the agent's lines).
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// RFC 3339 UTC time in seconds since the Unix epoch (the proxy's lines).
pub fn rfc3339_secs(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn named(mut l: AuditLine) -> AuditLine {
        l.tenant = "acme".into();
        l.job = "web".into();
        l.job_key = Some(JobKey(0x1f0c_0000_0000_0001));
        l
    }

    /// Writes `line`, checks the text, and reads it back to the same line.
    fn pin(line: AuditLine, want: &str) {
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(text, want);
        let back: AuditLine = serde_json::from_str(&text).unwrap();
        assert_eq!(back, line);
    }

    #[test]
    fn the_agents_lines_carry_src_dst_port_hostname_and_rule_even_when_empty() {
        let time = rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(1500));
        let mut refuse = named(AuditLine::new(
            time.clone(),
            1,
            Some(Kind::Dns),
            Action::Refuse,
        ));
        refuse.proto = "udp".into();
        refuse.src = Slot::or_null(Some(Source::Addr(ip("10.255.0.2"))));
        refuse.dst = Slot::or_null(None);
        refuse.port = Slot::Value(53);
        refuse.hostname = Slot::or_null(Some("evil.example.org".into()));
        refuse.rule = Slot::or_null(None);
        refuse.reason = Some("dns_refused".into());
        refuse.bytes = 45;
        refuse.qtype = Some("A".into());
        pin(
            refuse.clone(),
            r#"{"time":"1970-01-01T00:00:01.500Z","tier":1,"kind":"dns","action":"refuse","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"udp","src":"10.255.0.2","dst":null,"port":53,"hostname":"evil.example.org","rule":null,"reason":"dns_refused","bytes":45,"qtype":"A"}"#,
        );
        let mut allow = refuse;
        allow.action = Action::Allow;
        allow.dst = Slot::Value(ip("10.255.0.1"));
        allow.rule = Slot::Value(0);
        allow.reason = Some("allowed".into());
        allow.addrs = vec![ip("203.0.113.10")];
        allow.suppressed = 3;
        pin(
            allow,
            r#"{"time":"1970-01-01T00:00:01.500Z","tier":1,"kind":"dns","action":"allow","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"udp","src":"10.255.0.2","dst":"10.255.0.1","port":53,"hostname":"evil.example.org","rule":0,"reason":"allowed","bytes":45,"qtype":"A","addrs":["203.0.113.10"],"suppressed":3}"#,
        );
        let mut deny = named(AuditLine::new(time, 1, None, Action::Deny));
        deny.proto = "tcp".into();
        deny.src = Slot::Value(Source::Addr(ip("10.255.0.2")));
        deny.dst = Slot::Value(ip("203.0.113.99"));
        deny.port = Slot::Value(25);
        deny.hostname = Slot::Null;
        deny.rule = Slot::Null;
        deny.reason = Some("destination_denied".into());
        pin(
            deny,
            r#"{"time":"1970-01-01T00:00:01.500Z","tier":1,"action":"deny","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"tcp","src":"10.255.0.2","dst":"203.0.113.99","port":25,"hostname":null,"rule":null,"reason":"destination_denied","bytes":0}"#,
        );
    }

    #[test]
    fn the_proxys_lines_leave_empty_fields_out() {
        let time = rfc3339_secs(1_795_000_381);
        let flow = |action| {
            let mut l = named(AuditLine::new(time.clone(), 2, Some(Kind::Flow), action));
            l.proto = "tcp".into();
            l.src = Slot::Value(Source::Socket("10.255.0.2:40002".parse().unwrap()));
            l.dst = Slot::Value(ip("203.0.113.20"));
            l.port = Slot::Value(7);
            l
        };
        let mut deny = flow(Action::Deny);
        deny.reason = Some("destination_denied".into());
        deny.bytes = 40;
        pin(
            deny,
            r#"{"time":"2026-11-18T11:13:01Z","tier":2,"kind":"flow","action":"deny","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"tcp","src":"10.255.0.2:40002","dst":"203.0.113.20","port":7,"reason":"destination_denied","bytes":40}"#,
        );
        let mut allow = flow(Action::Allow);
        allow.hostname = Slot::Value("api.example.com".into());
        allow.rule = Slot::Value(1);
        allow.bytes = 60;
        allow.egress = Some("198.51.100.70:31337".parse().unwrap());
        allow.suppressed = 2;
        pin(
            allow,
            r#"{"time":"2026-11-18T11:13:01Z","tier":2,"kind":"flow","action":"allow","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"tcp","src":"10.255.0.2:40002","dst":"203.0.113.20","port":7,"hostname":"api.example.com","rule":1,"bytes":60,"egress":"198.51.100.70:31337","suppressed":2}"#,
        );
        let mut end = flow(Action::End);
        end.kind = Some(Kind::FlowEnd);
        end.bytes = 5148;
        end.egress = Some("198.51.100.70:31337".parse().unwrap());
        end.end = Some("closed".into());
        end.bytes_out = Some(4132);
        end.bytes_in = Some(1016);
        end.packets_out = Some(8);
        end.packets_in = Some(6);
        end.duration_ms = Some(412);
        pin(
            end,
            r#"{"time":"2026-11-18T11:13:01Z","tier":2,"kind":"flow_end","action":"end","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"tcp","src":"10.255.0.2:40002","dst":"203.0.113.20","port":7,"bytes":5148,"egress":"198.51.100.70:31337","end":"closed","bytes_out":4132,"bytes_in":1016,"packets_out":8,"packets_in":6,"duration_ms":412}"#,
        );
        let mut job = named(AuditLine::new(
            time.clone(),
            2,
            Some(Kind::Job),
            Action::End,
        ));
        job.reason = Some("job_ended".into());
        job.flows = Some(3);
        pin(
            job,
            r#"{"time":"2026-11-18T11:13:01Z","tier":2,"kind":"job","action":"end","tenant":"acme","job":"web","job_key":"1f0c000000000001","reason":"job_ended","bytes":0,"flows":3}"#,
        );
        let mut dns = named(AuditLine::new(time, 2, Some(Kind::Dns), Action::Refuse));
        dns.proto = "dns".into();
        dns.hostname = Slot::Value("evil.example.org".into());
        dns.reason = Some("dns_refused".into());
        pin(
            dns,
            r#"{"time":"2026-11-18T11:13:01Z","tier":2,"kind":"dns","action":"refuse","tenant":"acme","job":"web","job_key":"1f0c000000000001","proto":"dns","hostname":"evil.example.org","reason":"dns_refused","bytes":0}"#,
        );
    }

    #[test]
    fn reading_is_lenient_about_missing_and_unknown_fields() {
        for a in [
            Action::Allow,
            Action::Deny,
            Action::Refuse,
            Action::End,
            Action::WouldDeny,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
        }
        let l: AuditLine =
            serde_json::from_str(r#"{"action":"allow","tier":2,"future":1,"hostname":null}"#)
                .unwrap();
        assert_eq!((l.tier, l.action, l.hostname()), (2, Action::Allow, ""));
        assert_eq!(l.hostname, Slot::Null);
        assert!(l.src.is_absent());
        assert!(serde_json::from_str::<AuditLine>(r#"{"tier":2}"#).is_err());
        assert!(serde_json::from_str::<AuditLine>(r#"{"action":"explode"}"#).is_err());
        assert_eq!(l.job_key, None, "a missing job key reads as none");
    }

    #[test]
    fn a_line_without_a_job_key_is_written_with_an_empty_one_as_always() {
        let l = AuditLine::new("t".into(), 2, None, Action::Deny);
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(
            text,
            r#"{"time":"t","tier":2,"action":"deny","tenant":"","job":"","job_key":"","bytes":0}"#
        );
        assert_eq!(serde_json::from_str::<AuditLine>(&text).unwrap(), l);
        let bad = text.replace(r#""job_key":"""#, r#""job_key":"1F0C000000000001""#);
        assert!(serde_json::from_str::<AuditLine>(&bad).is_err(), "{bad}");
    }
}
