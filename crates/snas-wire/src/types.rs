//! The vocabulary the crates share: identities, serials, rates and protocols, written once.
//!
//! Every crate of the workspace depends on snas-wire, so the types that cross a crate, a map or
//! a JSON boundary live here rather than as bare integers restated (and re-formatted) at each
//! end. serde support is behind the `serde` feature so the codecs stay dependency-light.
//!
//! # Types and their invariants
//! - [`JobKey`]: the 64-bit job identity carried in the GENEVE option, the tier-1 maps and every
//!   API. Spelt as exactly 16 lower-case hex digits ([`fmt::Display`] / [`FromStr`]); with serde
//!   it is a plain integer by default (records on disk) and the hex string with
//!   `#[serde(with = "snas_wire::types::job_key_hex")]` (JSON APIs, audit lines).
//! - [`TenantId`]: the 32-bit tenant id carried in the GENEVE option (a hash of the tenant name,
//!   `snas_policy::identity::tenant_id`). Decimal in JSON and text ([`fmt::Display`], as the
//!   proxy's and agent's APIs have always sent it), `{:x}` for hex.
//! - [`PolicySerial`]: the serial of a signed policy. 32 bits, because the GENEVE option and
//!   the tier-1 `job_cfg` carry 32 bits; a larger claim is refused when the policy is verified
//!   ([`PolicySerial::try_from`] a `u64`), never truncated.
//! - [`Bps`]: a rate in bits per second, never zero. "No limit" is `Option<Bps>::None` where a
//!   place allows it; a rate of zero cannot be written. The text grammar (`100Mbit`) is the
//!   policy's ([`Bps::parse`]).
//! - [`L4Proto`]: the transport protocol of one flow (TCP, UDP, ICMP echo, ICMPv6 echo).
//! - [`RuleProtocol`]: what a port rule allows (`tcp`, `udp` or `any` = both). Distinct from
//!   [`L4Proto`] on purpose: it is a *set* of transports, and has no ICMP.
//!
//! Overlay constants (GENEVE port 6081, the 56-byte overhead, the sandbox MTU) are in
//! [`crate::geneve`]: [`crate::geneve::GENEVE_PORT`], [`crate::geneve::OVERLAY_OVERHEAD`],
//! [`crate::geneve::sandbox_mtu`].

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use crate::ip::proto;

// ---------------------------------------------------------------------------------------------
// JobKey

/// The 64-bit identity of a job (`snas_policy::identity::job_key` of its policy id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct JobKey(pub u64);

impl JobKey {
    /// Number of hex digits in the text form.
    pub const HEX_LEN: usize = 16;

    /// The key as an integer (what the overlay option and the BPF maps carry).
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for JobKey {
    fn from(v: u64) -> JobKey {
        JobKey(v)
    }
}

impl From<JobKey> for u64 {
    fn from(k: JobKey) -> u64 {
        k.0
    }
}

impl fmt::Display for JobKey {
    /// Exactly 16 lower-case hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::LowerHex for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Why a string is not a job key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a job key: expected exactly 16 lower-case hex digits (0-9, a-f)")]
pub struct JobKeyError(pub String);

impl FromStr for JobKey {
    type Err = JobKeyError;

    /// Accepts exactly the [`fmt::Display`] form: 16 digits of `0-9a-f`, no prefix, no sign.
    fn from_str(s: &str) -> Result<JobKey, JobKeyError> {
        let ok = s.len() == JobKey::HEX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(JobKeyError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(JobKey)
            .map_err(|_| JobKeyError(s.to_owned()))
    }
}

/// serde as the 16-hex-digit string: `#[serde(with = "snas_wire::types::job_key_hex")]`.
#[cfg(feature = "serde")]
pub mod job_key_hex {
    use super::JobKey;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the key as its 16 hex digits.
    pub fn serialize<S: Serializer>(k: &JobKey, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }

