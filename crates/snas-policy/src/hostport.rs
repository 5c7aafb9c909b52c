//! The HOST_PORT grammar of `host` rules (Snowflake's network-rule grammar) and port ranges.
//!
//! # Grammar
//! `name[:port | :lo-hi]`
//! - Default port 443; `:0` means all ports (1–65535; port 0 itself is never reachable);
//!   ports 1–65535, `lo <= hi`.
//! - Names are case-insensitive (stored lower-case) and a single trailing dot is ignored. Labels
//!   are 1–63 characters of `[a-z0-9-]`, the whole name at most 253.
//! - At most one `*` per value. It matches `[A-Za-z0-9-]*` inside one label (`*.example.com`
//!   matches `a.example.com`, not `example.com`, not `a.b.example.com`; `api-*.example.com`
//!   matches `api-eu.example.com`). The wildcard may not sit in the last label and the labels after
//!   it must be at least two (`*.com`, `api.*.com` are rejected as TLD-level wildcards). Without a
//!   public-suffix list, `*.co.uk` is accepted: signers are trusted to know their suffixes.
//! - `0.0.0.0` means any host, but only on ports 80 and 443: `0.0.0.0` (both), `0.0.0.0:80`,
//!   `0.0.0.0:443`. Any other port is rejected.
//! - IP literals (and names whose last label is numeric) are rejected: addresses belong in `cidr`
//!   rules.
//!
//! # Canonical form
//! [`HostPort`]'s `Display` writes the lower-case name without trailing dot and always with an
//! explicit port (`api.example.com:443`, `*.example.com:0`), except `0.0.0.0` for the 80+443 pair.
//! Parsing the canonical form gives the same value; signed claims carry the canonical form.

use std::fmt;
use std::net::IpAddr;

/// Longest accepted HOST_PORT value, in bytes (name 253 + `:65535-65535`).
pub const MAX_HOST_PORT_LEN: usize = 253 + 12;
/// Longest DNS name, without trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
pub const MAX_LABEL_LEN: usize = 63;

/// An inclusive port range within 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

/// Why a port specification was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Empty after the colon.
    #[error("empty port")]
    Empty,
    /// Not digits, or more than one `-`.
    #[error("`{0}` is not a port: expected N, lo-hi, or 0 for all ports")]
    Syntax(String),
    /// Outside 1–65535 (or 0 inside a range).
    #[error("port {0} out of range 1-65535")]
    OutOfRange(String),
    /// `lo > hi`.
    #[error("port range {0}-{1} is reversed")]
    Reversed(u16, u16),
}

fn parse_port_number(s: &str) -> Result<u32, PortError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortError::Syntax(s.to_owned()));
    }
    s.parse::<u32>()
        .map_err(|_| PortError::Syntax(s.to_owned()))
}

impl PortRange {
    /// Every port, 1–65535 (what `0` means in the grammar).
    pub const ALL: PortRange = PortRange { lo: 1, hi: 65535 };
    /// The default port of host rules.
    pub const HTTPS: PortRange = PortRange { lo: 443, hi: 443 };
    /// Port 80.
    pub const HTTP: PortRange = PortRange { lo: 80, hi: 80 };

    /// A range `lo..=hi`; `None` if `lo == 0` or `lo > hi`.
    pub const fn new(lo: u16, hi: u16) -> Option<PortRange> {
        if lo == 0 || lo > hi {
            None
        } else {
            Some(PortRange { lo, hi })
        }
    }

    /// Lowest port.
    pub const fn lo(self) -> u16 {
        self.lo
    }

    /// Highest port.
    pub const fn hi(self) -> u16 {
        self.hi
    }

