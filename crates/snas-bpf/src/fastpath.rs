//! The egress proxy's in-kernel fast path (`bpf/proxy_fastpath.bpf.c`): loading, attaching,
//! and the typed map API the proxy daemon mirrors its engine's offload decisions through.
//!
//! # What it owns
//! - The two TC ingress programs (from nodes on the underlay interface, from the internet on
//!   the interface the egress pool is routed in on) and their maps: fast flows (forward and
//!   reverse, written together), pacing clocks and the pacer's holds, trusted nodes,
//!   statistics.
//! - The encoding of a [`FastFlowSpec`] into the maps' generated key and value types
//!   ([`encode`], [`decode`]: pure, property-tested).
//!
//! # Invariants
//! - Nothing here decides: the proxy's engine says which flows are fast; this module writes
//!   what it is told. The programs never create, change or remove entries.
//! - Clocks are written before the flows that use them: a flow whose job or tenant clock is
//!   missing is never fast (the programs treat a missing clock as "ahead").
//! - A clock's time is the programs' alone: [`FastPath::set_clock`] writes a clock only when
//!   it is created or its rate changes; what the userspace pacer holds goes to a map of its
//!   own ([`FastPath::hold`]), never into the clock.
//! - Nothing is pinned: the maps live as long as this process holds them and the programs are
//!   attached. [`FastPath::detach`] (also on drop) removes the filters; a filter a crashed
//!   process left behind is replaced by the next [`FastPath::attach`] (same handle and
//!   priority) or removed by [`detach_leftover`].
//!
//! # Limits
//! - IPv4 inner packets and IPv4 underlay only; TCP and UDP.
//! - Counters are read by key, one lookup per flow and direction ([`FastPath::counts`]).

use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, TcHookBuilder, TC_INGRESS};

use crate::pod::{bytes_of, from_bytes, Pod};
use crate::skel::fastpath::{types, ProxyFastpathSkelBuilder};
use crate::{Bps, JobKey, PolicySerial, TenantId};

/// TC filter handle of the fast-path programs (`"SF"`): distinct from tier 1's, so a proxy and
/// a node agent in one namespace never replace each other's filter.
pub const FP_TC_HANDLE: u32 = 0x5346;
/// TC filter priority of the fast-path programs.
pub const FP_TC_PRIORITY: u32 = 1;

/// Errors of the fast path.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// A libbpf call failed.
    #[error("proxy fast path: {what}: {source}")]
    Bpf {
        /// What was being done.
        what: String,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// A map value had an unexpected size.
    #[error("proxy fast path: map {0} returned a value of the wrong size")]
    Layout(&'static str),
}

fn bpf_err(what: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> FastPathError {
    let what = what.into();
    move |source| FastPathError::Bpf { what, source }
}

// SAFETY: generated from bpf/lib/fastpath.h, whose padding is spelled out as `_pad` fields;
// integers and arrays only, valid for any bit pattern.
unsafe impl Pod for types::fp_fwd_key {}
// SAFETY: as above.
unsafe impl Pod for types::fp_rev_key {}
// SAFETY: as above (fp_counts is a field of it, all u64).
unsafe impl Pod for types::fp_flow {}
// SAFETY: as above.
unsafe impl Pod for types::fp_clock_key {}
// SAFETY: as above.
unsafe impl Pod for types::fp_clock {}

/// Transport protocol of a fast flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FastProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl FastProto {
    fn number(self) -> u8 {
        match self {
            FastProto::Tcp => 6,
            FastProto::Udp => 17,
        }
    }

    fn from_number(n: u8) -> Option<FastProto> {
        match n {
            6 => Some(FastProto::Tcp),
            17 => Some(FastProto::Udp),
            _ => None,
        }
    }
}

/// A flow the engine made fast: both NAT directions and what the programs check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FastFlowSpec {
    /// The job (GENEVE option).
    pub job_key: JobKey,
    /// Its tenant (the option must name it).
    pub tenant_id: TenantId,
    /// The policy serial the option must carry.
    pub serial: PolicySerial,
    /// The job's node (outer destination of replies).
    pub node: Ipv4Addr,
    /// TCP or UDP.
    pub proto: FastProto,
    /// The sandbox's address and port (inner source from the node).
    pub sandbox: SocketAddrV4,
    /// The remote peer.
    pub remote: SocketAddrV4,
    /// The SNAT address and port.
    pub egress: SocketAddrV4,
    /// `CLOCK_MONOTONIC` time from which on the policy has expired: packets then take the
    /// userspace path (which refuses them).
    pub expires: Duration,
}

