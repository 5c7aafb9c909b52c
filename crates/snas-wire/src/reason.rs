//! Drop and refusal reasons shared by every enforcement point (tier-1 eBPF, tier-2 proxy, DNS).
//!
//! # Invariants
//! - The numbers are stable: they appear in BPF counter maps, audit events and metrics. A reason is
//!   never renumbered or reused; a retired reason keeps its number and is marked retired.
//! - The C twin lives in `crates/snas-bpf/bpf/lib/drop_reasons.h`; a test in `snas-bpf` parses that
//!   header and checks it names the same numbers with the same names.
//! - `name()` is the stable machine-readable code used in audit events and metric labels.

/// Why a packet or flow was not forwarded. `#[repr(u8)]` so that it fits BPF map keys and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Reason {
    /// Not IPv4/IPv6 (and not ARP, which is passed to the host).
    NotIp = 1,
    /// Header truncated or inconsistent (bad IHL, lengths, version).
    Malformed = 2,
    /// An IP fragment (first or later).
    Fragment = 3,
    /// IPv4 options or IPv6 extension headers we do not accept.
    IpOptions = 4,
    /// Source IP is not the job's own.
    SpoofedSource = 5,
    /// Source MAC is not the job's own.
    SpoofedMac = 6,
    /// The packet could not be attributed to a known job.
    UnknownJob = 7,
    /// No rule of the policy allows this destination address.
    DestinationDenied = 8,
    /// The destination is allowed but not on this port/protocol.
    PortDenied = 9,
    /// Destination in an always-denied range (loopback, private, link-local, metadata, ...).
    AlwaysDenied = 10,
    /// `new_connections_per_sec` token bucket empty.
    NewConnectionRate = 11,
    /// `max_connections` reached.
    ConnectionLimit = 12,
    /// EDT departure time beyond the queueing-delay horizon.
    PacingHorizon = 13,
    /// No healthy proxy to send to.
    NoProxy = 14,
    /// Encapsulation failed (helper error, e.g. GSO packet that cannot be grown).
    EncapFailed = 15,
    /// IPv6 traffic while the policy has no IPv6 rules.
    Ipv6Denied = 16,
    /// GENEVE header malformed (version, lengths, protocol type).
    GeneveMalformed = 17,
    /// GENEVE critical option missing or unknown.
    GeneveOption = 18,
    /// GENEVE option names a job this endpoint cannot verify.
    GeneveUnknownJob = 19,
    /// GENEVE from an address that is not a configured node/proxy.
    UntrustedSource = 20,
    /// The job's policy has expired.
    PolicyExpired = 21,
    /// The job's policy failed verification (signature, key, schema).
    PolicyInvalid = 22,
    /// Traffic for a job arrived from a node other than the policy's `node`.
    NodeMismatch = 23,
    /// Per-job or per-tenant NAT port quota exhausted.
    PortQuota = 24,
    /// The egress address pool has no free port for this destination.
    PortsExhausted = 25,
    /// `max_ports_per_destination` reached for this job and destination.
    DestinationPortCap = 26,
    /// A reply or non-initial packet with no connection tracking entry.
    NoConntrack = 27,
    /// The proxy is draining and takes no new flows.
    Draining = 28,
    /// Packet too big for the overlay after encapsulation.
    MtuExceeded = 29,
    /// DNS name not allowed by the policy.
    DnsRefused = 30,
    /// DNS query rate for the job exceeded.
    DnsRate = 31,
    /// Packet aimed at the overlay (GENEVE) port or the underlay from inside a sandbox.
    OverlayTarget = 32,
    /// Per-tenant NAT quota exhausted (distinct from the per-job one).
    TenantPortQuota = 33,
    /// The destination is SNAS infrastructure (underlay, nodes, proxies, management networks,
    /// egress pools, metadata): denied at both tiers whatever the policy says.
    InfrastructureDenied = 34,
    /// Proxy: a packet of a job whose policy is being fetched did not fit the bounded queue of
    /// held first packets.
    HoldQueueFull = 35,
    /// Proxy: the tenant's fair-share queue in a worker is full (one tenant's flood is shed
    /// before it can delay other tenants).
    TenantQueueFull = 36,
    /// The job's policy was revoked by the control plane (a signed revocation).
    PolicyRevoked = 37,
    /// The key that signed the job's policy is no longer in the trust bundle.
    KeyUntrusted = 38,
    /// A `[[deny]]` rule of the policy matches the destination (deny rules override allows).
    DenyRule = 39,
    /// Proxy: the TLS ClientHello's SNI (or QUIC Initial's) is not a name the policy allows and
    /// DNS bound to this destination for the job.
    SniMismatch = 40,
    /// Proxy: the HTTP request's Host (or absolute-URI / CONNECT authority) is not a name the
    /// policy allows and DNS bound to this destination for the job.
    HostMismatch = 41,
}