    /// Whether `port` is inside.
    pub const fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    /// Parses `N`, `lo-hi` or `0` (all ports).
    pub fn parse(s: &str) -> Result<PortRange, PortError> {
        if s.is_empty() {
            return Err(PortError::Empty);
        }
        match s.split_once('-') {
            None => {
                let n = parse_port_number(s)?;
                match n {
                    0 => Ok(PortRange::ALL),
                    1..=65535 => Ok(PortRange {
                        lo: n as u16,
                        hi: n as u16,
                    }),
                    _ => Err(PortError::OutOfRange(s.to_owned())),
                }
            }
            Some((a, b)) => {
                let lo = parse_port_number(a)?;
                let hi = parse_port_number(b)?;
                for (n, t) in [(lo, a), (hi, b)] {
                    if !(1..=65535).contains(&n) {
                        return Err(PortError::OutOfRange(t.to_owned()));
                    }
                }
                let (lo, hi) = (lo as u16, hi as u16);
                PortRange::new(lo, hi).ok_or(PortError::Reversed(lo, hi))
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            f.write_str("0")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// The host part of a `host` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `0.0.0.0`: any host name (ports restricted to 80/443).
    AnyHost,
    /// One name, lower-case, no trailing dot.
    Exact(String),
    /// A name with one `*` in a non-final label.
    Wildcard(Wildcard),
}

/// A wildcard name `before` + `prefix*suffix` + `.` + `parent`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Wildcard {
    /// Labels before the wildcard label, each followed by `.` (usually empty).
    pub before: String,
    /// Literal text before `*` in the wildcard label.
    pub prefix: String,
    /// Literal text after `*` in the wildcard label.
    pub suffix: String,
    /// Labels after the wildcard label (at least two), without leading dot.
    pub parent: String,
}

impl Wildcard {
    /// Whether a normalised name (lower-case, no trailing dot, valid labels) matches.
    pub fn matches(&self, name: &str) -> bool {
        let Some(head) = name.strip_suffix(self.parent.as_str()) else {
            return false;
        };
        let Some(head) = head.strip_suffix('.') else {
            return false;
        };
        let Some(label) = head.strip_prefix(self.before.as_str()) else {
            return false;
        };
        self.label_matches(label)
    }

    /// Whether one label (no dots) matches `prefix*suffix`.
    pub fn label_matches(&self, label: &str) -> bool {
        !label.is_empty()
            && label.len() >= self.prefix.len() + self.suffix.len()
            && label.starts_with(self.prefix.as_str())
            && label.ends_with(self.suffix.as_str())
            && label.bytes().all(is_label_byte)
    }
}

/// Which ports a host rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostPorts {
    /// One range.
    Range(PortRange),
    /// Ports 80 and 443 (bare `0.0.0.0`).
    HttpAndHttps,
}

impl HostPorts {
    /// Whether `port` is allowed.
    pub const fn contains(self, port: u16) -> bool {
        match self {
            HostPorts::Range(r) => r.contains(port),
            HostPorts::HttpAndHttps => port == 80 || port == 443,
        }
    }
}

/// A parsed HOST_PORT value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host part.
    pub pattern: HostPattern,
    /// The port part.
    pub ports: HostPorts,
}

/// Why a HOST_PORT value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// Empty value or empty name.
    #[error("empty host")]
    Empty,
    /// Longer than [`MAX_HOST_PORT_LEN`] or the name longer than 253.
    #[error("host name longer than 253 characters")]
    TooLong,
    /// An IPv4/IPv6 literal.
    #[error("`{0}` is an IP address; use a cidr rule (cidr = \"{0}/32\" or /128, with ports) for addresses")]
    IpLiteral(String),
    /// Bad port part.
    #[error("{0}")]
    Port(#[from] PortError),
    /// `0.0.0.0` with a port other than 80 or 443.
    #[error(
        "0.0.0.0 (any host) is only allowed on ports 80 and 443 (0.0.0.0, 0.0.0.0:80, 0.0.0.0:443)"
    )]
    AnyHostPort,
    /// `a..b`, leading dot.
    #[error("empty label in `{0}`")]
    EmptyLabel(String),
    /// A label above 63 characters.
    #[error("label longer than 63 characters")]
    LabelTooLong,
    /// Characters outside `[A-Za-z0-9-]` (and `*`).
    #[error("invalid character {0:?} in host name (allowed: letters, digits, '-', one '*')")]
    BadChar(char),
    /// Two or more `*`.
    #[error("at most one * per host")]
    TwoWildcards,
    /// `*` in the last label.
    #[error("wildcard not allowed in the last label")]
    WildcardInLastLabel,
    /// `*.com`.
    #[error("wildcard at top-level-domain level is not allowed (at least two labels must follow the wildcard label)")]
    TldWildcard,
    /// Last label numeric (looks like an address).
    #[error("`{0}` looks like an IP address (numeric last label); use a cidr rule for addresses")]
    NumericTld(String),
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

