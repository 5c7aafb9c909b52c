//! Egress rules: the validated form of one `[[egress]]` entry, shared by the authoring format and
//! the signed claims.
//!
//! # Invariants
//! - A rule is either a `host` rule (HOST_PORT grammar, port inside the value, no `ports`, no
//!   `allow_private`) or a `cidr` rule (IPv4/IPv6 network with zero host bits, `ports` required).
//! - A `cidr` rule that lies entirely inside an always-denied range needs `allow_private = true`.
//!   A wider rule that merely overlaps one (e.g. `0.0.0.0/0`) is accepted, but the always-denied
//!   addresses inside it stay denied unless `allow_private = true`.
//! - Deserialising an [`EgressRule`] re-runs all of this, so signed claims are re-checked.
//! - A [`DenyRule`] (`[[deny]]`) has the same grammar without `allow_private`: it may name an
//!   always-denied range (denying it again is harmless), and it never opens anything.
//! - `names` and `require_name` ([`NameCheck`]) belong to host rules only: tier 2 checks the
//!   name on the wire (TLS SNI, HTTP `Host`, QUIC SNI) of flows a host rule allowed; cidr rules
//!   are address rules. Their defaults (`check`, `false`) are left out of the signed claims, so
//!   a policy that does not use them signs to the same JSON as before.

use crate::hostport::{HostPort, HostPortError, PortError, PortRange};
use crate::ranges;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use snas_wire::L4Proto;
use std::fmt;

/// The transports a rule allows (`tcp`, `udp`, `any`): the workspace's [`RuleProtocol`],
/// shared with tier 1's port rules.
pub use snas_wire::RuleProtocol;

/// The transport protocol of one flow being checked (the rule-relevant part of
/// [`L4Proto`]: ICMP never matches a rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl From<Transport> for L4Proto {
    fn from(t: Transport) -> L4Proto {
        match t {
            Transport::Tcp => L4Proto::Tcp,
            Transport::Udp => L4Proto::Udp,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&L4Proto::from(*self), f)
    }
}

/// The fields of one `[[egress]]` or `[[deny]]` table as written (strings, as in TOML and JSON),
/// before validation by [`EgressRule::from_fields`] or [`DenyRule::from_fields`]. Start from
/// [`RuleFields::host`] or [`RuleFields::cidr`] and add the other fields with the setters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleFields<'a> {
    /// `host` (HOST_PORT grammar).
    pub host: Option<&'a str>,
    /// `cidr`.
    pub cidr: Option<&'a str>,
    /// `ports` (cidr rules).
    pub ports: Option<&'a str>,
    /// `protocol` (`tcp` when absent).
    pub protocol: Option<&'a str>,
    /// `allow_private` (cidr allow rules).
    pub allow_private: Option<bool>,
    /// `names` (host allow rules).
    pub names: Option<&'a str>,
    /// `require_name` (host allow rules).
    pub require_name: Option<bool>,
}

impl<'a> RuleFields<'a> {
    /// A rule with `host` set.
    pub fn host(host: &'a str) -> Self {
        RuleFields {
            host: Some(host),
            ..RuleFields::default()
        }
    }

    /// A rule with `cidr` set.
    pub fn cidr(cidr: &'a str) -> Self {
        RuleFields {
            cidr: Some(cidr),
            ..RuleFields::default()
        }
    }

    /// With `ports`.
    pub fn ports(self, ports: &'a str) -> Self {
        RuleFields {
            ports: Some(ports),
            ..self
        }
    }

    /// With `protocol`.
    pub fn protocol(self, protocol: &'a str) -> Self {
        RuleFields {
            protocol: Some(protocol),
            ..self
        }
    }

    /// With `allow_private`.
    pub fn allow_private(self, allow_private: bool) -> Self {
        RuleFields {
            allow_private: Some(allow_private),
            ..self
        }
    }

    /// With `names`.
    pub fn names(self, names: &'a str) -> Self {
        RuleFields {
            names: Some(names),
            ..self
        }
    }

