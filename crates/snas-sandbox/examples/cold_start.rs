//! Cold start of `python3 -c pass` in gVisor: plain runsc vs the launcher vs `snas run`.
//!
//! Run as root: `cargo build --release -p snas && cargo run -p snas-sandbox --release
//! --example cold_start [-- RUNS [PLATFORM]]` (default 10 runs per case on systrap; `SNAS_BIN`
//! overrides the `snas` binary, default `target/release/snas`). All three cases use the same
//! platform and runsc flags (`launch::runsc_flags`). Prints medians (min–max) in ms:
//!
//! - **plain runsc**: `runsc run` of a fixed bundle (same shape as the launcher's, cgroup
//!   limits made by runsc) in a pre-made namespace; the address runsc takes is put back
//!   outside the timed part. runsc still needs the root-namespace workaround on this
//!   kernel, so it runs in the same private mount namespace as the launcher's.
//! - **launcher**: `snas_sandbox::run` in the same namespace (bundle, cgroup, address check,
//!   runsc, cleanup); the address is put back before the timed part, as for plain runsc.
//! - **snas run**: the whole command against a testbed of its own (prefix `snsbcs`, brought
//!   up first and removed at the end), split with `--timings` into job-network set-up (agent
//!   `POST /v1/jobs`), sandbox (launcher prepare + runsc) and teardown (from runsc's exit:
//!   sandbox cleanup in parallel with the job's counters and `DELETE`, then the audit logs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snas_sandbox::bundle::{write_bundle, BundleSpec};
use snas_sandbox::launch::{self, RunOptions, Stdio3};
use snas_sandbox::netcfg::NetConfig;
use snas_sandbox::platform::Platform;
use snas_sandbox::process;

const PREFIX: &str = "snsbcs";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {}", args.join(" "));
}

struct Lab {
    sb: String,
    peer: String,
}

