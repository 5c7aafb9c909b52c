//! The daemon's side of the in-kernel fast path: loads and attaches
//! [`snas_bpf::fastpath::FastPath`], mirrors the engine's [`OffloadEvent`]s into its maps,
//! reads its counters back for the engine, and tells its programs until when the userspace
//! pacer holds packets of jobs that have fast flows (the programs run the clocks themselves).
//!
//! # What it owns
//! - The loaded programs (detached when this is dropped) and the mirror of what is installed:
//!   per flow its keys and the counters already credited to the engine; per job and tenant
//!   how many fast flows use its clocks (a clock goes with its last flow).
//!
//! # Invariants and locking
//! - The mirror has its own lock, taken *after* the engine lock when both are needed
//!   ([`FastPathIo::lock`] under the engine lock, then the engine lock is released before any
//!   map is written): events are applied in the order the engine queued them and no engine
//!   lock is held across a system call. [`FastPathIo::sync`] reads the maps under the mirror
//!   lock alone and returns what to credit; the caller credits it under the engine lock.
//! - A flow's counters are credited once: the mirror remembers what it credited and credits
//!   the difference; a re-install (counters reset) first credits what the old entry had.
//! - Clocks are set before the flows that use them and removed after the last one.
//!
//! # Limits
//! - What the fast path carried in the last second of a flow that ends by expiry or with its
//!   job (the engine removes it in the same tick that writes its `flow_end` line) is credited
//!   before that tick only when the tick can end flows ([`crate::tier2::Tier2::ends_flows_at`]);
//!   an idle flow carried nothing since its last credit.
//! - Counters are read one flow at a time (two lookups a flow per second).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use snas_bpf::fastpath::{
    ClockDir, ClockOwner, ClockRate, DivertReason, FastCounts, FastFlowKeys, FastFlowSpec,
    FastPath, FastPathConfig, FastProto,
};
use snas_wire::{JobKey, L4Proto, TenantId};

use crate::clock::Nanos;
use crate::conntrack::FlowKey;
use crate::metrics::Metrics;
use crate::offload::{FastFlow, FastRates, OffloadEvent};
use crate::pacer::PaceRate;

/// Why the fast path is not running.
#[derive(Debug, thiserror::Error)]
pub enum FastPathStartError {
    /// An interface could not be found.
    #[error("fast path: {0}")]
    Interface(String),
    /// Loading or attaching failed.
    #[error(transparent)]
    Bpf(#[from] snas_bpf::fastpath::FastPathError),
}

#[derive(Debug, Clone, Copy)]
struct Mirrored {
    keys: FastFlowKeys,
    job: JobKey,
    tenant: TenantId,
    credited: (FastCounts, FastCounts),
}

#[derive(Debug, Clone, Copy)]
struct ClockUse {
    flows: u32,
    egress: PaceRate,
    ingress: PaceRate,
    /// The pacer holds written for a job's clocks (egress, ingress), `CLOCK_MONOTONIC`.
    held: [Duration; 2],
}

/// What the fast path carried for one flow since the last credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The flow.
    pub key: FlowKey,
    /// Packets and bytes sandbox → internet.
    pub out: (u64, u64),
    /// Packets and bytes internet → sandbox.
    pub inbound: (u64, u64),
    /// `CLOCK_MONOTONIC` time of its last fast packet.
    pub last_seen: Option<Duration>,
}

/// The mirror of what is installed (behind [`FastPathIo`]'s lock).
#[derive(Debug, Default)]
pub struct Mirror {
    flows: HashMap<FlowKey, Mirrored>,
    jobs: HashMap<JobKey, ClockUse>,
    tenants: HashMap<TenantId, ClockUse>,
    /// Credits of removed or re-installed entries, for the next [`FastPathIo::sync`].
    pending: Vec<Credit>,
    errors: u64,
}

/// The loaded fast path and its mirror. See the module documentation.
#[derive(Debug)]
pub struct FastPathIo {
    fp: FastPath,
    mirror: Mutex<Mirror>,
}

fn clock_rate(r: PaceRate) -> ClockRate {
    match r {
        PaceRate::Limited(b) => ClockRate::Limited(b),
        PaceRate::Unlimited => ClockRate::Unlimited,
        PaceRate::Blocked => ClockRate::Blocked,
    }
}

