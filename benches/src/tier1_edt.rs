//! Tier 1's EDT accuracy, measured on the real program with BPF_PROG_TEST_RUN: the departure
//! stamps it writes for a sandbox sending as fast as it can, at 10 Mbit/s, 100 Mbit/s and
//! 1 Gbit/s limits. This kernel has no `sch_fq`, so the stamps cannot be observed on the wire
//! here; with fq (production) they are exactly when packets leave. The end-to-end figure
//! through the proxy's pacer is the `edt_accuracy` scenario.
//!
//! Owns the tier-1 set-up for it (a node loaded with its own pin directory, removed by a guard
//! even on panic; the job is attributed to `lo`, which always exists) and the rate arithmetic:
//! n stamped packets of `len` bytes span n − 1 transmission times (start-time EDT), so the
//! achieved rate is (n − 1)·len·8 / (last stamp − first stamp).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use snas_bpf::testing::{self, SkbCtx, TC_ACT_REDIRECT};
use snas_bpf::{
    Bps, JobConfig, JobKey, NodeConfig, PolicySerial, PortRule, ProxyEntry, RuleProtocol, Tier1,
};

use crate::results::{BarChart, BarSeries, BarValue, GoalCheck, ScenarioResult, Table};

/// Errors of the tier-1 EDT measurement.
#[derive(Debug, thiserror::Error)]
pub enum Tier1EdtError {
    /// Needs root (loading eBPF).
    #[error("tier-1 EDT needs root (loading eBPF)")]
    NotRoot,
    /// Loading or configuring tier 1 failed.
    #[error("tier 1 {step}: {reason}")]
    Tier1 { step: &'static str, reason: String },
    /// A packet could not be built.
    #[error("building the test packet: {0}")]
    Packet(String),
}

const JOB: JobKey = JobKey(0x5eed_0000_0000_0ed7);
const SANDBOX_MAC: [u8; 6] = [2, 0x53, 0x4e, 0, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0x53, 0x4e, 0, 0, 1];
/// IP length of each packet: a full-sized packet of a SNAS job (MTU 1444).
const PACKET: usize = 1444;

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = snas_bpf::remove_pins(&self.0);
    }
}

fn step(step: &'static str) -> impl FnOnce(snas_bpf::Tier1Error) -> Tier1EdtError {
    move |e| Tier1EdtError::Tier1 {
        step,
        reason: e.to_string(),
    }
}

fn job(egress: Bps) -> JobConfig {
    JobConfig {
        veth_ifindex: 1,
        job_key: JOB,
        tenant_id: snas_wire::TenantId(1),
        policy_serial: PolicySerial(1),
        sandbox_ip: Ipv4Addr::new(10, 88, 0, 2),
        sandbox_mac: SANDBOX_MAC,
        host_mac: HOST_MAC,
        gateway_ip: Ipv4Addr::new(10, 88, 0, 1),
        dns_port: 53,
        egress: Some(egress),
        ..JobConfig::default()
    }
}

fn frame() -> Result<Vec<u8>, Tier1EdtError> {
    let payload = vec![0u8; PACKET - 28];
    let ip = snas_wire::build::udp(&snas_wire::build::UdpSpec {
        src: SocketAddr::from(([10, 88, 0, 2], 40000)),
        dst: SocketAddr::from(([203, 0, 113, 7], 7)),
        payload: &payload,
    })
    .map_err(|e| Tier1EdtError::Packet(e.to_string()))?;
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&SANDBOX_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    Ok(f)
}

/// Achieved rate of `stamps` (sorted departures, ns) for packets of `len` bytes.
pub fn rate_of_stamps(stamps: &[u64], len: usize) -> Option<f64> {
    let (first, last) = (stamps.first()?, stamps.last()?);
    (last > first).then(|| (stamps.len() - 1) as f64 * len as f64 * 8e9 / (last - first) as f64)
}