/// Where a fast flow's two entries are (what removal and counter reads need).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FastFlowKeys {
    /// The job.
    pub job_key: JobKey,
    /// TCP or UDP.
    pub proto: FastProto,
    /// The sandbox's address and port.
    pub sandbox: SocketAddrV4,
    /// The remote peer.
    pub remote: SocketAddrV4,
    /// The SNAT address and port.
    pub egress: SocketAddrV4,
}

impl FastFlowSpec {
    /// The keys of its entries.
    pub fn keys(&self) -> FastFlowKeys {
        FastFlowKeys {
            job_key: self.job_key,
            proto: self.proto,
            sandbox: self.sandbox,
            remote: self.remote,
            egress: self.egress,
        }
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn port_be(p: u16) -> u16 {
    p.to_be()
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The forward key of a flow (what a decapsulated packet from the node carries).
pub fn fwd_key(k: &FastFlowKeys) -> types::fp_fwd_key {
    types::fp_fwd_key {
        job_key: k.job_key.0,
        saddr: be(*k.sandbox.ip()),
        daddr: be(*k.remote.ip()),
        sport: port_be(k.sandbox.port()),
        dport: port_be(k.remote.port()),
        proto: k.proto.number(),
        ..Default::default()
    }
}

/// The reverse key of a flow (what a packet from the internet carries).
pub fn rev_key(k: &FastFlowKeys) -> types::fp_rev_key {
    types::fp_rev_key {
        remote_addr: be(*k.remote.ip()),
        egress_addr: be(*k.egress.ip()),
        remote_port: port_be(k.remote.port()),
        egress_port: port_be(k.egress.port()),
        proto: k.proto.number(),
        ..Default::default()
    }
}

/// The encoded entries of a flow: forward key, reverse key, and the value both carry (with
/// zero counters).
pub fn encode(s: &FastFlowSpec) -> (types::fp_fwd_key, types::fp_rev_key, types::fp_flow) {
    let keys = s.keys();
    let v = types::fp_flow {
        job_key: s.job_key.0,
        tenant_id: s.tenant_id.0,
        serial: s.serial.0,
        node_addr: be(s.node),
        sandbox_addr: be(*s.sandbox.ip()),
        egress_addr: be(*s.egress.ip()),
        sandbox_port: port_be(s.sandbox.port()),
        egress_port: port_be(s.egress.port()),
        expires_ns: duration_ns(s.expires),
        ..Default::default()
    };
    (fwd_key(&keys), rev_key(&keys), v)
}

/// The flow a forward key and value describe (`None` for a protocol the programs never see).
pub fn decode(k: &types::fp_fwd_key, v: &types::fp_flow) -> Option<FastFlowSpec> {
    Some(FastFlowSpec {
        job_key: JobKey(k.job_key),
        tenant_id: TenantId(v.tenant_id),
        serial: PolicySerial(v.serial),
        node: addr(v.node_addr),
        proto: FastProto::from_number(k.proto)?,
        sandbox: SocketAddrV4::new(addr(k.saddr), u16::from_be(k.sport)),
        remote: SocketAddrV4::new(addr(k.daddr), u16::from_be(k.dport)),
        egress: SocketAddrV4::new(addr(v.egress_addr), u16::from_be(v.egress_port)),
        expires: Duration::from_nanos(v.expires_ns),
    })
}

/// What one direction of a fast flow carried since it was installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastCounts {
    /// Packets (a GSO super-packet counts once).
    pub packets: u64,
    /// Wire bytes (the IP lengths of the segments).
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` time of the last packet, if any.
    pub last_seen: Option<Duration>,
}

impl From<types::fp_counts> for FastCounts {
    fn from(c: types::fp_counts) -> FastCounts {
        FastCounts {
            packets: c.packets,
            bytes: c.bytes,
            last_seen: (c.last_seen_ns != 0).then(|| Duration::from_nanos(c.last_seen_ns)),
        }
    }
}

/// Which clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockOwner {
    /// A job's.
    Job(JobKey),
    /// A tenant's.
    Tenant(TenantId),
}

/// Which direction a clock paces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockDir {
    /// Sandbox → internet (`egress_bps`).
    Egress,
    /// Internet → sandbox (`ingress_bps`).
    Ingress,
}

/// A clock's rate, as the userspace pacer's `PaceRate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockRate {
    /// Paced at this rate.
    Limited(Bps),
    /// Costs no time.
    Unlimited,
    /// Never fast.
    Blocked,
}

const FP_RATE_LIMITED: u32 = 0;
const FP_RATE_UNLIMITED: u32 = 1;
const FP_RATE_BLOCKED: u32 = 2;

/// The map key of a clock.
pub fn clock_key(owner: ClockOwner, dir: ClockDir) -> types::fp_clock_key {
    let (id, kind) = match owner {
        ClockOwner::Job(j) => (j.0, 0),
        ClockOwner::Tenant(t) => (u64::from(t.0), 1),
    };
    types::fp_clock_key {
        id,
        kind,
        dir: match dir {
            ClockDir::Egress => 0,
            ClockDir::Ingress => 1,
        },
        ..Default::default()
    }
}

fn rate_fields(r: ClockRate) -> (u64, u32) {
    match r {
        ClockRate::Limited(b) => (b.get(), FP_RATE_LIMITED),
        ClockRate::Unlimited => (0, FP_RATE_UNLIMITED),
        ClockRate::Blocked => (0, FP_RATE_BLOCKED),
    }
}

/// The rate a clock value holds (`None` for a mode the programs do not know).
pub fn clock_rate(c: &types::fp_clock) -> Option<ClockRate> {
    match c.mode {
        FP_RATE_LIMITED => Bps::new(c.rate_bps).map(ClockRate::Limited),
        FP_RATE_UNLIMITED => Some(ClockRate::Unlimited),
        FP_RATE_BLOCKED => Some(ClockRate::Blocked),
        _ => None,
    }
}

/// Time `bytes` take at `rate` (what a charge advances a clock by).
pub fn charge_ns(rate: ClockRate, bytes: u64) -> u64 {
    match rate {
        ClockRate::Limited(b) => {
            let ns = u128::from(bytes) * 8 * 1_000_000_000 / u128::from(b.get());
            u64::try_from(ns).unwrap_or(u64::MAX)
        }
        ClockRate::Unlimited | ClockRate::Blocked => 0,
    }
}

/// Statistics slots (`FP_ST_*` in fastpath.h).
const ST_COUNT: usize = 12;

/// Why the programs left a packet to userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DivertReason {
    /// No fast entry for the flow.
    NoEntry,
    /// SYN, FIN or RST.
    Flags,
    /// The option's tenant or serial is not the entry's.
    Serial,
    /// A job or tenant clock is ahead: the userspace pacer decides.
    Paced,
    /// No route or neighbour yet, TTL, or too large for the underlay.
    Route,
    /// IPv6, IP options, fragments, another protocol, an expired policy, an untrusted node.
    Other,
}

impl DivertReason {
    /// Every reason, in a fixed order.
    pub const ALL: [DivertReason; 6] = [
        DivertReason::NoEntry,
        DivertReason::Flags,
        DivertReason::Serial,
        DivertReason::Paced,
        DivertReason::Route,
        DivertReason::Other,
    ];

    /// Stable lower-case name (metric label).
    pub fn name(self) -> &'static str {
        match self {
            DivertReason::NoEntry => "no_entry",
            DivertReason::Flags => "flags",
            DivertReason::Serial => "serial",
            DivertReason::Paced => "paced",
            DivertReason::Route => "route",
            DivertReason::Other => "other",
        }
    }

    fn slot(self) -> usize {
        match self {
            DivertReason::NoEntry => 4,
            DivertReason::Flags => 5,
            DivertReason::Serial => 6,
            DivertReason::Paced => 7,
            DivertReason::Route => 8,
            DivertReason::Other => 9,
        }
    }
}

/// Totals over all CPUs since load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPathStats {
    /// Packets from nodes sent to the internet by the fast path.
    pub from_node_packets: u64,
    /// Their wire bytes.
    pub from_node_bytes: u64,
    /// Packets from the internet sent to nodes by the fast path.
    pub to_node_packets: u64,
    /// Their wire bytes.
    pub to_node_bytes: u64,
    /// Packets left to userspace, by [`DivertReason::ALL`] order.
    pub diverted: [u64; 6],
    /// Packets dropped because a rewrite failed after the decision.
    pub failed: u64,
    /// The interface of the last redirect (tests).
    pub last_redirect: u64,
}