fn fast_keys(f: &FastFlow) -> Option<FastFlowKeys> {
    let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (f.key.src_ip, f.key.dst_ip)
    else {
        return None;
    };
    let proto = match f.key.proto {
        L4Proto::Tcp => FastProto::Tcp,
        L4Proto::Udp => FastProto::Udp,
        L4Proto::Icmp | L4Proto::Icmpv6 => return None,
    };
    Some(FastFlowKeys {
        job_key: f.key.job,
        proto,
        sandbox: SocketAddrV4::new(src, f.key.src_port),
        remote: SocketAddrV4::new(dst, f.key.dst_port),
        egress: SocketAddrV4::new(f.egress_ip, f.egress_port),
    })
}

fn delta(now: FastCounts, before: FastCounts) -> (u64, u64) {
    (
        now.packets.saturating_sub(before.packets),
        now.bytes.saturating_sub(before.bytes),
    )
}

/// `(name, ifindex, mtu)` of the interface holding `addr` (`ip -j -4 addr show`).
fn interface_of(addr: Ipv4Addr) -> Result<(String, u32, u32), FastPathStartError> {
    let v = ip_json(&["-j", "-4", "addr", "show"])?;
    for link in v.as_array().into_iter().flatten() {
        let holds = link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .any(|i| i.get("local").and_then(|l| l.as_str()) == Some(&addr.to_string()));
        if holds {
            let name = link.get("ifname").and_then(|n| n.as_str()).unwrap_or("");
            let idx = link.get("ifindex").and_then(|n| n.as_u64()).unwrap_or(0);
            let mtu = link.get("mtu").and_then(|n| n.as_u64()).unwrap_or(1500);
            return Ok((
                name.to_owned(),
                u32::try_from(idx).unwrap_or(0),
                u32::try_from(mtu).unwrap_or(1500),
            ));
        }
    }
    Err(FastPathStartError::Interface(format!(
        "no interface holds underlay_addr {addr}"
    )))
}

/// The interface of the IPv4 default route.
fn default_route_interface() -> Result<String, FastPathStartError> {
    let v = ip_json(&["-j", "-4", "route", "show", "default"])?;
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|r| r.get("dev"))
        .and_then(|d| d.as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            FastPathStartError::Interface(
                "no IPv4 default route: set fast_path_interface".to_owned(),
            )
        })
}

fn ifindex(name: &str) -> Result<u32, FastPathStartError> {
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in, not ours.
    let v = ip_json(&["-j", "link", "show", "dev", name])?;
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|l| l.get("ifindex"))
        .and_then(|i| i.as_u64())
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| {
            FastPathStartError::Interface(format!("fast_path_interface {name}: no such interface"))
        })
}

fn ip_json(args: &[&str]) -> Result<serde_json::Value, FastPathStartError> {
    let fail = |d: String| FastPathStartError::Interface(format!("ip {}: {d}", args.join(" ")));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| fail(e.to_string()))
}

impl FastPathIo {
    /// Loads the programs, trusts `nodes`, and attaches them to the underlay interface (the
    /// one holding `underlay`) and to `internet` (default: the default route's interface).
    ///
    /// A packet is fast while its job's and tenant's clocks are at most `slack` ahead of now:
    /// the daemon passes the pacing horizon, the queueing budget the userspace pacer allows
    /// too. The programs cannot delay a packet (no fq qdisc to honour a departure time), so
    /// where the pacer would have queued a burst up to the horizon, the fast path sends it at
    /// once; beyond, packets go to the pacer. Measured: one millisecond sent TSO bursts of a
    /// bulk download far below the 10 Gbit/s tenant cap to the pacer (58,702 diverts in 3 GB).
    pub fn start(
        underlay: Ipv4Addr,
        nodes: &[Ipv4Addr],
        internet: Option<&str>,
        slack: Duration,
    ) -> Result<FastPathIo, FastPathStartError> {
        let (ul_name, ul_index, ul_mtu) = interface_of(underlay)?;
        let inet_name = match internet {
            Some(n) => n.to_owned(),
            None => default_route_interface()?,
        };
        let inet_index = ifindex(&inet_name)?;
        if inet_index == ul_index {
            return Err(FastPathStartError::Interface(format!(
                "the internet side ({inet_name}) is the underlay interface: set fast_path_interface"
            )));
        }
        let fp = FastPath::load(&FastPathConfig {
            proxy_ip: underlay,
            geneve_port: snas_wire::geneve::GENEVE_PORT,
            underlay_mtu: ul_mtu,
            slack,
            bound_hold: BOUND_HOLD,
            test_redirect_ifindex: None,
        })?;
        fp.add_nodes(nodes)?;
        fp.attach(ul_index, inet_index)?;
        tracing::info!(
            underlay = %ul_name,
            internet = %inet_name,
            "fast path attached"
        );
        Ok(FastPathIo {
            fp,
            mirror: Mutex::new(Mirror::default()),
        })
    }