impl Reason {
    /// Every reason, in numeric order.
    pub const ALL: [Reason; 41] = [
        Reason::NotIp,
        Reason::Malformed,
        Reason::Fragment,
        Reason::IpOptions,
        Reason::SpoofedSource,
        Reason::SpoofedMac,
        Reason::UnknownJob,
        Reason::DestinationDenied,
        Reason::PortDenied,
        Reason::AlwaysDenied,
        Reason::NewConnectionRate,
        Reason::ConnectionLimit,
        Reason::PacingHorizon,
        Reason::NoProxy,
        Reason::EncapFailed,
        Reason::Ipv6Denied,
        Reason::GeneveMalformed,
        Reason::GeneveOption,
        Reason::GeneveUnknownJob,
        Reason::UntrustedSource,
        Reason::PolicyExpired,
        Reason::PolicyInvalid,
        Reason::NodeMismatch,
        Reason::PortQuota,
        Reason::PortsExhausted,
        Reason::DestinationPortCap,
        Reason::NoConntrack,
        Reason::Draining,
        Reason::MtuExceeded,
        Reason::DnsRefused,
        Reason::DnsRate,
        Reason::OverlayTarget,
        Reason::TenantPortQuota,
        Reason::InfrastructureDenied,
        Reason::HoldQueueFull,
        Reason::TenantQueueFull,
        Reason::PolicyRevoked,
        Reason::KeyUntrusted,
        Reason::DenyRule,
        Reason::SniMismatch,
        Reason::HostMismatch,
    ];

    /// One past the largest number: size of per-reason counter arrays.
    pub const COUNT: usize = 42;

    /// The stable numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason with this code, if any.
    pub fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// The stable snake_case name used in audit events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::IpOptions => "ip_options",
            Reason::SpoofedSource => "spoofed_source",
            Reason::SpoofedMac => "spoofed_mac",
            Reason::UnknownJob => "unknown_job",
            Reason::DestinationDenied => "destination_denied",
            Reason::PortDenied => "port_denied",
            Reason::AlwaysDenied => "always_denied",
            Reason::NewConnectionRate => "new_connection_rate",
            Reason::ConnectionLimit => "connection_limit",
            Reason::PacingHorizon => "pacing_horizon",
            Reason::NoProxy => "no_proxy",
            Reason::EncapFailed => "encap_failed",
            Reason::Ipv6Denied => "ipv6_denied",
            Reason::GeneveMalformed => "geneve_malformed",
            Reason::GeneveOption => "geneve_option",
            Reason::GeneveUnknownJob => "geneve_unknown_job",
            Reason::UntrustedSource => "untrusted_source",
            Reason::PolicyExpired => "policy_expired",
            Reason::PolicyInvalid => "policy_invalid",
            Reason::NodeMismatch => "node_mismatch",
            Reason::PortQuota => "port_quota",
            Reason::PortsExhausted => "ports_exhausted",
            Reason::DestinationPortCap => "destination_port_cap",
            Reason::NoConntrack => "no_conntrack",
            Reason::Draining => "draining",
            Reason::MtuExceeded => "mtu_exceeded",
            Reason::DnsRefused => "dns_refused",
            Reason::DnsRate => "dns_rate",
            Reason::OverlayTarget => "overlay_target",
            Reason::TenantPortQuota => "tenant_port_quota",
            Reason::InfrastructureDenied => "infrastructure_denied",
            Reason::HoldQueueFull => "hold_queue_full",
            Reason::TenantQueueFull => "tenant_queue_full",
            Reason::PolicyRevoked => "policy_revoked",
            Reason::KeyUntrusted => "key_untrusted",
            Reason::DenyRule => "deny_rule",
            Reason::SniMismatch => "sni_mismatch",
            Reason::HostMismatch => "host_mismatch",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_unique_and_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.code() as usize, i + 1);
            assert_eq!(Reason::from_code(r.code()), Some(*r));
        }
        assert_eq!(Reason::ALL.len() + 1, Reason::COUNT);
        assert_eq!(Reason::from_code(0), None);
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
