//! Privileged end-to-end tests of `snas run` on a testbed of their own (unique prefix,
//! removed by a guard): the demo workload's checks inside gVisor, the audit trail of its
//! escape attempts, and limits reported by the command. They need root, runsc and a built
//! `snas` binary (`cargo build -p snas`; `SNAS_BIN` overrides `target/debug/snas`), and the
//! proxy (`snas proxy --help` must work); otherwise they print SKIP.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn snas_bin() -> PathBuf {
    std::env::var_os("SNAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/snas"))
}

fn available() -> bool {
    if !common::privileged() {
        return false;
    }
    let bin = snas_bin();
    let proxy = Command::new(&bin)
        .args(["proxy", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !proxy {
        eprintln!("SKIP: {} has no working `snas proxy`", bin.display());
    }
    proxy
}

/// A testbed of our own; `snas testbed down` on drop.
struct Bed {
    prefix: String,
    dir: PathBuf,
}

impl Bed {
    fn up() -> Bed {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let prefix = format!(
            "snsb{:04x}",
            (t.subsec_nanos() ^ std::process::id()) & 0xffff
        );
        let bed = Bed {
            dir: PathBuf::from(format!("/run/{prefix}-test")),
            prefix,
        };
        std::fs::create_dir_all(&bed.dir).unwrap();
        let o = bed.snas(&["testbed", "up", "--prefix", &bed.prefix]);
        assert!(
            o.status.success(),
            "testbed up: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        bed
    }

    fn snas(&self, args: &[&str]) -> Output {
        Command::new(snas_bin()).args(args).output().unwrap()
    }

    fn sign(&self, policy: &str) -> String {
        let f = self.dir.join("job.toml");
        std::fs::write(&f, policy).unwrap();
        let key = format!(
            "/run/snas-testbed/{p}/keys/testbed-{p}.key",
            p = self.prefix
        );
        let o = self.snas(&["policy", "sign", "--key", &key, f.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    }

    /// `snas run` with `extra` options and `cmd`; returns (exit code, stdout, stderr).
    fn run(&self, token: &str, extra: &[&str], cmd: &[&str]) -> (i32, String, String) {
        let mut args = vec!["run", "--prefix", &self.prefix, "--policy", token];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(cmd);
        let o = self.snas(&args);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.snas(&["testbed", "down", "--prefix", &self.prefix]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const DEMO_POLICY: &str = r#"tenant = "acme"
job = "demo"
ttl = "1h"
[[egress]]
host = "api.example.com:80"
[[egress]]
host = "api.example.com:7"
protocol = "udp"
"#;

fn assert_check(stdout: &str, name: &str) {
    let line = stdout
        .lines()
        .find(|l| l.contains(&format!(" {name}:")))
        .unwrap_or_else(|| panic!("no line for {name:?} in:\n{stdout}"));
    assert!(
        line.starts_with("PASS"),
        "{line}\n--- all output:\n{stdout}"
    );
}

#[test]
fn demo_workload_in_gvisor_sees_exactly_its_policy_and_escapes_are_audited() {
    if !available() {
        return;
    }
    let bed = Bed::up();
    let token = bed.sign(DEMO_POLICY);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let examples = examples.to_str().unwrap();
    let (code, out, err) = bed.run(
        &token,
        &["--app", examples, "--timeout", "120s"],
        &["python3", "/app/sandbox_demo.py"],
    );
    // Each behaviour separately, so a failure names the one that broke.
    for check in [
        "resolve allowed name",
        "http to allowed name",
        "udp echo to allowed name",
        "name outside the policy",
        "blocked name",
        "blocked address fails fast",
        "raw socket",
        "forged GENEVE to a proxy",
        "DNS to 8.8.8.8 is captured",
        "DNS tunnelling",
    ] {
        assert_check(&out, check);
    }
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.contains("uid 65534"), "{out}");
    // The summary shows the attempts: refused names and the denied address.
    assert!(err.contains("DNS nothere.example.org"), "{err}");
    assert!(err.contains("dns_refused"), "{err}");
    assert!(err.contains("203.0.113.20"), "{err}");
    assert!(err.contains("other names"), "tunnelled names folded: {err}");
    // The forged GENEVE packet was dropped by tier 1 as aimed at the overlay.
    assert!(err.contains("overlay_target"), "{err}");
}

#[test]
fn snas_run_passes_status_and_reports_limits() {
    if !available() {
        return;
    }
    let bed = Bed::up();
    let token = bed.sign(DEMO_POLICY);
    let (code, out, _) = bed.run(
        &token,
        &["--no-summary"],
        &[
            "python3",
            "-c",
            "import sys; print('streamed'); sys.exit(7)",
        ],
    );
    assert_eq!((code, out.trim()), (7, "streamed"));

    let (code, _, err) = bed.run(
        &token,
        &["--memory", "128M", "--no-summary"],
        &[
            "python3",
            "-c",
            "b = bytearray(1 << 30); b[::4096] = b'x' * len(b[::4096])",
        ],
    );
    assert_eq!(code, 137, "{err}");
    assert!(
        err.contains("killed: memory limit (128M) exceeded"),
        "{err}"
    );

    let (code, _, err) = bed.run(
        &token,
        &["--timeout", "2s", "--no-summary"],
        &["sleep", "30"],
    );
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("timed out after 2s"), "{err}");

    // SIGTERM to `snas run` stops the workload, and the job and sandbox are still cleaned up.
    let mut child = Command::new(snas_bin())
        .args([
            "run",
            "--prefix",
            &bed.prefix,
            "--no-summary",
            "--policy",
            &token,
        ])
        .args(["--", "sleep", "60"])
        .spawn()
        .unwrap();
    let runs = PathBuf::from(format!("/run/snas-testbed/{}/run/sandbox", bed.prefix));
    let running = || {
        std::fs::read_dir(&runs)
            .map(|rd| {
                rd.filter_map(Result::ok).any(|e| {
                    std::fs::read_dir(e.path().join("root")).is_ok_and(|r| {
                        r.filter_map(Result::ok).any(|f| {
                            std::fs::read_to_string(f.path())
                                .is_ok_and(|t| t.contains("\"status\":\"running\""))
                        })
                    })
                })
            })
            .unwrap_or(false)
    };
    for _ in 0..300 {
        if running() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(running(), "the sandbox never reached running");
    // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let term_pid = child.id();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143), "sleep killed by SIGTERM: {st:?}");
    let jobs = bed.snas(&["jobs", "--prefix", &bed.prefix]);
    assert!(
        !String::from_utf8_lossy(&jobs.stdout).contains("demo"),
        "job still listed: {}",
        String::from_utf8_lossy(&jobs.stdout)
    );

    // Nothing of the runs is left: no sandbox state, no cgroups.
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // Run ids start with the launcher's pid in hex: the terminated run left no cgroup.
    let terminated = format!("snas-{:x}-", term_pid);
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(Result::ok)
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten())
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&terminated))
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "{cgroups:?}");
}