impl Lab {
    fn new() -> Lab {
        let tag = std::process::id() & 0xffff;
        let lab = Lab {
            sb: format!("snsbcs{tag:x}s"),
            peer: format!("snsbcs{tag:x}p"),
        };
        ip(&["netns", "add", &lab.sb]);
        ip(&["netns", "add", &lab.peer]);
        ip(&[
            "-n", &lab.peer, "link", "add", "gw0", "type", "veth", "peer", "name", "eth0", "netns",
            &lab.sb,
        ]);
        ip(&["-n", &lab.peer, "addr", "add", "192.0.2.1/30", "dev", "gw0"]);
        ip(&["-n", &lab.peer, "link", "set", "gw0", "up"]);
        lab
    }
    fn net(&self) -> NetConfig {
        NetConfig {
            netns: PathBuf::from("/run/netns").join(&self.sb),
            iface: "eth0".into(),
            addr: "192.0.2.2".parse().unwrap(),
            prefix_len: 30,
            gateway: "192.0.2.1".parse().unwrap(),
            ipv6: None,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.sb]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

fn stats(v: &mut [f64]) -> String {
    let med = median(v);
    format!(
        "{med:7.1} ({:.1}–{:.1})",
        v[0],
        v[v.len().saturating_sub(1)]
    )
}

fn args() -> Vec<String> {
    ["/usr/bin/python3", "-c", "pass"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn plain_runsc(lab: &Lab, runs: usize, scratch: &Path, tag: usize, platform: Platform) -> Vec<f64> {
    let bundle = scratch.join("plain-bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle).unwrap();
    let mut spec = BundleSpec::new(args(), lab.net().netns, "/snsbcs-plain".into());
    spec.nameservers = vec!["192.0.2.1".parse().unwrap()];
    write_bundle(&spec, &bundle).unwrap();
    let mut out = Vec::new();
    for i in 0..runs {
        lab.net().ensure().unwrap();
        let root = scratch.join(format!("plain-root-{tag}-{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let mut cmd = Command::new("runsc");
        cmd.args(launch::runsc_flags(&root, platform, &[]))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("snsbcs-plain-{tag}-{i}"))
            .stdin(Stdio::null());
        process::hide_root_ns_marker(&mut cmd);
        let t = Instant::now();
        let st = cmd.status().unwrap();
        out.push(ms(t.elapsed()));
        assert!(st.success(), "plain runsc failed");
        let _ = std::fs::remove_dir_all(&root);
    }
    out
}

fn launcher(lab: &Lab, runs: usize, scratch: &Path, platform: Platform) -> Vec<[f64; 4]> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let mut spec = BundleSpec::new(args(), lab.net().netns, String::new());
        spec.nameservers = vec!["192.0.2.1".parse().unwrap()];
        let mut o = RunOptions::new(spec);
        o.state_dir = scratch.join("launcher");
        o.platform = platform;
        // As `snas run` does: the runsc release is checked once per binary, not per run.
        o.runsc_memo = Some(scratch.join("runsc-release"));
        o.net = Some(lab.net());
        // Put back the address the previous run's runsc took, outside the timed part (as for
        // plain runsc): a job namespace fresh from the agent has it already.
        lab.net().ensure().unwrap();
        let t = Instant::now();
        let r = launch::run(&o, Stdio3::default(), &mut |_| {}).unwrap();
        let total = ms(t.elapsed());
        assert_eq!(r.termination.exit_code(), 0);
        out.push([
            total,
            ms(r.timings.prepare),
            ms(r.timings.run),
            ms(r.timings.cleanup),
        ]);
    }
    out
}

fn snas(bin: &Path, a: &[&str]) -> std::process::Output {
    Command::new(bin).args(a).output().unwrap()
}

/// Parses `snas: timings: job-network X ms, sandbox Y ms (...), teardown Z ms`.
fn parse_timings(stderr: &str) -> Option<[f64; 5]> {
    let line = stderr.lines().find(|l| l.starts_with("snas: timings:"))?;
    let num = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    Some([
        num("job-network")?,
        num("sandbox")?,
        num("teardown")?,
        num("runsc")?,
        num("counters + delete")?,
    ])
}

fn snas_run(bin: &Path, runs: usize, scratch: &Path, platform: Platform) -> Vec<[f64; 6]> {
    let up = snas(bin, &["testbed", "up", "--prefix", PREFIX]);
    assert!(
        up.status.success(),
        "testbed up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let policy = scratch.join("job.toml");
    std::fs::write(
        &policy,
        "tenant = \"bench\"\njob = \"cold-start\"\nttl = \"1h\"\n[[egress]]\nhost = \"api.example.com:80\"\n",
    )
    .unwrap();
    let key = format!("/run/snas-testbed/{PREFIX}/keys/testbed-{PREFIX}.key");
    let signed = snas(
        bin,
        &["policy", "sign", "--key", &key, policy.to_str().unwrap()],
    );
    assert!(signed.status.success());
    let token = String::from_utf8(signed.stdout).unwrap();
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let o = Command::new(bin)
            .args([
                "run",
                "--prefix",
                PREFIX,
                "--timings",
                "--no-summary",
                "--platform",
                platform.as_str(),
                "--policy",
            ])
            .arg(token.trim())
            .arg("--")
            .args(args())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let total = ms(t.elapsed());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "snas run failed: {stderr}");
        let [net, sb, down, runsc, delete] = parse_timings(&stderr).expect("timings line");
        // What SNAS adds in this very run: everything but runsc's own run.
        out.push([total, net, sb, down, total - runsc, delete]);
    }
    out
}

fn column<const N: usize>(v: &[[f64; N]], i: usize) -> Vec<f64> {
    v.iter().map(|r| r[i]).collect()
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let platform: Platform = std::env::args()
        .nth(2)
        .map(|p| p.parse().expect("platform: systrap, ptrace or kvm"))
        .unwrap_or_default();
    let bin =
        PathBuf::from(std::env::var("SNAS_BIN").unwrap_or_else(|_| "target/release/snas".into()));
    let scratch = PathBuf::from(format!("/run/snsbcs-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let lab = Lab::new();
    let snas_ok = bin.exists() && {
        let up = snas(&bin, &["testbed", "up", "--prefix", PREFIX]);
        assert!(
            up.status.success(),
            "testbed up: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        true
    };
    if !snas_ok {
        eprintln!("{} not found: skipping `snas run`", bin.display());
    }
    // One warm-up each so that page-cache effects do not land on the first case; then the
    // cases take turns so that background load hits them alike.
    let _ = plain_runsc(&lab, 1, &scratch, 0, platform);
    let (mut plain, mut l, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        plain.extend(plain_runsc(&lab, 1, &scratch, i + 1, platform));
        l.extend(launcher(&lab, 1, &scratch, platform));
        if snas_ok {
            s.extend(snas_run(&bin, 1, &scratch, platform));
        }
    }
    drop(lab);
    if snas_ok {
        let _ = snas(&bin, &["testbed", "down", "--prefix", PREFIX]);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let s = snas_ok.then_some(s);

    println!("cold start of `python3 -c pass`, {platform}, median (min–max) of {runs} runs, ms");
    println!("| case | total | phases |");
    println!("|---|---|---|");
    println!(
        "| plain `runsc run` (pre-made netns) | {} | |",
        stats(&mut plain)
    );
    println!(
        "| launcher (`snas_sandbox::run`) | {} | prepare {}, runsc {}, cleanup {} |",
        stats(&mut column(&l, 0)),
        stats(&mut column(&l, 1)),
        stats(&mut column(&l, 2)),
        stats(&mut column(&l, 3))
    );
    if let Some(s) = s {
        println!(
            "| `snas run` (whole command) | {} | job network {}, sandbox {}, teardown {} (of which agent counters + `DELETE` {}) |",
            stats(&mut column(&s, 0)),
            stats(&mut column(&s, 1)),
            stats(&mut column(&s, 2)),
            stats(&mut column(&s, 3)),
            stats(&mut column(&s, 5))
        );
        let mut added = column(&s, 4);
        let plain_med = median(&mut plain.clone());
        let added_med = median(&mut added);
        println!(
            "| SNAS's share of each `snas run` (total − its runsc phase) | {} | {:.1}% of plain runsc's median |",
            stats(&mut added),
            100.0 * added_med / plain_med
        );
    }
}