impl FastPathStats {
    /// Diverted packets for one reason.
    pub fn diverted(&self, r: DivertReason) -> u64 {
        let i = DivertReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.diverted[i]
    }
}

/// Load-time settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathConfig {
    /// The proxy's underlay address.
    pub proxy_ip: Ipv4Addr,
    /// The GENEVE port.
    pub geneve_port: u16,
    /// The underlay MTU (encapsulated packets, or each segment, must fit).
    pub underlay_mtu: u32,
    /// A packet is fast while its clocks are at most this far ahead of now.
    pub slack: Duration,
    /// A limited clock that bound (a packet found it beyond `slack`) keeps every packet of its
    /// job (or tenant) on the userspace path while packets find it ahead of now, and for this
    /// long after the last of them: a limit that binds is met by the userspace pacer alone.
    pub bound_hold: Duration,
    /// Tests only: redirect to this interface instead of the FIB's choice.
    pub test_redirect_ifindex: Option<u32>,
}

/// The loaded fast path. See the module documentation.
#[derive(Debug)]
pub struct FastPath {
    from_node: OwnedFd,
    from_internet: OwnedFd,
    fwd: MapHandle,
    rev: MapHandle,
    clocks: MapHandle,
    holds: MapHandle,
    nodes: MapHandle,
    stats: MapHandle,
    /// (ifindex, program) pairs attached by this value.
    attached: Mutex<Vec<u32>>,
}

