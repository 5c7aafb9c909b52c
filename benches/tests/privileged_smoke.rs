//! Privileged smoke test of the benchmark program (root; needs the `snas` binary: `$SNAS_BIN`
//! or target/release/snas, and squid): a `--quick` run of every scenario on every path must
//! finish, measure every path, and write its JSON, charts and summary. It checks that the
//! benchmark works end to end, never how fast anything is.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use snas_bench::results::RunReport;

fn snas_binary() -> PathBuf {
    std::env::var_os("SNAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/snas"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn quick_run_measures_every_path_and_writes_every_file() {
    assert!(
        is_root(),
        "privileged test: the benchmark needs root (testbed namespaces); run it as root, or run \
         the unprivileged tests only: cargo nextest run --profile unprivileged"
    );
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_snas-bench"))
        .args(["run", "--quick", "--out"])
        .arg(out.path())
        .arg("--snas-bin")
        .arg(snas_binary())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "snas-bench run --quick failed: {}\nstdout:\n{}\nstderr:\n{stderr}",
        run.status,
        String::from_utf8_lossy(&run.stdout)
    );
    // The run names its testbed on stderr: `[bench] testbed snasbnXXXX …`.
    let prefix = stderr
        .lines()
        .find_map(|l| l.strip_prefix("[bench] testbed "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the run names its testbed")
        .to_owned();

    let report: RunReport =
        serde_json::from_slice(&std::fs::read(out.path().join("run.json")).unwrap()).unwrap();
    let ids: Vec<&str> = report.scenarios.iter().map(|s| s.id.as_str()).collect();
    for id in [
        "tcp_rr",
        "tcp_crr",
        "first_payload",
        "bulk",
        "ipv6",
        "proxy_pps",
        "edt_accuracy",
        "fairness",
        "noisy_neighbour",
        "noisy_udp",
        "workload",
        "first_connection",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert_eq!(ids.len(), 16, "{ids:?}");
    for s in &report.scenarios {
        assert!(
            out.path().join(format!("{}.json", s.id)).is_file(),
            "{}",
            s.id
        );
        assert!(
            out.path().join(format!("{}.png", s.id)).is_file(),
            "{}",
            s.id
        );
        assert!(!s.table.rows.is_empty(), "{} has an empty table", s.id);
    }
    // Every path produced a latency figure: no path silently failed.
    let rr = report.scenarios.iter().find(|s| s.id == "tcp_rr").unwrap();
    for path in [
        "direct",
        "nftables",
        "squid",
        "snas",
        "gvisor-direct",
        "gvisor",
    ] {
        let reps = rr.raw[path].as_array().unwrap();
        assert!(
            reps.iter()
                .all(|r| r.get("error").is_none() && r["transactions"].as_u64().unwrap() > 0),
            "{path}: {reps:?}"
        );
    }
    // Every bulk transfer on every path worked (squid's CONNECT to an allowed name, the
    // nftables allowlist, SNAS's policy): no repetition recorded an error.
    let bulk = report.scenarios.iter().find(|s| s.id == "bulk").unwrap();
    for (variant, per_path) in bulk.raw.as_object().unwrap() {
        let Some(per_path) = per_path.as_object() else {
            continue;
        };
        for (path, reps) in per_path {
            for r in reps.as_array().unwrap() {
                assert!(r.get("error").is_none(), "bulk {variant} {path}: {r}");
            }
        }
    }
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(summary.contains("TCP request/response latency"));
    // Nothing of the run is left behind (other runs may exist beside it).
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !std::path::Path::new("/run/snas-bench")
            .join(&prefix)
            .exists(),
        "scratch directory left behind"
    );
}

fn netns_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("snasbn"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