impl HostPort {
    /// Parses the grammar in the module docs.
    pub fn parse(s: &str) -> Result<HostPort, HostPortError> {
        if s.is_empty() {
            return Err(HostPortError::Empty);
        }
        if s.len() > MAX_HOST_PORT_LEN {
            return Err(HostPortError::TooLong);
        }
        let bracketed = s.starts_with('[');
        if bracketed || (s != "0.0.0.0" && s.parse::<IpAddr>().is_ok()) {
            let addr = if bracketed {
                s.trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or_default()
            } else {
                s
            };
            return Err(HostPortError::IpLiteral(addr.to_owned()));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if host.contains(':') {
            return Err(match host.parse::<IpAddr>() {
                Ok(_) => HostPortError::IpLiteral(host.to_owned()),
                Err(_) => HostPortError::BadChar(':'),
            });
        }
        let ports = port.map(PortRange::parse).transpose()?;
        let host = host.strip_suffix('.').unwrap_or(host);
        if host == "0.0.0.0" {
            let ports = match ports {
                None => HostPorts::HttpAndHttps,
                Some(p) if p == PortRange::HTTP || p == PortRange::HTTPS => HostPorts::Range(p),
                Some(_) => return Err(HostPortError::AnyHostPort),
            };
            return Ok(HostPort {
                pattern: HostPattern::AnyHost,
                ports,
            });
        }
        if host.parse::<IpAddr>().is_ok() {
            return Err(HostPortError::IpLiteral(host.to_owned()));
        }
        let ports = HostPorts::Range(ports.unwrap_or(PortRange::HTTPS));
        let pattern = parse_name_pattern(host)?;
        Ok(HostPort { pattern, ports })
    }
}

fn parse_name_pattern(host: &str) -> Result<HostPattern, HostPortError> {
    if host.is_empty() {
        return Err(HostPortError::Empty);
    }
    if host.len() > MAX_NAME_LEN {
        return Err(HostPortError::TooLong);
    }
    let lower = host.to_ascii_lowercase();
    if lower.bytes().filter(|&b| b == b'*').count() > 1 {
        return Err(HostPortError::TwoWildcards);
    }
    let labels: Vec<&str> = lower.split('.').collect();
    let mut wildcard_at = None;
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return Err(HostPortError::EmptyLabel(host.to_owned()));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostPortError::LabelTooLong);
        }
        for c in label.chars() {
            if c == '*' {
                wildcard_at = Some(i);
            } else if !(c.is_ascii() && is_label_byte(c as u8)) {
                return Err(HostPortError::BadChar(c));
            }
        }
    }
    let last = labels.len() - 1;
    if labels[last].bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostPortError::NumericTld(host.to_owned()));
    }
    let Some(w) = wildcard_at else {
        return Ok(HostPattern::Exact(lower));
    };
    if w == last {
        return Err(HostPortError::WildcardInLastLabel);
    }
    if last - w < 2 {
        return Err(HostPortError::TldWildcard);
    }
    let (prefix, suffix) = labels[w].split_once('*').unwrap_or_default();
    let before: String = labels[..w].iter().map(|l| format!("{l}.")).collect();
    Ok(HostPattern::Wildcard(Wildcard {
        before,
        prefix: prefix.to_owned(),
        suffix: suffix.to_owned(),
        parent: labels[w + 1..].join("."),
    }))
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::AnyHost => f.write_str("0.0.0.0"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Wildcard(w) => {
                write!(f, "{}{}*{}.{}", w.before, w.prefix, w.suffix, w.parent)
            }
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports {
            HostPorts::HttpAndHttps => write!(f, "{}", self.pattern),
            HostPorts::Range(r) => write!(f, "{}:{r}", self.pattern),
        }
    }
}

