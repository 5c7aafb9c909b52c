//! The `first_payload` scenario (issue 17): what tier 2's name check adds to a connection's
//! first payload. Tier 2 holds a flow's first client bytes (a TLS ClientHello, an HTTP
//! request) until it has read the name in them and checked it against the policy, then
//! releases them; this scenario measures that hold.
//!
//! Two workloads, each on three cases alternated within every repetition (direct, SNAS with
//! the name check on, SNAS with `names = "off"` on the same rules), so that the check's own
//! cost is the difference of the two SNAS cases in the same run:
//! - **TLS handshake**: connect to `api.example.com:443`, a full rustls handshake verifying
//!   the testbed's HTTPS server against the testbed CA (TCP connect + ClientHello → server's
//!   flight → client Finished), close_notify, close. The ClientHello is the held payload.
//! - **CRR**: connect to `api.example.com:80`, `GET /`, read to EOF, close (the `tcp_crr`
//!   client). The request is the held payload (its `Host` header is checked).
//!
//! The SNAS runs also read the proxies' `snas_proxy_name_checks_total{outcome="passed"}`
//! before and after, so the table shows that the check-on runs were checked and the check-off
//! runs were not (a run that did not hold what it claims to measure would show here).
//!
//! Owns its policies, its client (the TLS handshake loop) and its aggregation; the paths and
//! the CRR client are the crate's. Only the netns SNAS path is measured (the hold is the
//! proxy's, the same for a client in gVisor); squid is left out (it tunnels by name and has no
//! equivalent hold).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{address_for, connect, io_err, ClientError, ClientResult, Target, Workload};
use crate::paths::{PathKind, Paths};
use crate::results::{BarChart, BarSeries, BarValue, GoalCheck, ScenarioResult, Table};
use crate::scenarios::Plan;
use crate::stats::{median, min_max, Summary};

/// The goal: the check adds less than this at p50 (check on minus check off).
const GOAL_ADDED_P50_US: f64 = 20.0;

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Direct,
    SnasCheck,
    SnasOff,
}

impl Case {
    const ALL: [Case; 3] = [Case::Direct, Case::SnasCheck, Case::SnasOff];

    fn label(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::SnasCheck => "SNAS, name check on",
            Case::SnasOff => "SNAS, names = \"off\"",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::SnasCheck => "snas_check",
            Case::SnasOff => "snas_off",
        }
    }
}

/// The policy of a SNAS case: the benchmark's destinations on 80 and 443 by name, with the
/// name check as `names` says.
fn policy(job: &str, names: &str) -> String {
    format!(
        r#"tenant = "bench"
job = "{job}"
ttl = "2h"

[[egress]]
host = "api.example.com:80"
names = "{names}"

[[egress]]
host = "api.example.com:443"
names = "{names}"

[limits]
max_connections = 100000
new_connections_per_sec = 1000000
new_connections_burst = 1000000
max_ports_per_destination = 65535
"#
    )
}

/// One run's figures: the client's result and, on SNAS, the name checks passed during it.
#[derive(Debug, Clone)]
struct Run {
    result: Result<ClientResult, String>,
    checks_passed: Option<u64>,
}

/// Per workload, per case: one [`Run`] per repetition.
type Runs = std::collections::BTreeMap<(&'static str, Case), Vec<Run>>;

fn run_case(paths: &Paths, case: Case, n: usize, w: &Workload, port: u16) -> Run {
    let passed = || paths.proxy_metric("snas_proxy_name_checks_total", "outcome", &["passed"]);
    let (path, names) = match case {
        Case::Direct => (PathKind::Direct, None),
        Case::SnasCheck => (PathKind::SnasNs, Some("check")),
        Case::SnasOff => (PathKind::SnasNs, Some("off")),
    };
    let job = match names {
        Some(names) => match paths.sign(&policy(&format!("bench-first-payload-{n}"), names)) {
            Ok(j) => Some(j),
            Err(e) => {
                return Run {
                    result: Err(e.to_string()),
                    checks_passed: None,
                }
            }
        },
        None => None,
    };
    let before = job.as_ref().and_then(|_| passed().ok());
    let result = paths
        .run(path, job.as_ref(), w, "api.example.com", port)
        .map_err(|e| e.to_string());
    let after = job.as_ref().and_then(|_| passed().ok());
    Run {
        result,
        checks_passed: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
    }
}

fn values(runs: &[Run], f: impl Fn(&ClientResult) -> Option<f64>) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.result.as_ref().ok())
        .filter_map(f)
        .collect()
}