fn ifindex_i32(ifindex: u32) -> i32 {
    i32::try_from(ifindex).unwrap_or(i32::MAX)
}

/// Removes a fast-path filter from `ifindex`'s ingress (one a crashed proxy left behind); best
/// effort, nothing happens when there is none.
pub fn detach_leftover(any_prog: BorrowedFd<'_>, ifindex: u32) {
    let mut hook = TcHookBuilder::new(any_prog)
        .ifindex(ifindex_i32(ifindex))
        .handle(FP_TC_HANDLE)
        .priority(FP_TC_PRIORITY)
        .hook(TC_INGRESS);
    let _ = hook.detach();
}

impl FastPath {
    /// Loads both programs with `cfg` (root: CAP_BPF + CAP_NET_ADMIN). Nothing is attached.
    pub fn load(cfg: &FastPathConfig) -> Result<FastPath, FastPathError> {
        let mut storage = MaybeUninit::uninit();
        let mut open = ProxyFastpathSkelBuilder::default()
            .open(&mut storage)
            .map_err(bpf_err("open"))?;
        if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
            ro.cfg_fp_proxy_ip = be(cfg.proxy_ip);
            ro.cfg_geneve_port = cfg.geneve_port;
            ro.cfg_fp_underlay_mtu = cfg.underlay_mtu;
            ro.cfg_fp_slack_ns = duration_ns(cfg.slack);
            ro.cfg_fp_bound_hold_ns = duration_ns(cfg.bound_hold);
            ro.cfg_fp_test_ifindex = cfg.test_redirect_ifindex.unwrap_or(0);
        }
        let skel = open.load().map_err(bpf_err("load"))?;
        let dup = |fd: BorrowedFd<'_>, what: &'static str| {
            fd.try_clone_to_owned().map_err(|e| FastPathError::Bpf {
                what: format!("duplicate {what}"),
                source: libbpf_rs::Error::from(e),
            })
        };
        let handle = |m: &libbpf_rs::MapMut<'_>, what: &'static str| {
            MapHandle::try_from(m).map_err(bpf_err(format!("map {what}")))
        };
        Ok(FastPath {
            from_node: dup(skel.progs.snas_fp_from_node.as_fd(), "from_node")?,
            from_internet: dup(skel.progs.snas_fp_from_internet.as_fd(), "from_internet")?,
            fwd: handle(&skel.maps.snas_fp_fwd, "snas_fp_fwd")?,
            rev: handle(&skel.maps.snas_fp_rev, "snas_fp_rev")?,
            clocks: handle(&skel.maps.snas_fp_clocks, "snas_fp_clocks")?,
            holds: handle(&skel.maps.snas_fp_holds, "snas_fp_holds")?,
            nodes: handle(&skel.maps.snas_fp_nodes, "snas_fp_nodes")?,
            stats: handle(&skel.maps.snas_fp_stats, "snas_fp_stats")?,
            attached: Mutex::new(Vec::new()),
        })
    }

    /// The program for packets from nodes (tests: BPF_PROG_TEST_RUN).
    pub fn from_node_prog(&self) -> BorrowedFd<'_> {
        self.from_node.as_fd()
    }

    /// The program for packets from the internet (tests).
    pub fn from_internet_prog(&self) -> BorrowedFd<'_> {
        self.from_internet.as_fd()
    }

    fn attach_one(&self, prog: &OwnedFd, ifindex: u32) -> Result<(), FastPathError> {
        let mut hook = TcHookBuilder::new(prog.as_fd())
            .ifindex(ifindex_i32(ifindex))
            .replace(true)
            .handle(FP_TC_HANDLE)
            .priority(FP_TC_PRIORITY)
            .hook(TC_INGRESS);
        hook.create()
            .map_err(bpf_err(format!("create clsact on ifindex {ifindex}")))?;
        hook.attach()
            .map_err(bpf_err(format!("attach to ifindex {ifindex}")))?;
        if let Ok(mut a) = self.attached.lock() {
            a.push(ifindex);
        }
        Ok(())
    }

    /// Attaches the from-node program to the underlay interface's ingress and the
    /// from-internet program to `internet_ifindex`'s (replacing a filter a crashed proxy left
    /// there). They must differ.
    pub fn attach(
        &self,
        underlay_ifindex: u32,
        internet_ifindex: u32,
    ) -> Result<(), FastPathError> {
        self.attach_one(&self.from_node, underlay_ifindex)?;
        if let Err(e) = self.attach_one(&self.from_internet, internet_ifindex) {
            self.detach();
            return Err(e);
        }
        Ok(())
    }

    /// Detaches what [`FastPath::attach`] attached (best effort: the device may be gone).
    pub fn detach(&self) {
        let list = match self.attached.lock() {
            Ok(mut a) => std::mem::take(&mut *a),
            Err(_) => return,
        };
        for ifindex in list {
            detach_leftover(self.from_node.as_fd(), ifindex);
        }
    }

    /// Sets the trusted nodes (replacing none: nodes are only added).
    pub fn add_nodes(&self, nodes: &[Ipv4Addr]) -> Result<(), FastPathError> {
        for n in nodes {
            self.nodes
                .update(&be(*n).to_ne_bytes(), &1u32.to_ne_bytes(), MapFlags::ANY)
                .map_err(bpf_err(format!("add node {n}")))?;
        }
        Ok(())
    }

    /// Sets a clock's rate; creates it (not ahead) if it does not exist, keeps its time if it
    /// does.
    pub fn set_clock(
        &self,
        owner: ClockOwner,
        dir: ClockDir,
        rate: ClockRate,
    ) -> Result<(), FastPathError> {
        let key = clock_key(owner, dir);
        let existing = self.clock(&key)?;
        let (bps, mode) = rate_fields(rate);
        if existing.is_some_and(|c| c.rate_bps == bps && c.mode == mode) {
            return Ok(());
        }
        let mut c = existing.unwrap_or_default();
        c.rate_bps = bps;
        c.mode = mode;
        self.clocks
            .update(bytes_of(&key), bytes_of(&c), MapFlags::ANY)
            .map_err(bpf_err("set clock"))
    }

    fn clock(&self, key: &types::fp_clock_key) -> Result<Option<types::fp_clock>, FastPathError> {
        match self
            .clocks
            .lookup(bytes_of(key), MapFlags::ANY)
            .map_err(bpf_err("read clock"))?
        {
            Some(b) => from_bytes(&b)
                .map(Some)
                .ok_or(FastPathError::Layout("snas_fp_clocks")),
            None => Ok(None),
        }
    }

    /// Says that the userspace pacer holds a packet of `owner` (one direction) until `until`
    /// (`CLOCK_MONOTONIC`): no packet of the owner leaves fast before then, so none overtakes
    /// a paced one. One blind map update, no read: the programs own the clock's time (they
    /// charge every packet of a fast flow, the diverted ones too), so userspace never writes
    /// it back over their charges.
    pub fn hold(
        &self,
        owner: ClockOwner,
        dir: ClockDir,
        until: Duration,
    ) -> Result<(), FastPathError> {
        let key = clock_key(owner, dir);
        self.holds
            .update(
                bytes_of(&key),
                &duration_ns(until).to_ne_bytes(),
                MapFlags::ANY,
            )
            .map_err(bpf_err("hold clock"))
    }

    /// A clock's time as the programs left it: (next departure, bound until), `CLOCK_MONOTONIC`
    /// (tests and diagnostics). `None` when the clock does not exist.
    pub fn clock_times(
        &self,
        owner: ClockOwner,
        dir: ClockDir,
    ) -> Result<Option<(Duration, Duration)>, FastPathError> {
        Ok(self.clock(&clock_key(owner, dir))?.map(|c| {
            (
                Duration::from_nanos(c.next_ns),
                Duration::from_nanos(c.bound_until_ns),
            )
        }))
    }

    /// Removes a clock (its job or tenant has no fast flows left).
    pub fn remove_clock(&self, owner: ClockOwner, dir: ClockDir) -> Result<(), FastPathError> {
        let key = clock_key(owner, dir);
        delete_if_present(&self.holds, bytes_of(&key), "remove clock hold")?;
        delete_if_present(&self.clocks, bytes_of(&key), "remove clock")
    }

    /// Installs (or replaces, counters reset) a flow's two entries.
    pub fn install(&self, s: &FastFlowSpec) -> Result<(), FastPathError> {
        let (fk, rk, v) = encode(s);
        // Reverse first: a packet that finds the forward entry finds its replies' too.
        self.rev
            .update(bytes_of(&rk), bytes_of(&v), MapFlags::ANY)
            .map_err(bpf_err("install reverse entry"))?;
        if let Err(e) = self.fwd.update(bytes_of(&fk), bytes_of(&v), MapFlags::ANY) {
            let _ = delete_if_present(&self.rev, bytes_of(&rk), "undo reverse entry");
            return Err(bpf_err("install forward entry")(e));
        }
        Ok(())
    }

    /// The counters of a flow's two directions (out: from the node; in: to the node), `None`
    /// when it is not installed.
    pub fn counts(
        &self,
        k: &FastFlowKeys,
    ) -> Result<Option<(FastCounts, FastCounts)>, FastPathError> {
        let out = self.entry(&self.fwd, bytes_of(&fwd_key(k)), "snas_fp_fwd")?;
        let inn = self.entry(&self.rev, bytes_of(&rev_key(k)), "snas_fp_rev")?;
        Ok(match (out, inn) {
            (None, None) => None,
            (o, i) => Some((
                o.map(|v| v.counts.into()).unwrap_or_default(),
                i.map(|v| v.counts.into()).unwrap_or_default(),
            )),
        })
    }

    fn entry(
        &self,
        map: &MapHandle,
        key: &[u8],
        name: &'static str,
    ) -> Result<Option<types::fp_flow>, FastPathError> {
        match map
            .lookup(key, MapFlags::ANY)
            .map_err(bpf_err(format!("read {name}")))?
        {
            Some(b) => from_bytes(&b).map(Some).ok_or(FastPathError::Layout(name)),
            None => Ok(None),
        }
    }

    /// Removes a flow's entries; returns their last counters (None if it was not installed).
    /// The forward entry goes first, so no new packet starts fast while the reverse goes.
    pub fn remove(
        &self,
        k: &FastFlowKeys,
    ) -> Result<Option<(FastCounts, FastCounts)>, FastPathError> {
        let fk = fwd_key(k);
        let rk = rev_key(k);
        let out = self.entry(&self.fwd, bytes_of(&fk), "snas_fp_fwd")?;
        delete_if_present(&self.fwd, bytes_of(&fk), "remove forward entry")?;
        let inn = self.entry(&self.rev, bytes_of(&rk), "snas_fp_rev")?;
        delete_if_present(&self.rev, bytes_of(&rk), "remove reverse entry")?;
        Ok(match (out, inn) {
            (None, None) => None,
            (o, i) => Some((
                o.map(|v| v.counts.into()).unwrap_or_default(),
                i.map(|v| v.counts.into()).unwrap_or_default(),
            )),
        })
    }

    /// Installed flows (forward entries).
    pub fn len(&self) -> usize {
        self.fwd.keys().count()
    }

    /// Whether no flow is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Statistics summed over CPUs.
    pub fn stats(&self) -> Result<FastPathStats, FastPathError> {
        let mut slots = [0u64; ST_COUNT];
        for (i, slot) in slots.iter_mut().enumerate() {
            let key = u32::try_from(i).unwrap_or(0).to_ne_bytes();
            let per_cpu = self
                .stats
                .lookup_percpu(&key, MapFlags::ANY)
                .map_err(bpf_err("read statistics"))?
                .unwrap_or_default();
            for v in per_cpu {
                if let Some(n) = from_bytes::<u64>(&v) {
                    if i == 11 {
                        *slot = (*slot).max(n);
                    } else {
                        *slot = slot.saturating_add(n);
                    }
                }
            }
        }
        let mut diverted = [0u64; 6];
        for (i, r) in DivertReason::ALL.iter().enumerate() {
            diverted[i] = slots[r.slot()];
        }
        Ok(FastPathStats {
            from_node_packets: slots[0],
            from_node_bytes: slots[1],
            to_node_packets: slots[2],
            to_node_bytes: slots[3],
            diverted,
            failed: slots[10],
            last_redirect: slots[11],
        })
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.detach();
    }
}