/// Sends as fast as BPF_PROG_TEST_RUN allows for `window` at each limit, `reps` times.
pub fn tier1_edt(reps: usize, window: Duration) -> Result<ScenarioResult, Tier1EdtError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Tier1EdtError::NotRoot);
    }
    snas_bpf::ensure_bpffs().map_err(step("bpffs"))?;
    let mut node = NodeConfig::new("benchedt", 1, Ipv4Addr::new(192, 0, 2, 10), 9000);
    node.attach_uplink = false;
    node.pin_dir = PathBuf::from(format!("/sys/fs/bpf/snas-bench-edt-{}", std::process::id()));
    let _pins = Pins(node.pin_dir.clone());
    let t1 = Tier1::load(&node).map_err(step("load"))?;
    t1.set_proxies(&[ProxyEntry::active(Ipv4Addr::new(192, 0, 2, 21))])
        .map_err(step("proxies"))?;
    let f = frame()?;
    let ctx = SkbCtx {
        ifindex: 1,
        ..Default::default()
    };
    let limits = [(10e6, "10Mbit"), (100e6, "100Mbit"), (1e9, "1Gbit")];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); limits.len()];
    let mut raw = Vec::new();
    for _ in 0..reps.max(1) {
        for (i, &(bps, name)) in limits.iter().enumerate() {
            t1.configure_job(&job(
                Bps::new(bps as u64).ok_or_else(|| Tier1EdtError::Packet("rate 0".into()))?
            ))
            .map_err(step("job"))?;
            t1.allow_cidr(
                JOB,
                "203.0.113.0/24"
                    .parse()
                    .map_err(|_| Tier1EdtError::Packet("cidr".into()))?,
                &[PortRule::port(RuleProtocol::Udp, 7)],
                false,
            )
            .map_err(step("rule"))?;
            // Let the previous limit's clock (at most one horizon ahead) run out.
            std::thread::sleep(Duration::from_millis(30));
            let (mut stamps, mut dropped) = (Vec::new(), 0u64);
            let start = Instant::now();
            while start.elapsed() < window {
                let out = testing::run(t1.sandbox_prog(), &f, &ctx).map_err(|e| {
                    Tier1EdtError::Tier1 {
                        step: "test run",
                        reason: e.to_string(),
                    }
                })?;
                if out.retval == TC_ACT_REDIRECT {
                    stamps.push(out.tstamp);
                } else {
                    dropped += 1;
                }
            }
            stamps.sort_unstable();
            let rate = rate_of_stamps(&stamps, PACKET);
            if let Some(r) = rate {
                ratios[i].push(r / bps);
            }
            raw.push(json!({"limit": name, "stamped": stamps.len(), "dropped": dropped, "rate_bps": rate}));
        }
    }
    let mut table = Table {
        columns: vec![
            "limit".into(),
            "achieved / configured".into(),
            "packets stamped per repetition".into(),
        ],
        rows: Vec::new(),
    };
    let mut goals = Vec::new();
    for (i, &(_, name)) in limits.iter().enumerate() {
        let m = crate::stats::median(&ratios[i]);
        let stamped: Vec<String> = raw
            .iter()
            .filter(|r| r["limit"] == name)
            .map(|r| r["stamped"].to_string())
            .collect();
        table.rows.push(vec![
            name.into(),
            match (m, crate::stats::min_max(&ratios[i])) {
                (Some(m), Some((lo, hi))) => format!("{m:.5} ({lo:.5}–{hi:.5})"),
                _ => "—".into(),
            },
            stamped.join(" / "),
        ]);
        goals.push(GoalCheck {
            goal: format!("tier 1 {name}: within ±3%"),
            measured: m.map_or("—".into(), |m| format!("{:+.3}%", (m - 1.0) * 100.0)),
            met: m.map(|m| (m - 1.0).abs() <= 0.03),
        });
    }
    Ok(ScenarioResult {
        id: "tier1_edt".into(),
        title: "EDT accuracy of tier 1 (departure stamps, BPF_PROG_TEST_RUN)".into(),
        method: format!(
            "The real sandbox program, loaded with its own pins, stamps {PACKET}-byte UDP packets of one job sent back to back through BPF_PROG_TEST_RUN for {} ms per limit ({} repetitions); achieved = (n − 1)·len·8 / (last stamp − first stamp). Packets beyond the 20 ms horizon are dropped, as in production, so the stamped ones are those that fit the rate.",
            window.as_millis(),
            reps.max(1)
        ),
        table,
        charts: vec![BarChart {
            title: "Tier-1 EDT: achieved / configured".into(),
            y_label: "ratio".into(),
            categories: limits.iter().map(|l| l.1.to_owned()).collect(),
            series: vec![BarSeries {
                name: "tier 1 stamps".into(),
                values: ratios
                    .iter()
                    .map(|r| {
                        let m = crate::stats::median(r)?;
                        let (lo, hi) = crate::stats::min_max(r)?;
                        Some(BarValue::spread(m, lo, hi))
                    })
                    .collect(),
            }],
            reference_lines: vec![("−3%".into(), 0.97), ("+3%".into(), 1.03)],
            log_y: false,
        }],
        goals,
        notes: vec!["This kernel has no sch_fq: the stamps are what fq would enforce on the uplink in production; here the proxy's pacer enforces the limits (see the end-to-end EDT scenario).".into()],
        raw: json!(raw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_of_evenly_spaced_stamps_is_len_over_spacing() {
        // 1444 bytes every 11,552 ns is exactly 1 Gbit/s.
        let stamps: Vec<u64> = (0..100).map(|i| 5_000 + i * 11_552).collect();
        let r = rate_of_stamps(&stamps, 1444).unwrap_or(0.0);
        assert!((r - 1e9).abs() < 1.0, "{r}");
        assert_eq!(rate_of_stamps(&[7], 1444), None);
        assert_eq!(rate_of_stamps(&[], 1444), None);
    }
}