    /// Locks the mirror (a poisoned lock is taken over: the mirror is rebuilt from events).
    pub fn lock(&self) -> MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies the engine's events, in order, with the mirror locked (see the module docs).
    /// `now_unix` and `mono` (`CLOCK_MONOTONIC`) turn the policies' expiry into the programs'
    /// clock.
    pub fn apply(
        &self,
        m: &mut Mirror,
        events: impl IntoIterator<Item = OffloadEvent>,
        now_unix: u64,
        mono: Duration,
    ) {
        for e in events {
            let r = match e {
                OffloadEvent::Install(f) => self.install(m, &f, now_unix, mono),
                OffloadEvent::Remove(f) => self.remove(m, &f.key),
            };
            if let Err(e) = r {
                m.errors += 1;
                tracing::warn!(error = %e, "fast path map update failed");
            }
        }
    }

    fn install(
        &self,
        m: &mut Mirror,
        f: &FastFlow,
        now_unix: u64,
        mono: Duration,
    ) -> Result<(), snas_bpf::fastpath::FastPathError> {
        let Some(keys) = fast_keys(f) else {
            return Ok(());
        };
        // A re-install resets the entry's counters: credit what it had first.
        if m.flows.contains_key(&f.key) {
            self.remove(m, &f.key)?;
        }
        self.use_clocks(m, f.key.job, f.tenant, &f.rates)?;
        let left = Duration::from_secs(f.expires_unix.saturating_sub(now_unix));
        let spec = FastFlowSpec {
            job_key: f.key.job,
            tenant_id: f.tenant,
            serial: f.serial,
            node: f.node,
            proto: keys.proto,
            sandbox: keys.sandbox,
            remote: keys.remote,
            egress: keys.egress,
            expires: mono.saturating_add(left),
        };
        m.flows.insert(
            f.key,
            Mirrored {
                keys,
                job: f.key.job,
                tenant: f.tenant,
                credited: Default::default(),
            },
        );
        self.fp.install(&spec)
    }

    fn use_clocks(
        &self,
        m: &mut Mirror,
        job: JobKey,
        tenant: TenantId,
        r: &FastRates,
    ) -> Result<(), snas_bpf::fastpath::FastPathError> {
        let fp = &self.fp;
        let set = |owner: ClockOwner, u: &mut ClockUse, e: PaceRate, i: PaceRate, new: bool| {
            if new || u.egress != e || u.ingress != i {
                fp.set_clock(owner, ClockDir::Egress, clock_rate(e))?;
                fp.set_clock(owner, ClockDir::Ingress, clock_rate(i))?;
                u.egress = e;
                u.ingress = i;
            }
            u.flows += 1;
            Ok::<_, snas_bpf::fastpath::FastPathError>(())
        };
        let fresh = |e, i| ClockUse {
            flows: 0,
            egress: e,
            ingress: i,
            held: [Duration::ZERO; 2],
        };
        let new_job = !m.jobs.contains_key(&job);
        let u = m
            .jobs
            .entry(job)
            .or_insert_with(|| fresh(r.job_egress, r.job_ingress));
        set(
            ClockOwner::Job(job),
            u,
            r.job_egress,
            r.job_ingress,
            new_job,
        )?;
        let new_tenant = !m.tenants.contains_key(&tenant);
        let u = m
            .tenants
            .entry(tenant)
            .or_insert_with(|| fresh(r.tenant_egress, r.tenant_ingress));
        set(
            ClockOwner::Tenant(tenant),
            u,
            r.tenant_egress,
            r.tenant_ingress,
            new_tenant,
        )
    }

    fn remove(
        &self,
        m: &mut Mirror,
        key: &FlowKey,
    ) -> Result<(), snas_bpf::fastpath::FastPathError> {
        let Some(f) = m.flows.remove(key) else {
            return Ok(());
        };
        let last = self.fp.remove(&f.keys)?;
        if let Some((o, i)) = last {
            m.pending.push(Credit {
                key: *key,
                out: delta(o, f.credited.0),
                inbound: delta(i, f.credited.1),
                last_seen: o.last_seen.max(i.last_seen),
            });
        }
        let fp = &self.fp;
        let release = |owner: ClockOwner, u: Option<&mut ClockUse>| {
            let Some(u) = u else { return Ok(true) };
            u.flows = u.flows.saturating_sub(1);
            if u.flows > 0 {
                return Ok(false);
            }
            fp.remove_clock(owner, ClockDir::Egress)?;
            fp.remove_clock(owner, ClockDir::Ingress)?;
            Ok::<_, snas_bpf::fastpath::FastPathError>(true)
        };
        if release(ClockOwner::Job(f.job), m.jobs.get_mut(&f.job))? {
            m.jobs.remove(&f.job);
        }
        if release(ClockOwner::Tenant(f.tenant), m.tenants.get_mut(&f.tenant))? {
            m.tenants.remove(&f.tenant);
        }
        Ok(())
    }