    /// With `require_name`.
    pub fn require_name(self, require_name: bool) -> Self {
        RuleFields {
            require_name: Some(require_name),
            ..self
        }
    }
}

/// One validated egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "RawRule", try_from = "RawRule")]
pub enum EgressRule {
    /// A name (or wildcard, or `0.0.0.0`) with its ports.
    Host {
        /// The parsed HOST_PORT value.
        host: HostPort,
        /// Allowed protocol(s).
        protocol: RuleProtocol,
        /// What tier 2 checks of the name on the wire.
        names: NameCheck,
    },
    /// An address range with its ports.
    Cidr {
        /// The network (host bits zero).
        cidr: IpNet,
        /// Allowed ports.
        ports: PortRange,
        /// Allowed protocol(s).
        protocol: RuleProtocol,
        /// Whether always-denied addresses inside `cidr` are opened.
        allow_private: bool,
    },
}

/// Whether tier 2 checks the name on the wire of flows a host rule allowed (`names = "check"`,
/// the default, or `"off"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Names {
    /// TLS SNI, HTTP `Host` and QUIC SNI must be a name the policy allows on the port and that
    /// the job's DNS bound to the address.
    #[default]
    Check,
    /// The address is enough.
    Off,
}

impl Names {
    /// The value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Names::Check => "check",
            Names::Off => "off",
        }
    }
}

/// The name check of a host rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NameCheck {
    /// `names`.
    pub names: Names,
    /// `require_name`: a first payload that carries no name (neither TLS, HTTP nor QUIC) is
    /// refused instead of allowed.
    pub require_name: bool,
}

impl NameCheck {
    /// Whether the name on the wire is checked.
    pub fn checks(self) -> bool {
        self.names == Names::Check
    }
}

impl fmt::Display for NameCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.names, self.require_name) {
            (Names::Off, _) => f.write_str("names off"),
            (Names::Check, false) => f.write_str("names check"),
            (Names::Check, true) => f.write_str("names check, require_name"),
        }
    }
}

impl EgressRule {
    /// A host rule with the default name check.
    pub fn host(host: HostPort, protocol: RuleProtocol) -> EgressRule {
        EgressRule::Host {
            host,
            protocol,
            names: NameCheck::default(),
        }
    }

    /// The name check of a host rule (`None` for cidr rules: not name-checked).
    pub fn name_check(&self) -> Option<NameCheck> {
        match self {
            EgressRule::Host { names, .. } => Some(*names),
            EgressRule::Cidr { .. } => None,
        }
    }

    /// The rule's protocol.
    pub fn protocol(&self) -> RuleProtocol {
        match self {
            EgressRule::Host { protocol, .. } | EgressRule::Cidr { protocol, .. } => *protocol,
        }
    }