fn spread(xs: &[f64], digits: usize) -> String {
    match (median(xs), min_max(xs)) {
        (Some(m), Some((lo, hi))) if xs.len() > 1 => {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
        (Some(m), _) => format!("{m:.digits$}"),
        _ => "—".into(),
    }
}

fn p50(c: &ClientResult) -> Option<f64> {
    c.latency_us.map(|l| l.p50)
}

fn p99(c: &ClientResult) -> Option<f64> {
    c.latency_us.map(|l| l.p99)
}

/// Per repetition, `on`'s figure minus `off`'s (pairs of the same repetition only).
fn paired_diffs(on: &[Run], off: &[Run], f: impl Fn(&ClientResult) -> Option<f64>) -> Vec<f64> {
    on.iter()
        .zip(off)
        .filter_map(|(a, b)| {
            let a = a.result.as_ref().ok().and_then(&f)?;
            let b = b.result.as_ref().ok().and_then(&f)?;
            Some(a - b)
        })
        .collect()
}

/// Runs the scenario: `plan.reps` repetitions of both workloads on the three cases.
pub fn first_payload(paths: &Paths, plan: &Plan) -> ScenarioResult {
    let ca_path = snas_testbed::tls::ca_path(&snas_testbed::tls::dir(paths.tb.topology()));
    let mut notes = Vec::new();
    let ca_pem = match std::fs::read_to_string(&ca_path) {
        Ok(s) => Some(s),
        Err(e) => {
            notes.push(format!(
                "TLS handshakes not measured: reading the testbed CA {}: {e}",
                ca_path.display()
            ));
            None
        }
    };
    let mut workloads: Vec<(&'static str, Workload, u16)> = Vec::new();
    if let Some(ca_pem) = ca_pem {
        workloads.push((
            "tls",
            Workload::TlsHandshake {
                duration_s: plan.duration_s,
                warmup_s: plan.warmup_s,
                ca_pem,
            },
            443,
        ));
    }
    workloads.push((
        "crr",
        Workload::Crr {
            duration_s: plan.duration_s,
            warmup_s: plan.warmup_s,
        },
        80,
    ));
    let mut runs: Runs = Runs::new();
    let mut n = 0;
    'reps: for rep in 0..plan.reps {
        for (wid, w, port) in &workloads {
            for case in Case::ALL {
                if crate::orchestrate::interrupted() {
                    break 'reps;
                }
                n += 1;
                let r = run_case(paths, case, n, w, *port);
                if let Err(e) = &r.result {
                    eprintln!(
                        "[bench] first_payload {wid} rep {} {}: {e}",
                        rep + 1,
                        case.label()
                    );
                    notes.push(format!("{wid}, {}: {e}", case.label()));
                }
                runs.entry((wid, case)).or_default().push(r);
            }
        }
    }
    let empty: Vec<Run> = Vec::new();
    let get = |wid: &'static str, c: Case| runs.get(&(wid, c)).unwrap_or(&empty);
    let mut table = Table {
        columns: vec![
            "workload".into(),
            "case".into(),
            "connections/s".into(),
            "p50 µs".into(),
            "p99 µs".into(),
            "connections measured".into(),
            "failed".into(),
            "name checks passed".into(),
        ],
        rows: Vec::new(),
    };
    let mut goals = Vec::new();
    let mut series: Vec<BarSeries> = Case::ALL
        .iter()
        .map(|c| BarSeries {
            name: c.label().into(),
            values: Vec::new(),
        })
        .collect();
    let mut categories = Vec::new();
    for (wid, _, _) in &workloads {
        let title = match *wid {
            "tls" => "TLS handshake (443)",
            _ => "connect + GET + close (80)",
        };
        categories.push(format!("{title} p50"));
        for (i, case) in Case::ALL.into_iter().enumerate() {
            let rs = get(wid, case);
            let rate = values(rs, |c| {
                (c.elapsed_s > 0.0).then(|| c.transactions as f64 / c.elapsed_s)
            });
            let checks: Vec<String> = rs
                .iter()
                .map(|r| r.checks_passed.map_or("—".into(), |v| v.to_string()))
                .collect();
            let lat = values(rs, p50);
            table.rows.push(vec![
                title.into(),
                case.label().into(),
                spread(&rate, 0),
                spread(&lat, 1),
                spread(&values(rs, p99), 1),
                format!(
                    "{}",
                    values(rs, |c| Some(c.transactions as f64))
                        .iter()
                        .sum::<f64>()
                ),
                format!(
                    "{}",
                    values(rs, |c| Some(c.errors as f64)).iter().sum::<f64>()
                ),
                if case == Case::Direct {
                    "—".into()
                } else {
                    checks.join(", ")
                },
            ]);
            series[i].values.push(
                median(&lat)
                    .zip(min_max(&lat))
                    .map(|(m, (lo, hi))| BarValue::spread(m, lo, hi)),
            );
        }
        let added = paired_diffs(get(wid, Case::SnasCheck), get(wid, Case::SnasOff), p50);
        let added99 = paired_diffs(get(wid, Case::SnasCheck), get(wid, Case::SnasOff), p99);
        let vs_direct = paired_diffs(get(wid, Case::SnasOff), get(wid, Case::Direct), p50);
        let m = median(&added);
        goals.push(GoalCheck {
            goal: format!("{title}: the name check adds < {GOAL_ADDED_P50_US} µs at p50"),
            measured: format!(
                "check on − off: p50 {} µs, p99 {} µs (per repetition: median (min–max)); SNAS \
                 off − direct p50 {} µs",
                spread(&added, 1),
                spread(&added99, 1),
                spread(&vs_direct, 1)
            ),
            met: m.map(|m| m < GOAL_ADDED_P50_US),
        });
    }
    let raw = {
        let mut m = serde_json::Map::new();
        for ((wid, case), rs) in &runs {
            let reps: Vec<serde_json::Value> = rs
                .iter()
                .map(|r| match &r.result {
                    Ok(c) => json!({ "result": c, "name_checks_passed": r.checks_passed }),
                    Err(e) => json!({ "error": e }),
                })
                .collect();
            m.insert(
                format!("{wid}/{}", case.id()),
                serde_json::Value::Array(reps),
            );
        }
        serde_json::Value::Object(m)
    };
    ScenarioResult {
        id: "first_payload".into(),
        title: "First-payload hold: the name check's added latency".into(),
        method: format!(
            "One client, one connection per transaction, {} s after a {} s warm-up per case: a \
             full TLS handshake to api.example.com:443 (rustls, testbed CA; connect → \
             handshake done, then close_notify and close) and connect + `GET /` + read to EOF \
             on api.example.com:80. Cases alternate within each of {} repetitions: direct, \
             SNAS (netns) with the name check on (host rules, the default), SNAS with \
             `names = \"off\"` on the same rules. Added = check on − check off, paired per \
             repetition. Cells: median over repetitions (min–max).",
            plan.duration_s, plan.warmup_s, plan.reps
        ),
        charts: vec![BarChart {
            title: "Connection latency at p50".into(),
            y_label: "µs".into(),
            categories,
            series,
            reference_lines: Vec::new(),
            log_y: false,
        }],
        table,
        goals,
        notes,
        raw,
    }
}

/// The rustls client configuration trusting only `ca_pem`.
fn tls_config(t: &Target, ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |detail: String| ClientError::Protocol {
        target: t.label(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| bad(format!("the CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("the CA certificate: {e}")))?;
    }
    // ring, as the testbed's server (its deprecation is for lacking post-quantum key
    // exchange): the ClientHello is then one segment, the common case but not the largest.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One connection: connect, handshake to completion, close_notify, close.
fn handshake_once(
    t: &Target,
    addr: Option<SocketAddr>,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(), ClientError> {
    let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| {
        ClientError::Protocol {
            target: t.label(),
            detail: format!("server name: {e}"),
        }
    })?;
    let mut conn = rustls::ClientConnection::new(Arc::clone(config), name).map_err(|e| {
        ClientError::Protocol {
            target: t.label(),
            detail: format!("TLS: {e}"),
        }
    })?;
    let mut s = connect(t, addr)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut s)
            .map_err(io_err("TLS handshake with", t))?;
    }
    conn.send_close_notify();
    // The client's Finished (TLS 1.3) and the close_notify leave together.
    while conn.wants_write() {
        conn.write_tls(&mut s).map_err(io_err("writing to", t))?;
    }
    s.flush().map_err(io_err("writing to", t))?;
    Ok(())
}

/// [`Workload::TlsHandshake`]: handshakes back to back for `warmup` + `duration`; the latency
/// is connect + handshake.
pub fn tls_handshakes(
    t: &Target,
    duration: Duration,
    warmup: Duration,
    ca_pem: &str,
) -> Result<ClientResult, ClientError> {
    let config = tls_config(t, ca_pem)?;
    let addr = address_for(t)?;
    let mut lat = Vec::with_capacity(100_000);
    let (mut errors, mut last_error) = (0u64, String::new());
    let start = Instant::now();
    let mut window_start = None;
    loop {
        let t0 = Instant::now();
        if t0 - start >= warmup + duration {
            break;
        }
        let r = handshake_once(t, addr, &config);
        let t1 = Instant::now();
        let counted = t0 - start >= warmup;
        if counted {
            window_start.get_or_insert(t0);
        }
        match r {
            Ok(()) if counted => lat.push((t1 - t0).as_secs_f64() * 1e6),
            Ok(()) => {}
            Err(e) => {
                if counted {
                    errors += 1;
                }
                last_error = e.to_string();
            }
        }
    }
    if lat.is_empty() {
        return Err(ClientError::NothingMeasured {
            target: format!("{}:{}", t.host, t.port),
            errors,
            last: last_error,
        });
    }
    Ok(ClientResult {
        transactions: lat.len() as u64,
        errors,
        elapsed_s: window_start.map_or(0.0, |w| w.elapsed().as_secs_f64()),
        latency_us: Summary::of(&lat),
        resolved: addr.map(|a| a.to_string()).unwrap_or_default(),
        ..ClientResult::default()
    })
}