    /// Reads exactly 16 lower-case hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<JobKey, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// TenantId

/// The 32-bit overlay identity of a tenant (`snas_policy::identity::tenant_id` of its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct TenantId(pub u32);

impl TenantId {
    /// The id as the overlay option and the tier-1 maps carry it.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for TenantId {
    fn from(v: u32) -> TenantId {
        TenantId(v)
    }
}

impl From<TenantId> for u32 {
    fn from(t: TenantId) -> u32 {
        t.0
    }
}

impl fmt::Display for TenantId {
    /// Decimal, as the JSON APIs carry it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

// ---------------------------------------------------------------------------------------------
// PolicySerial

/// The serial of a signed policy; a live update of a job carries a higher one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct PolicySerial(pub u32);

impl PolicySerial {
    /// The serial as the overlay option and `job_cfg` carry it.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for PolicySerial {
    fn from(v: u32) -> PolicySerial {
        PolicySerial(v)
    }
}

impl From<PolicySerial> for u32 {
    fn from(s: PolicySerial) -> u32 {
        s.0
    }
}

impl From<PolicySerial> for u64 {
    fn from(s: PolicySerial) -> u64 {
        u64::from(s.0)
    }
}

/// A serial above `u32::MAX`: the overlay option carries 32 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} does not fit the overlay option's 32-bit policy serial (at most 4294967295)")]
pub struct PolicySerialError(pub u64);

impl TryFrom<u64> for PolicySerial {
    type Error = PolicySerialError;
    fn try_from(v: u64) -> Result<PolicySerial, PolicySerialError> {
        u32::try_from(v)
            .map(PolicySerial)
            .map_err(|_| PolicySerialError(v))
    }
}

impl FromStr for PolicySerial {
    type Err = std::num::ParseIntError;
    /// A decimal `u32`.
    fn from_str(s: &str) -> Result<PolicySerial, Self::Err> {
        s.parse().map(PolicySerial)
    }
}

impl fmt::Display for PolicySerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

// ---------------------------------------------------------------------------------------------
// Bps

/// A rate in bits per second; never zero (see the module docs for "no limit").
///
/// # Grammar of [`Bps::parse`]
/// `<integer><unit>`, optional single space, unit case-insensitive, decimal multipliers
/// (1 Kbit = 1000 bit): `bit`/`bps`, `Kbit`/`Kbps`, `Mbit`/`Mbps`, `Gbit`/`Gbps`. Byte units
/// (`MB`, `MiB`) are rejected on purpose: rates are in bits. Zero is rejected, and so is
/// anything above [`Bps::MAX`] (1 Tbit/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bps(NonZeroU64);

/// Why a bandwidth (string or integer) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BpsError {
    /// The message names the accepted form.
    #[error("`{0}` is not a bandwidth: expected a whole number and a unit (bit, Kbit, Mbit, Gbit; or bps, Kbps, Mbps, Gbps), e.g. \"100Mbit\"")]
    Syntax(String),
    /// Byte-based units are refused to avoid an 8x mistake.
    #[error("`{0}` uses a byte unit; bandwidth is given in bits (e.g. \"800Mbit\" for 100 MB/s)")]
    ByteUnit(String),
    /// Zero would block all traffic silently.
    #[error("bandwidth must be greater than zero")]
    Zero,
    /// Larger than 1 Tbit/s.
    #[error("bandwidth above the maximum of 1Tbit (1000Gbit)")]
    TooLarge,
}

impl Bps {
    /// Largest rate the grammar accepts: 1 Tbit/s.
    pub const MAX: Bps = match NonZeroU64::new(1_000_000_000_000) {
        Some(v) => Bps(v),
        None => panic!("1 Tbit/s is not zero"),
    };

    /// `bits` per second; `None` for 0 (a rate is never zero).
    pub const fn new(bits: u64) -> Option<Bps> {
        match NonZeroU64::new(bits) {
            Some(v) => Some(Bps(v)),
            None => None,
        }
    }

    /// A non-zero count of bits per second.
    pub const fn from_nonzero(bits: NonZeroU64) -> Bps {
        Bps(bits)
    }

    /// `n` Mbit/s; `None` for 0 or on overflow.
    pub const fn mbit(n: u64) -> Option<Bps> {
        match n.checked_mul(1_000_000) {
            Some(v) => Bps::new(v),
            None => None,
        }
    }