    /// Validates one rule from its fields as written (strings, as in TOML and JSON).
    pub fn from_fields(fields: RuleFields<'_>) -> Result<EgressRule, RuleError> {
        let RuleFields {
            host,
            cidr,
            ports,
            protocol,
            allow_private,
            names,
            require_name,
        } = fields;
        if cidr.is_some() && host.is_none() {
            if names.is_some() {
                return Err(RuleError::NamesOnCidrRule("names"));
            }
            if require_name.is_some() {
                return Err(RuleError::NamesOnCidrRule("require_name"));
            }
        }
        let names = NameCheck {
            names: match names {
                None | Some("check") => Names::Check,
                Some("off") => Names::Off,
                Some(other) => return Err(RuleError::Names(other.to_owned())),
            },
            require_name: require_name.unwrap_or(false),
        };
        if names.names == Names::Off && names.require_name {
            return Err(RuleError::NamesOnCidrRule("require_name"));
        }
        let protocol = match protocol {
            None => RuleProtocol::Tcp,
            Some(p) => RuleProtocol::parse(p).ok_or_else(|| RuleError::Protocol(p.to_owned()))?,
        };
        match (host, cidr) {
            (Some(_), Some(_)) => Err(RuleError::HostAndCidr),
            (None, None) => Err(RuleError::NeitherHostNorCidr),
            (Some(h), None) => {
                if ports.is_some() {
                    return Err(RuleError::PortsOnHostRule);
                }
                if allow_private.is_some() {
                    return Err(RuleError::AllowPrivateOnHostRule);
                }
                Ok(EgressRule::Host {
                    host: HostPort::parse(h)?,
                    protocol,
                    names,
                })
            }
            (None, Some(c)) => {
                let net: IpNet = c.parse().map_err(|_| RuleError::Cidr(c.to_owned()))?;
                if net.trunc() != net {
                    return Err(RuleError::HostBits(c.to_owned(), net.trunc().to_string()));
                }
                let ports = PortRange::parse(ports.ok_or(RuleError::MissingPorts)?)?;
                let allow_private = allow_private.unwrap_or(false);
                if !allow_private {
                    if let Some(r) = ranges::containing(&net) {
                        return Err(RuleError::PrivateRange(
                            net.to_string(),
                            r.label,
                            r.net.to_string(),
                        ));
                    }
                }
                Ok(EgressRule::Cidr {
                    cidr: net,
                    ports,
                    protocol,
                    allow_private,
                })
            }
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRule::Host {
                host,
                protocol,
                names,
            } => {
                write!(f, "host {host}/{protocol}")?;
                if *names != NameCheck::default() {
                    write!(f, " {names}")?;
                }
                Ok(())
            }
            EgressRule::Cidr {
                cidr,
                ports,
                protocol,
                allow_private,
            } => {
                write!(f, "cidr {cidr} ports {ports}/{protocol}")?;
                if *allow_private {
                    f.write_str(" allow_private")?;
                }
                Ok(())
            }
        }
    }
}

/// One validated `[[deny]]` rule: the grammar of an [`EgressRule`] (host rules with wildcards and
/// ports, CIDR rules with ports, a protocol), but no `allow_private`, and a CIDR rule may lie in
/// an always-denied range. Deny rules override every allow rule (see [`crate::matcher`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "RawRule", try_from = "RawRule")]
pub struct DenyRule(EgressRule);

impl DenyRule {
    /// Validates one deny rule from its fields as written. `allow_private`, `names` and
    /// `require_name` are refused: a deny rule opens nothing and checks no name.
    pub fn from_fields(fields: RuleFields<'_>) -> Result<DenyRule, RuleError> {
        if fields.allow_private.is_some() {
            return Err(RuleError::AllowPrivateOnDenyRule);
        }
        if fields.names.is_some() {
            return Err(RuleError::NamesOnDenyRule("names"));
        }
        if fields.require_name.is_some() {
            return Err(RuleError::NamesOnDenyRule("require_name"));
        }
        // `Some(true)` only skips the always-denied check of cidr rules; it is cleared below.
        let rule = EgressRule::from_fields(RuleFields {
            allow_private: fields.cidr.map(|_| true),
            ..fields
        })?;
        Ok(DenyRule(match rule {
            EgressRule::Cidr {
                cidr,
                ports,
                protocol,
                ..
            } => EgressRule::Cidr {
                cidr,
                ports,
                protocol,
                allow_private: false,
            },
            host => host,
        }))
    }

    /// The rule (a cidr rule always has `allow_private = false`).
    pub fn rule(&self) -> &EgressRule {
        &self.0
    }
}

impl fmt::Display for DenyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<DenyRule> for RawRule {
    fn from(r: DenyRule) -> RawRule {
        RawRule {
            allow_private: None,
            ..RawRule::from(r.0)
        }
    }
}

impl TryFrom<RawRule> for DenyRule {
    type Error = String;
    fn try_from(r: RawRule) -> Result<DenyRule, String> {
        DenyRule::from_fields(r.fields()).map_err(|e| {
            if e.field().is_empty() {
                e.to_string()
            } else {
                format!("{}: {e}", e.field())
            }
        })
    }
}