    /// Reads every installed flow's counters; returns what to credit to the engine (and the
    /// credits of entries removed since the last call).
    pub fn sync(&self) -> Vec<Credit> {
        let mut m = self.lock();
        let mut out = std::mem::take(&mut m.pending);
        let mut errors = 0;
        for (key, f) in &mut m.flows {
            match self.fp.counts(&f.keys) {
                Ok(Some((o, i))) => {
                    let c = Credit {
                        key: *key,
                        out: delta(o, f.credited.0),
                        inbound: delta(i, f.credited.1),
                        last_seen: o.last_seen.max(i.last_seen),
                    };
                    f.credited = (o, i);
                    if c.out.0 > 0 || c.inbound.0 > 0 {
                        out.push(c);
                    }
                }
                Ok(None) => {}
                Err(_) => errors += 1,
            }
        }
        m.errors += errors;
        out
    }

    /// Tells the programs until when the userspace pacer holds packets of jobs with fast flows
    /// (`(job, bytes, last departure)` of a pass, one direction; departures on the engine's
    /// clock, which reads `engine_now` while `CLOCK_MONOTONIC` reads `mono`), so that no packet
    /// of such a job leaves fast before one the pacer still holds. The bytes are not charged:
    /// the programs charge every packet of a fast flow themselves, the ones they divert to the
    /// pacer too, and a clock has one writer. A hold is written rounded up by [`HOLD_GRAIN`]
    /// and only when the pacer holds a packet beyond the last one written, so a job the pacer
    /// keeps busy costs at most one map update per grain and direction; jobs without fast
    /// flows cost nothing.
    pub fn charge(
        &self,
        m: &mut Mirror,
        dir: ClockDir,
        sent: &[(JobKey, u64, Nanos)],
        mono: Duration,
        engine_now: Nanos,
    ) {
        if m.jobs.is_empty() {
            return;
        }
        let to_mono = |t: Nanos| mono.saturating_add(t.saturating_duration_since(engine_now));
        let slot = match dir {
            ClockDir::Egress => 0,
            ClockDir::Ingress => 1,
        };
        for &(job, _, depart) in sent {
            let Some(u) = m.jobs.get_mut(&job) else {
                continue;
            };
            let Some(until) = next_hold(u.held[slot], to_mono(depart), mono) else {
                continue;
            };
            if self.fp.hold(ClockOwner::Job(job), dir, until).is_err() {
                m.errors += 1;
                continue;
            }
            u.held[slot] = until;
        }
    }

    /// Copies the programs' statistics and the mirror's figures into `metrics`.
    pub fn publish(&self, metrics: &Metrics) {
        let (flows, errors) = {
            let m = self.lock();
            (m.flows.len() as u64, m.errors)
        };
        let st = match self.fp.stats() {
            Ok(s) => s,
            Err(_) => return,
        };
        let f = &metrics.fast_path;
        f.available.store(1, Ordering::Relaxed);
        f.flows.store(flows, Ordering::Relaxed);
        f.errors.store(errors + st.failed, Ordering::Relaxed);
        f.to_internet_packets
            .store(st.from_node_packets, Ordering::Relaxed);
        f.to_internet_bytes
            .store(st.from_node_bytes, Ordering::Relaxed);
        f.to_nodes_packets
            .store(st.to_node_packets, Ordering::Relaxed);
        f.to_nodes_bytes.store(st.to_node_bytes, Ordering::Relaxed);
        for (i, r) in DivertReason::ALL.iter().enumerate() {
            f.diverted[i].store(st.diverted(*r), Ordering::Relaxed);
        }
    }
}

/// How long a job (or tenant) whose limit bound stays on the userspace path after its packets
/// last found its clock ahead of now ([`FastPathConfig::bound_hold`]). While a limit binds,
/// the programs charge the clock for every packet they hand to the pacer as the pacer charges
/// its own, so packets keep finding it ahead and the job stays with the pacer; a job whose demand fell below its limit is fast
/// again a second later. Shorter would hand a still-bound TCP flow back to the fast path
/// during a loss recovery's pause, and its first round trip after would leave as a line-rate
/// burst of the slack's worth.
pub const BOUND_HOLD: Duration = Duration::from_secs(1);