    /// `n` Gbit/s; `None` for 0 or on overflow.
    pub const fn gbit(n: u64) -> Option<Bps> {
        match n.checked_mul(1_000_000_000) {
            Some(v) => Bps::new(v),
            None => None,
        }
    }

    /// The rate in bits per second (at least 1).
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The rate as a `NonZeroU64`.
    pub const fn nonzero(self) -> NonZeroU64 {
        self.0
    }

    /// Parses the grammar in the type docs.
    pub fn parse(s: &str) -> Result<Bps, BpsError> {
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let (num, unit) = t.split_at(digits);
        let unit = unit.strip_prefix(' ').unwrap_or(unit);
        let lower = unit.to_ascii_lowercase();
        let mult: u64 = match lower.as_str() {
            "bit" | "bps" => 1,
            "kbit" | "kbps" => 1_000,
            "mbit" | "mbps" => 1_000_000,
            "gbit" | "gbps" => 1_000_000_000,
            "b" | "kb" | "mb" | "gb" | "kib" | "mib" | "gib" | "byte" | "bytes" => {
                return Err(BpsError::ByteUnit(s.to_owned()))
            }
            _ => return Err(BpsError::Syntax(s.to_owned())),
        };
        if num.is_empty() || num.len() > 15 {
            return Err(if num.len() > 15 {
                BpsError::TooLarge
            } else {
                BpsError::Syntax(s.to_owned())
            });
        }
        let n: u64 = num.parse().map_err(|_| BpsError::Syntax(s.to_owned()))?;
        let v = n.checked_mul(mult).ok_or(BpsError::TooLarge)?;
        Bps::checked(v)
    }

    /// `bits` per second if it is within `1 ..= MAX`.
    pub fn checked(bits: u64) -> Result<Bps, BpsError> {
        let b = Bps::new(bits).ok_or(BpsError::Zero)?;
        if b > Bps::MAX {
            return Err(BpsError::TooLarge);
        }
        Ok(b)
    }
}

impl From<NonZeroU64> for Bps {
    fn from(v: NonZeroU64) -> Bps {
        Bps(v)
    }
}

impl TryFrom<u64> for Bps {
    type Error = BpsError;
    /// Any non-zero rate (no upper bound: that is the grammar's, [`Bps::checked`]).
    fn try_from(v: u64) -> Result<Bps, BpsError> {
        Bps::new(v).ok_or(BpsError::Zero)
    }
}

impl FromStr for Bps {
    type Err = BpsError;
    fn from_str(s: &str) -> Result<Bps, BpsError> {
        Bps::parse(s)
    }
}

impl fmt::Display for Bps {
    /// The largest unit that represents the value exactly: `100Mbit`, `1500Kbit`, `7bit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.get();
        for (m, u) in [
            (1_000_000_000, "Gbit"),
            (1_000_000, "Mbit"),
            (1_000, "Kbit"),
        ] {
            if v >= m && v % m == 0 {
                return write!(f, "{}{u}", v / m);
            }
        }
        write!(f, "{v}bit")
    }
}

/// serde: an integer of bits per second; 0 is refused.
#[cfg(feature = "serde")]
impl serde::Serialize for Bps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Bps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bps, D::Error> {
        let v = u64::deserialize(d)?;
        Bps::try_from(v).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Protocols

/// Transport protocol of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum L4Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (IPv4).
    Icmp,
    /// ICMPv6 echo.
    Icmpv6,
}

impl L4Proto {
    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => proto::TCP,
            L4Proto::Udp => proto::UDP,
            L4Proto::Icmp => proto::ICMP,
            L4Proto::Icmpv6 => proto::ICMPV6,
        }
    }

    /// The protocol of an IP protocol number, if it is one of ours.
    pub const fn from_number(n: u8) -> Option<L4Proto> {
        match n {
            proto::TCP => Some(L4Proto::Tcp),
            proto::UDP => Some(L4Proto::Udp),
            proto::ICMP => Some(L4Proto::Icmp),
            proto::ICMPV6 => Some(L4Proto::Icmpv6),
            _ => None,
        }
    }

    /// Lower-case name: `tcp`, `udp`, `icmp`, `icmpv6` (audit records, flow tables).
    pub const fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
            L4Proto::Icmp => "icmp",
            L4Proto::Icmpv6 => "icmpv6",
        }
    }
}