/// Why a rule was rejected. [`RuleError::field`] names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Both keys present.
    #[error("a rule has either host or cidr, not both")]
    HostAndCidr,
    /// Neither key present.
    #[error("a rule needs host or cidr")]
    NeitherHostNorCidr,
    /// `ports` given on a host rule.
    #[error("host rules carry their port in host (name:port); ports is only for cidr rules")]
    PortsOnHostRule,
    /// `allow_private` given on a host rule.
    #[error("allow_private is only for cidr rules")]
    AllowPrivateOnHostRule,
    /// `allow_private` given on a deny rule.
    #[error("allow_private is only for [[egress]] cidr rules; a deny rule opens nothing")]
    AllowPrivateOnDenyRule,
    /// Unknown protocol.
    #[error("unknown protocol `{0}` (expected tcp, udp or any)")]
    Protocol(String),
    /// HOST_PORT grammar.
    #[error("{0}")]
    Host(#[from] HostPortError),
    /// Not a network.
    #[error("`{0}` is not an IPv4 or IPv6 CIDR (e.g. 203.0.113.0/24)")]
    Cidr(String),
    /// Host bits set.
    #[error("`{0}` has host bits set; did you mean {1}?")]
    HostBits(String, String),
    /// `ports` missing on a cidr rule.
    #[error("cidr rules need ports (\"N\", \"lo-hi\" or \"0\" for all)")]
    MissingPorts,
    /// Bad `ports`.
    #[error("{0}")]
    Ports(#[from] PortError),
    /// `names`/`require_name` where they do not apply: on a cidr rule, or `require_name` with
    /// `names = "off"`.
    #[error("{0} is only for host rules with names = \"check\" (cidr rules are not name-checked)")]
    NamesOnCidrRule(&'static str),
    /// Unknown `names` value.
    #[error("unknown names `{0}` (expected check or off)")]
    Names(String),
    /// `names`/`require_name` on a `[[deny]]` rule: a deny rule refuses, it has no name check.
    #[error("{0} is only for [[egress]] host rules (a deny rule has no name check)")]
    NamesOnDenyRule(&'static str),
    /// Private range without `allow_private`.
    #[error("{0} lies in the always-denied {1} range {2}; set allow_private = true to allow it")]
    PrivateRange(String, &'static str, String),
}

impl RuleError {
    /// The key of the rule that is wrong (`""` when the rule as a whole is).
    pub fn field(&self) -> &'static str {
        match self {
            RuleError::HostAndCidr | RuleError::NeitherHostNorCidr => "",
            RuleError::PortsOnHostRule | RuleError::MissingPorts | RuleError::Ports(_) => "ports",
            RuleError::AllowPrivateOnHostRule | RuleError::AllowPrivateOnDenyRule => {
                "allow_private"
            }
            RuleError::Protocol(_) => "protocol",
            RuleError::Host(_) => "host",
            RuleError::Cidr(_) | RuleError::HostBits(..) | RuleError::PrivateRange(..) => "cidr",
            RuleError::NamesOnCidrRule(f) | RuleError::NamesOnDenyRule(f) => f,
            RuleError::Names(_) => "names",
        }
    }
}

/// The wire shape of a rule in the signed claims (same keys as the authoring format).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow_private: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    names: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    require_name: Option<bool>,
}

impl RawRule {
    fn fields(&self) -> RuleFields<'_> {
        RuleFields {
            host: self.host.as_deref(),
            cidr: self.cidr.as_deref(),
            ports: self.ports.as_deref(),
            protocol: self.protocol.as_deref(),
            allow_private: self.allow_private,
            names: self.names.as_deref(),
            require_name: self.require_name,
        }
    }
}

impl From<EgressRule> for RawRule {
    fn from(r: EgressRule) -> RawRule {
        match r {
            EgressRule::Host {
                host,
                protocol,
                names,
            } => RawRule {
                host: Some(host.to_string()),
                cidr: None,
                ports: None,
                protocol: Some(protocol.to_string()),
                allow_private: None,
                // Defaults are left out: unchanged policies sign to unchanged JSON.
                names: (names.names != Names::Check).then(|| names.names.as_str().to_owned()),
                require_name: names.require_name.then_some(true),
            },
            EgressRule::Cidr {
                cidr,
                ports,
                protocol,
                allow_private,
            } => RawRule {
                host: None,
                cidr: Some(cidr.to_string()),
                ports: Some(ports.to_string()),
                protocol: Some(protocol.to_string()),
                allow_private: Some(allow_private),
                names: None,
                require_name: None,
            },
        }
    }
}

impl TryFrom<RawRule> for EgressRule {
    type Error = String;
    fn try_from(r: RawRule) -> Result<EgressRule, String> {
        EgressRule::from_fields(r.fields()).map_err(|e| {
            if e.field().is_empty() {
                e.to_string()
            } else {
                format!("{}: {e}", e.field())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_rules_need_ports_and_clean_networks() {
        assert_eq!(
            EgressRule::from_fields(RuleFields::cidr("203.0.113.0/24")),
            Err(RuleError::MissingPorts)
        );
        assert!(matches!(
            EgressRule::from_fields(RuleFields::cidr("203.0.113.5/24").ports("443")),
            Err(RuleError::HostBits(_, ref s)) if s == "203.0.113.0/24"
        ));
        assert!(matches!(
            EgressRule::from_fields(RuleFields::cidr("203.0.113.0").ports("1")),
            Err(RuleError::Cidr(_))
        ));
        let r =
            EgressRule::from_fields(RuleFields::cidr("2001:db8::/32").ports("0").protocol("any"))
                .expect("valid");
        assert_eq!(r.to_string(), "cidr 2001:db8::/32 ports 0/any");
    }

    #[test]
    fn private_cidr_needs_allow_private_but_wide_cidr_does_not() {
        let e = EgressRule::from_fields(RuleFields::cidr("10.1.0.0/16").ports("5432"))
            .expect_err("private");
        assert_eq!(e.field(), "cidr");
        assert!(e.to_string().contains("allow_private"));
        assert!(EgressRule::from_fields(
            RuleFields::cidr("10.1.0.0/16")
                .ports("5432")
                .allow_private(true)
        )
        .is_ok());
        assert!(EgressRule::from_fields(RuleFields::cidr("0.0.0.0/0").ports("443")).is_ok());
    }

    #[test]
    fn host_rules_reject_cidr_only_keys() {
        assert_eq!(
            EgressRule::from_fields(RuleFields::host("a.example.com").ports("1")),
            Err(RuleError::PortsOnHostRule)
        );
        assert_eq!(
            EgressRule::from_fields(RuleFields::host("a.example.com").allow_private(false)),
            Err(RuleError::AllowPrivateOnHostRule)
        );
        assert_eq!(
            EgressRule::from_fields(RuleFields {
                cidr: Some("203.0.113.0/24"),
                ..RuleFields::host("a.example.com")
            }),
            Err(RuleError::HostAndCidr)
        );
        assert_eq!(
            EgressRule::from_fields(RuleFields::default()),
            Err(RuleError::NeitherHostNorCidr)
        );
        assert_eq!(
            EgressRule::from_fields(RuleFields::host("a.example.com").protocol("TCP")),
            Err(RuleError::Protocol("TCP".into()))
        );
    }

    #[test]
    fn name_checks_belong_to_host_rules_and_default_to_check() {
        let r = EgressRule::from_fields(RuleFields::host("a.example.com")).expect("ok");
        assert_eq!(r.name_check(), Some(NameCheck::default()));
        assert!(NameCheck::default().checks());
        let r =
            EgressRule::from_fields(RuleFields::host("a.example.com").names("off")).expect("ok");
        assert_eq!(r.to_string(), "host a.example.com:443/tcp names off");
        let e = EgressRule::from_fields(
            RuleFields::cidr("203.0.113.0/24")
                .ports("443")
                .require_name(true),
        )
        .expect_err("cidr");
        assert_eq!(e.field(), "require_name");
        let e = EgressRule::from_fields(RuleFields::host("a.example.com").names("strict"))
            .expect_err("value");
        assert_eq!(e.field(), "names");
    }

    #[test]
    fn name_checks_round_trip_and_defaults_stay_out_of_the_json() {
        let r = EgressRule::from_fields(RuleFields::host("a.example.com:443").require_name(true))
            .expect("ok");
        let j = serde_json::to_string(&r).expect("ser");
        assert_eq!(
            j,
            r#"{"host":"a.example.com:443","protocol":"tcp","require_name":true}"#
        );
        assert_eq!(serde_json::from_str::<EgressRule>(&j).expect("de"), r);
        let off = r#"{"host":"a.example.com:443","protocol":"tcp","names":"off"}"#;
        let r: EgressRule = serde_json::from_str(off).expect("de");
        assert!(!r.name_check().expect("host").checks());
        assert!(serde_json::from_str::<EgressRule>(
            r#"{"cidr":"203.0.113.0/24","ports":"1","names":"check"}"#
        )
        .is_err());
    }

    #[test]
    fn rules_round_trip_through_json_and_json_is_rechecked() {
        let r = EgressRule::from_fields(RuleFields::host("*.Example.com:0").protocol("udp"))
            .expect("valid");
        let j = serde_json::to_string(&r).expect("ser");
        assert_eq!(j, r#"{"host":"*.example.com:0","protocol":"udp"}"#);
        assert_eq!(serde_json::from_str::<EgressRule>(&j).expect("de"), r);
        let bad =
            serde_json::from_str::<EgressRule>(r#"{"host":"*.com"}"#).expect_err("tld wildcard");
        assert!(
            bad.to_string()
                .contains("host: wildcard at top-level-domain"),
            "{bad}"
        );
        assert!(
            serde_json::from_str::<EgressRule>(r#"{"host":"a.example.com","color":"red"}"#)
                .is_err()
        );
    }

    #[test]
    fn deny_rules_take_the_egress_grammar_and_may_name_private_ranges() {
        let d = DenyRule::from_fields(RuleFields::cidr("10.0.0.0/8").ports("0").protocol("any"))
            .expect("private deny");
        assert_eq!(d.to_string(), "cidr 10.0.0.0/8 ports 0/any");
        let j = serde_json::to_string(&d).expect("ser");
        assert_eq!(j, r#"{"cidr":"10.0.0.0/8","ports":"0","protocol":"any"}"#);
        assert_eq!(serde_json::from_str::<DenyRule>(&j).expect("de"), d);
        assert_eq!(
            DenyRule::from_fields(
                RuleFields::cidr("10.0.0.0/8")
                    .ports("0")
                    .allow_private(false)
            ),
            Err(RuleError::AllowPrivateOnDenyRule)
        );
        assert!(serde_json::from_str::<DenyRule>(
            r#"{"cidr":"10.0.0.0/8","ports":"0","allow_private":true}"#
        )
        .expect_err("allow_private")
        .to_string()
        .contains("allow_private"));
        let h = DenyRule::from_fields(RuleFields::host("*.Tracker.example.com:0")).expect("host");
        assert_eq!(h.to_string(), "host *.tracker.example.com:0/tcp");
        assert!(matches!(
            DenyRule::from_fields(RuleFields::host("*.com")),
            Err(RuleError::Host(_))
        ));
        assert_eq!(
            DenyRule::from_fields(RuleFields::cidr("203.0.113.0/24")),
            Err(RuleError::MissingPorts)
        );
    }

    #[test]
    fn signed_deny_rules_with_name_check_fields_are_refused_like_authored_ones() {
        // The claims decoder and the TOML authoring path share one validation: a deny rule
        // that carries `names` or `require_name` is refused, never accepted with the field lost.
        for (json, field) in [
            (r#"{"host":"a.example.com:443","names":"off"}"#, "names"),
            (
                r#"{"host":"a.example.com:443","require_name":true}"#,
                "require_name",
            ),
        ] {
            let e = serde_json::from_str::<DenyRule>(json).expect_err(field);
            assert!(e.to_string().contains(field), "{e}");
        }
        assert_eq!(
            DenyRule::from_fields(RuleFields::host("a.example.com:443").names("check")),
            Err(RuleError::NamesOnDenyRule("names"))
        );
    }
}
