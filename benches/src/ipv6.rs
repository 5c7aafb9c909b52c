//! The `ipv6` scenario: TCP_RR and bulk (one flow each way) over IPv4 and IPv6 side by side,
//! on the direct path and SNAS (the client natively in the job's namespace), alternating within
//! every repetition.
//!
//! # What it owns
//! - [`add_direct_ipv6`]: IPv6 for the direct baseline, which [`crate::paths::Baselines`]
//!   builds IPv4-only: a /64 on its transit link and one on its client link, routes both ways
//!   to the testbed's IPv6 host, forwarding on its router. Everything lives in namespaces the
//!   baselines and the testbed already own and remove.
//! - [`ipv6`]: the scenario. IPv4 targets are the names the other scenarios use
//!   (`api.example.com:7`, `bulk.example.com:5201`); IPv6 targets are `v6.example.com`, which
//!   has only an AAAA record (2001:db8::10, the same servers on the same ports), so the client
//!   resolves it to IPv6 on every path.
//!
//! # Limits
//! The proxy's in-kernel fast path is IPv4-only (docs/proxy.md "Fast path"), so SNAS's IPv6
//! bulk figures are the userspace workers' and its IPv4 ones mostly the fast path's. The
//! gVisor paths are not measured here (`privileged_e2e_ipv6` covers IPv6 in gVisor).

use std::collections::BTreeMap;

use serde_json::json;

use crate::client::{ClientResult, Workload};
use crate::paths::{PathError, PathKind, Paths};
use crate::results::{BarChart, BarSeries, BarValue, ScenarioResult, Table};
use crate::scenarios::Plan;
use crate::stats::median;
use snas_testbed::netns::ip;
use snas_testbed::Testbed;

/// The testbed's IPv6 host (`v6.example.com`, `dual.example.com`).
const HOST6: &str = "2001:db8::10";
/// The direct baseline's transit /64 (internet side `::1`, router side `::2`) and client /64
/// (router `::1`, client `::2`): documentation space, clear of the testbed's
/// 2001:db8:ff0N::/64, 2001:db8:e9::/120s and 2001:db8::/64.
const TRANSIT6: &str = "2001:db8:bd01";
const CLIENT6: &str = "2001:db8:bc01";

/// Writes a sysctl of the namespace `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), PathError> {
    let path = std::path::PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let p = path.clone();
    let v = value.to_owned();
    snas_testbed::netns::in_netns(ns, move || std::fs::write(&p, v))?.map_err(|source| {
        PathError::File {
            path: path.clone(),
            source,
        }
    })
}