impl fmt::Display for L4Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The transports a port rule allows: `tcp`, `udp`, or `any` (both). ICMP is never a rule's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum RuleProtocol {
    /// TCP only (the policy's default).
    #[default]
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP.
    Any,
}

impl RuleProtocol {
    /// Whether a flow of protocol `p` is allowed by this rule protocol.
    pub const fn allows(self, p: L4Proto) -> bool {
        matches!(
            (self, p),
            (RuleProtocol::Any, L4Proto::Tcp | L4Proto::Udp)
                | (RuleProtocol::Tcp, L4Proto::Tcp)
                | (RuleProtocol::Udp, L4Proto::Udp)
        )
    }

    /// Parses `tcp`, `udp`, `any` (lower-case, as in the authoring format).
    pub fn parse(s: &str) -> Option<RuleProtocol> {
        match s {
            "tcp" => Some(RuleProtocol::Tcp),
            "udp" => Some(RuleProtocol::Udp),
            "any" => Some(RuleProtocol::Any),
            _ => None,
        }
    }

    /// Lower-case name: `tcp`, `udp`, `any`.
    pub const fn name(self) -> &'static str {
        match self {
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Any => "any",
        }
    }
}

impl fmt::Display for RuleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_key_prints_sixteen_lower_case_hex_digits() {
        assert_eq!(JobKey(0xab).to_string(), "00000000000000ab");
        assert_eq!(JobKey(u64::MAX).to_string(), "ffffffffffffffff");
        assert_eq!(format!("{:x}", JobKey(0xab)), "ab");
    }

    #[test]
    fn job_key_parses_only_its_own_form() {
        assert_eq!(
            "0123456789abcdef".parse(),
            Ok(JobKey(0x0123_4567_89ab_cdef))
        );
        for bad in [
            "",
            "ab",
            "0123456789ABCDEF",
            "0x23456789abcdef",
            "+123456789abcdef",
            "0123456789abcdef0",
            "0123456789abcdeg",
            " 123456789abcdef",
        ] {
            let e = bad.parse::<JobKey>().unwrap_err();
            assert!(
                e.to_string().contains("16 lower-case hex digits"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn job_keys_round_trip_through_text_across_the_range() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = JobKey(x);
            assert_eq!(k.to_string().parse(), Ok(k));
        }
        for k in [0, 1, u64::MAX] {
            assert_eq!(JobKey(k).to_string().parse(), Ok(JobKey(k)));
        }
    }

    #[test]
    fn tenant_id_prints_decimal_and_hex_on_request() {
        assert_eq!(TenantId(0x1120_8e19).to_string(), "287346201");
        assert_eq!(format!("{:08x}", TenantId(0x1120_8e19)), "11208e19");
        assert_eq!(u32::from(TenantId::from(7)), 7);
    }

    #[test]
    fn policy_serial_refuses_what_the_option_cannot_carry() {
        assert_eq!(
            PolicySerial::try_from(u64::from(u32::MAX)),
            Ok(PolicySerial(u32::MAX))
        );
        assert_eq!(
            PolicySerial::try_from(u64::from(u32::MAX) + 1),
            Err(PolicySerialError(4_294_967_296))
        );
        assert_eq!(u64::from(PolicySerial(7)), 7);
    }

    #[test]
    fn a_rate_is_never_zero() {
        assert_eq!(Bps::new(0), None);
        assert_eq!(Bps::mbit(0), None);
        assert_eq!(Bps::gbit(u64::MAX), None, "overflow is not a rate");
        assert_eq!(Bps::try_from(0u64), Err(BpsError::Zero));
        assert_eq!(Bps::new(1).map(Bps::get), Some(1));
        assert_eq!(Bps::mbit(100).map(Bps::get), Some(100_000_000));
    }

    fn bps(v: u64) -> Bps {
        Bps::new(v).unwrap()
    }

    #[test]
    fn bandwidth_units_are_decimal_bits() {
        assert_eq!(Bps::parse("100Mbit"), Ok(bps(100_000_000)));
        assert_eq!(Bps::parse("1Gbit"), Ok(bps(1_000_000_000)));
        assert_eq!(Bps::parse("64 kbit"), Ok(bps(64_000)));
        assert_eq!(Bps::parse("5Mbps"), Ok(bps(5_000_000)));
        assert_eq!(Bps::parse("1200bps"), Ok(bps(1200)));
        assert_eq!(Bps::parse("7bit"), Ok(bps(7)));
    }

    #[test]
    fn bandwidth_rejects_bytes_zero_garbage_and_huge() {
        assert!(matches!(Bps::parse("100MB"), Err(BpsError::ByteUnit(_))));
        assert!(matches!(Bps::parse("100MiB"), Err(BpsError::ByteUnit(_))));
        assert_eq!(Bps::parse("0Mbit"), Err(BpsError::Zero));
        assert!(matches!(Bps::parse("Mbit"), Err(BpsError::Syntax(_))));
        assert!(matches!(Bps::parse("1.5Gbit"), Err(BpsError::Syntax(_))));
        assert!(matches!(Bps::parse("-1Mbit"), Err(BpsError::Syntax(_))));
        assert!(matches!(Bps::parse("100"), Err(BpsError::Syntax(_))));
        assert_eq!(Bps::parse("2000Gbit"), Err(BpsError::TooLarge));
        assert_eq!(
            Bps::parse("99999999999999999999bit"),
            Err(BpsError::TooLarge)
        );
    }

    #[test]
    fn bandwidth_display_round_trips() {
        for s in ["100Mbit", "1500Kbit", "7bit", "1Gbit", "1000Gbit"] {
            let b = Bps::parse(s).expect("valid");
            assert_eq!(b.to_string(), s);
            assert_eq!(s.parse::<Bps>(), Ok(b));
        }
    }

    #[test]
    fn l4_proto_numbers_round_trip() {
        for p in [L4Proto::Tcp, L4Proto::Udp, L4Proto::Icmp, L4Proto::Icmpv6] {
            assert_eq!(L4Proto::from_number(p.number()), Some(p));
        }
        assert_eq!(L4Proto::from_number(47), None);
        assert_eq!(L4Proto::Icmpv6.to_string(), "icmpv6");
    }

    #[test]
    fn a_rule_protocol_allows_only_its_transports() {
        use L4Proto::*;
        let allowed = |r: RuleProtocol| {
            [Tcp, Udp, Icmp, Icmpv6]
                .into_iter()
                .filter(|p| r.allows(*p))
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(RuleProtocol::Tcp), [Tcp]);
        assert_eq!(allowed(RuleProtocol::Udp), [Udp]);
        assert_eq!(allowed(RuleProtocol::Any), [Tcp, Udp]);
        for r in [RuleProtocol::Tcp, RuleProtocol::Udp, RuleProtocol::Any] {
            assert_eq!(RuleProtocol::parse(r.name()), Some(r));
        }
        assert_eq!(RuleProtocol::parse("TCP"), None);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_spells_keys_as_numbers_or_hex_and_refuses_a_zero_rate() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct View {
            #[serde(with = "job_key_hex")]
            job_key: JobKey,
            raw: JobKey,
            serial: PolicySerial,
            tenant: TenantId,
            rate: Bps,
            proto: L4Proto,
            rule: RuleProtocol,
        }
        let v = View {
            job_key: JobKey(0xab),
            raw: JobKey(0xab),
            serial: PolicySerial(3),
            tenant: TenantId(7),
            rate: bps(1000),
            proto: L4Proto::Icmpv6,
            rule: RuleProtocol::Any,
        };
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"job_key":"00000000000000ab","raw":171,"serial":3,"tenant":7,"rate":1000,"proto":"icmpv6","rule":"any"}"#
        );
        assert_eq!(serde_json::from_str::<View>(&text).unwrap(), v);
        for bad in [
            text.replace("\"00000000000000ab\"", "\"00000000000000AB\""),
            text.replace("\"rate\":1000", "\"rate\":0"),
            text.replace("\"serial\":3", "\"serial\":4294967296"),
        ] {
            assert!(serde_json::from_str::<View>(&bad).is_err(), "{bad}");
        }
    }
}