/// What a pacer hold is rounded up by ([`FastPathIo::charge`]): a job whose packets the pacer
/// keeps delaying costs at most one map update per grain and direction, and leaves the
/// userspace path at most this much later than it could.
pub const HOLD_GRAIN: Duration = Duration::from_millis(1);

/// The hold to write when the pacer's last departure of a job is `depart` and `written` was
/// written before (`CLOCK_MONOTONIC`, now `now`): none when the packet leaves now or the
/// written hold covers it already, else `depart` rounded up by [`HOLD_GRAIN`].
pub fn next_hold(written: Duration, depart: Duration, now: Duration) -> Option<Duration> {
    if depart <= now || depart <= written {
        return None;
    }
    Some(depart.saturating_add(HOLD_GRAIN))
}

/// Converts a `CLOCK_MONOTONIC` time of the programs to the engine's clock, given both clocks
/// read now.
pub fn to_engine(t: Duration, mono_now: Duration, engine_now: Nanos) -> Nanos {
    let ago = mono_now.saturating_sub(t);
    engine_now.saturating_sub(ago)
}

/// `CLOCK_MONOTONIC` now (the programs' clock), zero if it cannot be read.
pub fn mono_now() -> Duration {
    snas_bpf::mono_now().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_programs_time_maps_to_the_engines_clock_by_its_age() {
        let engine_now = Nanos::from_nanos(5_000_000_000);
        let t = to_engine(
            Duration::from_secs(100),
            Duration::from_secs(102),
            engine_now,
        );
        assert_eq!(t, Nanos::from_nanos(3_000_000_000));
        // A time in the future (clocks read in another order) is now.
        let t = to_engine(
            Duration::from_secs(103),
            Duration::from_secs(102),
            engine_now,
        );
        assert_eq!(t, engine_now);
    }

    #[test]
    fn a_pacer_hold_is_written_only_when_it_reaches_beyond_the_last_one_and_rounded_up() {
        let ms = Duration::from_millis;
        let now = ms(1_000);
        // Leaves now or in the past: the pacer holds nothing.
        assert_eq!(next_hold(Duration::ZERO, now, now), None);
        assert_eq!(next_hold(Duration::ZERO, ms(999), now), None);
        // Held 5 ms: written with a grain's margin.
        let h = next_hold(Duration::ZERO, ms(1_005), now).unwrap();
        assert_eq!(h, ms(1_005) + HOLD_GRAIN);
        // A pacer that keeps delaying the job at 1 Gbit/s (one 1,444-byte packet every
        // 11.5 us, each 5 ms out) for one second: at most one write per grain.
        let (mut written, mut writes) = (h, 0);
        for i in 0..87_000u64 {
            let now = now + Duration::from_nanos(i * 11_552);
            if let Some(w) = next_hold(written, now + ms(5), now) {
                assert!(w > written);
                written = w;
                writes += 1;
            }
        }
        assert!((900..=1_001).contains(&writes), "{writes}");
    }

    #[test]
    fn only_ipv4_tcp_and_udp_flows_have_fast_keys() {
        use std::net::IpAddr;
        let mut f = FastFlow {
            key: FlowKey {
                job: JobKey(1),
                proto: L4Proto::Tcp,
                src_ip: IpAddr::V4(Ipv4Addr::new(10, 255, 1, 2)),
                src_port: 40000,
                dst_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
                dst_port: 443,
            },
            tenant: TenantId(2),
            serial: snas_wire::PolicySerial(3),
            node: Ipv4Addr::new(192, 0, 2, 11),
            egress_ip: Ipv4Addr::new(198, 51, 100, 70),
            egress_port: 31337,
            expires_unix: 0,
            rates: FastRates {
                job_egress: PaceRate::Unlimited,
                job_ingress: PaceRate::Unlimited,
                tenant_egress: PaceRate::Unlimited,
                tenant_ingress: PaceRate::Unlimited,
            },
        };
        let k = fast_keys(&f).unwrap();
        assert_eq!(k.sandbox, "10.255.1.2:40000".parse().unwrap());
        assert_eq!(k.egress, "198.51.100.70:31337".parse().unwrap());
        f.key.proto = L4Proto::Icmp;
        assert!(fast_keys(&f).is_none());
        f.key.proto = L4Proto::Udp;
        f.key.dst_ip = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
        assert!(fast_keys(&f).is_none());
    }
}