/// Gives the direct baseline (namespaces `<prefix>-gd`, router, and `<prefix>-cd`, client,
/// built by [`crate::paths::Baselines::build`]) IPv6 routes to the testbed's IPv6 host and
/// back. Addresses are added without duplicate address detection (`nodad`): usable at once.
pub fn add_direct_ipv6(tb: &Testbed) -> Result<(), PathError> {
    let prefix = tb.prefix();
    let inet = tb.topology().inet_ns();
    let (gw, cl) = (format!("{prefix}-gd"), format!("{prefix}-cd"));
    for (ns, dev) in [(&gw, "up0"), (&gw, "c0"), (&cl, "eth0")] {
        sysctl(ns, &format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
    }
    sysctl(&inet, "net.ipv6.conf.gd.disable_ipv6", "0")?;
    sysctl(&gw, "net.ipv6.conf.all.forwarding", "1")?;
    let add = |ns: &str, addr: String, dev: &str| {
        ip(&["-n", ns, "-6", "addr", "add", &addr, "dev", dev, "nodad"])
    };
    add(&inet, format!("{TRANSIT6}::1/64"), "gd")?;
    add(&gw, format!("{TRANSIT6}::2/64"), "up0")?;
    add(&gw, format!("{CLIENT6}::1/64"), "c0")?;
    add(&cl, format!("{CLIENT6}::2/64"), "eth0")?;
    let host = format!("{HOST6}/128");
    let (via_inet, via_gw, via_client_gw) = (
        format!("{TRANSIT6}::1"),
        format!("{TRANSIT6}::2"),
        format!("{CLIENT6}::1"),
    );
    ip(&["-n", &gw, "-6", "route", "add", &host, "via", &via_inet])?;
    ip(&[
        "-n",
        &cl,
        "-6",
        "route",
        "add",
        &host,
        "via",
        &via_client_gw,
    ])?;
    ip(&[
        "-n",
        &inet,
        "-6",
        "route",
        "add",
        &format!("{CLIENT6}::/64"),
        "via",
        &via_gw,
    ])?;
    Ok(())
}

/// The job's policy: the IPv4 and the IPv6 targets, no limit that could bind.
fn policy(job: &str) -> String {
    format!(
        r#"tenant = "bench"
job = "{job}"
ttl = "2h"

[[egress]]
host = "api.example.com:7"

[[egress]]
host = "bulk.example.com:5201"

[[egress]]
host = "v6.example.com:7"

[[egress]]
host = "v6.example.com:5201"

[limits]
egress_bps = "100Gbit"
ingress_bps = "100Gbit"
max_connections = 100000
new_connections_per_sec = 1000000
new_connections_burst = 1000000
max_ports_per_destination = 65535
"#
    )
}

/// One measurement: a workload, and its IPv4 and IPv6 targets.
struct Variant {
    name: &'static str,
    workload: Workload,
    v4: (&'static str, u16),
    v6: (&'static str, u16),
}

type Key = (&'static str, PathKind, u8);

/// TCP_RR and bulk over IPv4 and IPv6 on the direct path and SNAS (see the module doc).
pub fn ipv6(paths: &Paths, plan: &Plan) -> ScenarioResult {
    let chosen: Vec<PathKind> = [PathKind::Direct, PathKind::SnasNs]
        .into_iter()
        .filter(|p| plan.paths.contains(p))
        .collect();
    let mut notes = vec![
        "The proxy's in-kernel fast path is IPv4-only: SNAS's IPv6 bulk figures are the \
         userspace workers' (TUN, engine, GENEVE sockets), its IPv4 ones mostly the fast path's."
            .to_owned(),
    ];
    if let Err(e) = add_direct_ipv6(&paths.tb) {
        notes.push(format!("direct path has no IPv6: {e}"));
    }
    let (d, w) = (plan.duration_s, plan.warmup_s);
    let variants = [
        Variant {
            name: "TCP_RR p50 µs",
            workload: Workload::Rr {
                duration_s: d,
                warmup_s: w,
            },
            v4: ("api.example.com", 7),
            v6: ("v6.example.com", 7),
        },
        Variant {
            name: "download ×1 Mbit/s",
            workload: Workload::Bulk {
                duration_s: d,
                warmup_s: w,
                flows: 1,
                download: true,
            },
            v4: ("bulk.example.com", 5201),
            v6: ("v6.example.com", 5201),
        },
        Variant {
            name: "upload ×1 Mbit/s",
            workload: Workload::Bulk {
                duration_s: d,
                warmup_s: w,
                flows: 1,
                download: false,
            },
            v4: ("bulk.example.com", 5201),
            v6: ("v6.example.com", 5201),
        },
    ];
    let mut samples: BTreeMap<Key, Vec<Result<ClientResult, String>>> = BTreeMap::new();
    let mut jobs = 0u64;
    for rep in 0..plan.reps {
        for v in &variants {
            for &p in &chosen {
                for (fam, (host, port)) in [(4u8, v.v4), (6u8, v.v6)] {
                    if crate::orchestrate::interrupted() {
                        break;
                    }
                    let job = if p.is_snas() {
                        jobs += 1;
                        match paths.sign(&policy(&format!("bench-ipv6-{jobs}"))) {
                            Ok(j) => Some(j),
                            Err(e) => {
                                samples
                                    .entry((v.name, p, fam))
                                    .or_default()
                                    .push(Err(e.to_string()));
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    let r = paths
                        .run(p, job.as_ref(), &v.workload, host, port)
                        .map_err(|e| e.to_string());
                    if let Err(e) = &r {
                        eprintln!(
                            "[bench] ipv6 rep {} {} {} IPv{fam}: {e}",
                            rep + 1,
                            v.name,
                            p.label()
                        );
                    }
                    samples.entry((v.name, p, fam)).or_default().push(r);
                }
            }
        }
    }
    let value = |name: &str, c: &ClientResult| -> Option<f64> {
        if name.starts_with("TCP_RR") {
            c.latency_us.as_ref().map(|l| l.p50)
        } else {
            (c.rate_bps > 0.0).then_some(c.rate_bps / 1e6)
        }
    };
    let values = |k: &Key| -> Vec<f64> {
        samples
            .get(k)
            .map(|v| {
                v.iter()
                    .filter_map(|r| r.as_ref().ok())
                    .filter_map(|c| value(k.0, c))
                    .collect()
            })
            .unwrap_or_default()
    };
    let spread = |xs: &[f64], digits: usize| match (median(xs), crate::stats::min_max(xs)) {
        (Some(m), Some((lo, hi))) if xs.len() > 1 => {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
        (Some(m), _) => format!("{m:.digits$}"),
        _ => "—".into(),
    };
    let mut table = Table {
        columns: vec![
            "measure".into(),
            "path".into(),
            "IPv4".into(),
            "IPv6".into(),
            "IPv6 / IPv4".into(),
        ],
        rows: Vec::new(),
    };
    for v in &variants {
        let digits = if v.name.starts_with("TCP_RR") { 1 } else { 0 };
        for &p in &chosen {
            let (a, b) = (values(&(v.name, p, 4)), values(&(v.name, p, 6)));
            let ratio = median(&b)
                .zip(median(&a))
                .and_then(|(x, y)| crate::stats::ratio(x, y))
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| "—".into());
            table.rows.push(vec![
                v.name.into(),
                p.label().into(),
                spread(&a, digits),
                spread(&b, digits),
                ratio,
            ]);
        }
    }
    // One chart per measure: a group per path, IPv4 and IPv6 side by side.
    let bar = |xs: &[f64]| {
        median(xs)
            .zip(crate::stats::min_max(xs))
            .map(|(m, (lo, hi))| BarValue::spread(m, lo, hi))
    };
    let charts: Vec<BarChart> = variants
        .iter()
        .map(|v| BarChart {
            title: v.name.into(),
            y_label: if v.name.starts_with("TCP_RR") {
                "µs".into()
            } else {
                "Mbit/s".into()
            },
            categories: chosen.iter().map(|p| p.label().into()).collect(),
            series: [4u8, 6]
                .iter()
                .map(|&fam| BarSeries {
                    name: format!("IPv{fam}"),
                    values: chosen
                        .iter()
                        .map(|&p| bar(&values(&(v.name, p, fam))))
                        .collect(),
                })
                .collect(),
            reference_lines: Vec::new(),
            log_y: false,
        })
        .collect();
    let errors: Vec<String> = samples
        .iter()
        .flat_map(|((name, p, fam), v)| {
            v.iter()
                .filter_map(|r| r.as_ref().err())
                .map(move |e| format!("{name} {} IPv{fam}: {e}", p.label()))
        })
        .collect();
    notes.extend(errors.iter().take(10).cloned());
    let raw: serde_json::Map<String, serde_json::Value> = samples
        .iter()
        .map(|((name, p, fam), v)| {
            let reps: Vec<serde_json::Value> = v
                .iter()
                .map(|r| match r {
                    Ok(c) => serde_json::to_value(c).unwrap_or(serde_json::Value::Null),
                    Err(e) => json!({ "error": e }),
                })
                .collect();
            (
                format!("{name} / {} / IPv{fam}", p.id()),
                serde_json::Value::Array(reps),
            )
        })
        .collect();
    ScenarioResult {
        id: "ipv6".into(),
        title: "IPv4 and IPv6 side by side (TCP_RR, bulk)".into(),
        method: format!(
            "{} repetitions; in each, every measure runs on each path over IPv4 (api.example.com, \
             bulk.example.com) then IPv6 (v6.example.com, AAAA only: {HOST6}), {d} s after {w} s \
             of warm-up; SNAS: the client natively in a fresh job's namespace, policy with both \
             names; direct: routed, IPv6 added to the baseline namespace. Medians (min–max).",
            plan.reps
        ),
        table,
        charts,
        goals: Vec::new(),
        notes,
        raw: serde_json::Value::Object(raw),
    }
}