/// Normalises a name for lookup into `buf`: lower-case, one trailing dot removed, labels checked
/// (`[a-z0-9-]{1,63}`, total <= 253). `None` if the name is not a valid DNS host name.
/// Allocation-free so that it can run per lookup.
pub fn normalize_name<'a>(name: &str, buf: &'a mut [u8; MAX_NAME_LEN]) -> Option<&'a str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN {
        return None;
    }
    let mut label_len = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        let l = b.to_ascii_lowercase();
        if l == b'.' {
            if label_len == 0 {
                return None;
            }
            label_len = 0;
        } else if is_label_byte(l) {
            label_len += 1;
            if label_len > MAX_LABEL_LEN {
                return None;
            }
        } else {
            return None;
        }
        buf[i] = l;
    }
    if label_len == 0 {
        return None;
    }
    std::str::from_utf8(&buf[..bytes.len()]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> HostPort {
        HostPort::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> HostPortError {
        match HostPort::parse(s) {
            Ok(h) => panic!("{s} accepted as {h}"),
            Err(e) => e,
        }
    }

    #[test]
    fn default_port_is_443_and_zero_means_all() {
        assert_eq!(
            ok("api.example.com").ports,
            HostPorts::Range(PortRange::HTTPS)
        );
        assert_eq!(
            ok("api.example.com:0").ports,
            HostPorts::Range(PortRange::ALL)
        );
        assert_eq!(
            ok("api.example.com:8080").ports,
            HostPorts::Range(PortRange::new(8080, 8080).expect("range"))
        );
        assert_eq!(
            ok("api.example.com:1000-2000").ports,
            HostPorts::Range(PortRange::new(1000, 2000).expect("range"))
        );
    }

    #[test]
    fn ports_out_of_range_or_malformed_are_rejected() {
        assert_eq!(
            err("a.example.com:65536"),
            HostPortError::Port(PortError::OutOfRange("65536".into()))
        );
        assert!(matches!(
            err("a.example.com:0-10"),
            HostPortError::Port(PortError::OutOfRange(_))
        ));
        assert_eq!(
            err("a.example.com:20-10"),
            HostPortError::Port(PortError::Reversed(20, 10))
        );
        assert_eq!(err("a.example.com:"), HostPortError::Port(PortError::Empty));
        assert!(matches!(
            err("a.example.com:http"),
            HostPortError::Port(PortError::Syntax(_))
        ));
        assert!(matches!(
            err("a.example.com:1-2-3"),
            HostPortError::Port(PortError::Syntax(_))
        ));
        assert!(matches!(
            err("a.example.com:+1"),
            HostPortError::Port(PortError::Syntax(_))
        ));
    }

    #[test]
    fn names_are_case_insensitive_and_trailing_dot_ignored() {
        let a = ok("API.Example.COM.");
        assert_eq!(a.pattern, HostPattern::Exact("api.example.com".into()));
        assert_eq!(a.to_string(), "api.example.com:443");
        assert_eq!(ok("api.example.com.:80").to_string(), "api.example.com:80");
    }

    #[test]
    fn wildcard_matches_inside_one_label_only() {
        let HostPattern::Wildcard(w) = ok("*.example.com").pattern else {
            panic!("not wildcard")
        };
        assert!(w.matches("a.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("a.b.example.com"));
        assert!(!w.matches("aexample.com"));
        let HostPattern::Wildcard(w) = ok("api-*.example.com").pattern else {
            panic!("not wildcard")
        };
        assert!(w.matches("api-eu.example.com"));
        assert!(w.matches("api-.example.com"));
        assert!(!w.matches("api.example.com"));
        assert!(!w.matches("web-eu.example.com"));
        let HostPattern::Wildcard(w) = ok("eu.*-api.example.com").pattern else {
            panic!("not wildcard")
        };
        assert!(w.matches("eu.v1-api.example.com"));
        assert!(!w.matches("us.v1-api.example.com"));
    }

    #[test]
    fn wildcard_placement_rules() {
        assert_eq!(err("*.*.example.com"), HostPortError::TwoWildcards);
        assert_eq!(err("a*b*.example.com"), HostPortError::TwoWildcards);
        assert_eq!(err("example.*"), HostPortError::WildcardInLastLabel);
        assert_eq!(err("example.c*m"), HostPortError::WildcardInLastLabel);
        assert_eq!(err("*.com"), HostPortError::TldWildcard);
        assert_eq!(err("api.*.com"), HostPortError::TldWildcard);
        assert_eq!(err("*"), HostPortError::WildcardInLastLabel);
        assert_eq!(
            ok("*.s3.amazonaws.com:443").to_string(),
            "*.s3.amazonaws.com:443"
        );
    }

    #[test]
    fn any_host_only_on_80_and_443() {
        let a = ok("0.0.0.0");
        assert_eq!(
            a,
            HostPort {
                pattern: HostPattern::AnyHost,
                ports: HostPorts::HttpAndHttps
            }
        );
        assert!(a.ports.contains(80) && a.ports.contains(443) && !a.ports.contains(8080));
        assert_eq!(ok("0.0.0.0:443").ports, HostPorts::Range(PortRange::HTTPS));
        assert_eq!(ok("0.0.0.0:80").ports, HostPorts::Range(PortRange::HTTP));
        assert_eq!(err("0.0.0.0:8080"), HostPortError::AnyHostPort);
        assert_eq!(err("0.0.0.0:0"), HostPortError::AnyHostPort);
        assert_eq!(err("0.0.0.0:80-443"), HostPortError::AnyHostPort);
        assert_eq!(ok("0.0.0.0").to_string(), "0.0.0.0");
    }

    #[test]
    fn ip_literals_point_to_cidr() {
        for s in [
            "192.0.2.1",
            "192.0.2.1:443",
            "2001:db8::1",
            "[2001:db8::1]:443",
            "[2001:db8::1]",
        ] {
            let e = err(s);
            assert!(matches!(e, HostPortError::IpLiteral(_)), "{s}: {e:?}");
            assert!(e.to_string().contains("cidr"));
        }
        assert!(matches!(err("1.2.3"), HostPortError::NumericTld(_)));
    }

    #[test]
    fn bad_names_are_rejected() {
        assert_eq!(err(""), HostPortError::Empty);
        assert_eq!(err(":443"), HostPortError::Empty);
        assert!(matches!(
            err("a..example.com"),
            HostPortError::EmptyLabel(_)
        ));
        assert!(matches!(err(".example.com"), HostPortError::EmptyLabel(_)));
        assert_eq!(err("a_b.example.com"), HostPortError::BadChar('_'));
        assert_eq!(err("a b.example.com"), HostPortError::BadChar(' '));
        assert_eq!(err("exämple.com"), HostPortError::BadChar('ä'));
        assert_eq!(
            err(&format!("{}.com", "a".repeat(64))),
            HostPortError::LabelTooLong
        );
        let long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(err(&long), HostPortError::TooLong);
    }

    #[test]
    fn canonical_form_reparses_to_same_value() {
        for s in [
            "Api.Example.com",
            "*.example.com:0",
            "x-*.y.example.org:10-20",
            "0.0.0.0",
            "0.0.0.0:80",
            "a.b:1",
        ] {
            let h = ok(s);
            assert_eq!(ok(&h.to_string()), h, "{s}");
        }
    }

    #[test]
    fn normalize_name_lowercases_and_validates() {
        let mut buf = [0u8; MAX_NAME_LEN];
        assert_eq!(
            normalize_name("API.Example.com.", &mut buf),
            Some("api.example.com")
        );
        assert_eq!(normalize_name("a..b", &mut buf), None);
        assert_eq!(normalize_name("", &mut buf), None);
        assert_eq!(normalize_name(".", &mut buf), None);
        assert_eq!(normalize_name("a*.b", &mut buf), None);
        assert_eq!(normalize_name("a.b.", &mut buf), Some("a.b"));
        assert_eq!(normalize_name("a.b..", &mut buf), None);
    }
}