fn delete_if_present(map: &MapHandle, key: &[u8], what: &'static str) -> Result<(), FastPathError> {
    match map.delete(key) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(bpf_err(what)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_v4() -> impl Strategy<Value = SocketAddrV4> {
        (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddrV4::new(Ipv4Addr::from(a), p))
    }

    fn arb_spec() -> impl Strategy<Value = FastFlowSpec> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            arb_v4(),
            arb_v4(),
            arb_v4(),
            any::<u64>(),
        )
            .prop_map(|(j, t, s, n, tcp, sb, r, e, x)| FastFlowSpec {
                job_key: JobKey(j),
                tenant_id: TenantId(t),
                serial: PolicySerial(s),
                node: Ipv4Addr::from(n),
                proto: if tcp { FastProto::Tcp } else { FastProto::Udp },
                sandbox: sb,
                remote: r,
                egress: e,
                expires: Duration::from_nanos(x),
            })
    }

    proptest! {
        #[test]
        fn a_flow_decodes_to_what_was_encoded(s in arb_spec()) {
            let (fk, _, v) = encode(&s);
            prop_assert_eq!(decode(&fk, &v), Some(s));
        }

        #[test]
        fn keys_hold_addresses_and_ports_in_network_order(s in arb_spec()) {
            let (fk, rk, v) = encode(&s);
            let bytes = bytes_of(&fk);
            prop_assert_eq!(&bytes[8..12], &s.sandbox.ip().octets()[..]);
            prop_assert_eq!(&bytes[12..16], &s.remote.ip().octets()[..]);
            prop_assert_eq!(&bytes[16..18], &s.sandbox.port().to_be_bytes()[..]);
            prop_assert_eq!(&bytes[18..20], &s.remote.port().to_be_bytes()[..]);
            let rb = bytes_of(&rk);
            prop_assert_eq!(&rb[0..4], &s.remote.ip().octets()[..]);
            prop_assert_eq!(&rb[4..8], &s.egress.ip().octets()[..]);
            prop_assert_eq!(&rb[8..10], &s.remote.port().to_be_bytes()[..]);
            prop_assert_eq!(&rb[10..12], &s.egress.port().to_be_bytes()[..]);
            prop_assert_eq!(FastCounts::from(v.counts), FastCounts::default());
        }

        #[test]
        fn distinct_flows_have_distinct_keys(a in arb_spec(), b in arb_spec()) {
            let (fa, ra, _) = encode(&a);
            let (fb, rb, _) = encode(&b);
            let same_fwd = (a.job_key, a.proto, a.sandbox, a.remote) == (b.job_key, b.proto, b.sandbox, b.remote);
            prop_assert_eq!(bytes_of(&fa) == bytes_of(&fb), same_fwd);
            let same_rev = (a.proto, a.remote, a.egress) == (b.proto, b.remote, b.egress);
            prop_assert_eq!(bytes_of(&ra) == bytes_of(&rb), same_rev);
        }

        #[test]
        fn a_clock_holds_its_rate(bits in 1u64..=1_000_000_000_000, mode in 0u8..3) {
            let rate = match mode {
                0 => ClockRate::Limited(Bps::new(bits).unwrap()),
                1 => ClockRate::Unlimited,
                _ => ClockRate::Blocked,
            };
            let (bps, m) = rate_fields(rate);
            let c = types::fp_clock { rate_bps: bps, mode: m, ..Default::default() };
            prop_assert_eq!(clock_rate(&c), Some(rate));
        }

        #[test]
        fn a_charge_takes_the_bytes_time_at_the_rate(bits in 1u64..=100_000_000_000, bytes in 0u64..=65_535) {
            let ns = charge_ns(ClockRate::Limited(Bps::new(bits).unwrap()), bytes);
            let exact = u128::from(bytes) * 8_000_000_000;
            prop_assert!(u128::from(ns) * u128::from(bits) <= exact);
            prop_assert!((u128::from(ns) + 1) * u128::from(bits) > exact);
        }
    }

    #[test]
    fn job_and_tenant_clocks_never_share_a_key() {
        let j = clock_key(ClockOwner::Job(JobKey(7)), ClockDir::Egress);
        let t = clock_key(ClockOwner::Tenant(TenantId(7)), ClockDir::Egress);
        let i = clock_key(ClockOwner::Job(JobKey(7)), ClockDir::Ingress);
        assert_ne!(bytes_of(&j), bytes_of(&t));
        assert_ne!(bytes_of(&j), bytes_of(&i));
    }
}
