//! Privileged end-to-end tests of `snas run` on a testbed of their own (unique prefix,
//! removed by a guard): the demo workload's checks inside gVisor, the audit trail of its
//! escape attempts, and limits reported by the command. They need root, runsc and a built
//! `snas` binary (`cargo build -p snas`; `SNAS_BIN` overrides `target/debug/snas`) whose proxy
//! works (`snas proxy --help`); otherwise they fail, saying which is missing.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn snas_bin() -> PathBuf {
    std::env::var_os("SNAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/snas"))
}

/// Fails the test unless root, runsc and a `snas` binary with a working proxy are there.
fn require_prerequisites() {
    common::require_privileges();
    let bin = snas_bin();
    let proxy = Command::new(&bin)
        .args(["proxy", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        proxy,
        "{} has no working `snas proxy`: `cargo build --release -p snas` and set SNAS_BIN",
        bin.display()
    );
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
    require_prerequisites();
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
    require_prerequisites();
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

    // A fork bomb under --pids: the sandbox cannot make host tasks and dies; `snas run`
    // says so and exits with its own status, not the sentry's 2.
    let (code, out, err) = bed.run(
        &token,
        &["--pids", "96", "--timeout", "60s", "--no-summary"],
        &["python3", "-c", "import os\nwhile True:\n    os.fork()"],
    );
    assert_eq!(code, 123, "stdout {out} stderr {err}");
    assert!(
        err.contains("pids limit (96) reached: a fork was refused and the sandbox failed"),
        "{err}"
    );

    // systrap is the default platform, and ptrace is there when asked for.
    let (code, _, err) = bed.run(&token, &[], &["true"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("on node 1, gVisor systrap: exited 0"), "{err}");
    let (code, out, err) = bed.run(
        &token,
        &["--platform", "ptrace"],
        &["python3", "-c", "print('on ptrace')"],
    );
    assert_eq!((code, out.trim()), (0, "on ptrace"), "{err}");
    assert!(err.contains("gVisor ptrace: exited 0"), "{err}");

    // A runsc without systrap is refused before the job exists, with the fix named.
    let old = bed.dir.join("old-runsc");
    std::fs::write(
        &old,
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'runsc version 0.0~20221219.0' && exit 0\nexit 99\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, _, err) = bed.run(&token, &["--runsc", old.to_str().unwrap()], &["true"]);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains("is runsc 20221219, which has no systrap platform"),
        "{err}"
    );
    assert!(
        err.contains("scripts/setup.sh") && err.contains("--platform ptrace"),
        "{err}"
    );
    let jobs = bed.snas(&["jobs", "--prefix", &bed.prefix]);
    assert!(
        !String::from_utf8_lossy(&jobs.stdout).contains("demo"),
        "a job was created: {}",
        String::from_utf8_lossy(&jobs.stdout)
    );

    // SIGTERM to `snas run` reaches the workload (it handles it and exits 7), and Ctrl-C from
    // the terminal (SIGINT to the whole process group, runsc included) too; the job and the
    // sandbox are still cleaned up. A workload that does not handle SIGTERM dies of it (143).
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
    let handler = "import signal, sys, time\n\
                   def h(n, _):\n    print('got', n, flush=True); sys.exit(7)\n\
                   signal.signal(signal.SIGTERM, h)\nsignal.signal(signal.SIGINT, h)\n\
                   time.sleep(60)";
    let mut terminated = Vec::new();
    for (cmd, signal, to_group, want_code, want_out) in [
        (
            vec!["python3", "-c", handler],
            libc::SIGTERM,
            false,
            7,
            "got 15",
        ),
        (
            vec!["python3", "-c", handler],
            libc::SIGINT,
            true,
            7,
            "got 2",
        ),
        (vec!["sleep", "60"], libc::SIGTERM, false, 143, ""),
    ] {
        let child = Command::new(snas_bin())
            .args([
                "run",
                "--prefix",
                &bed.prefix,
                "--no-summary",
                "--policy",
                &token,
            ])
            .arg("--")
            .args(&cmd)
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        for _ in 0..300 {
            if running() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(running(), "the sandbox never reached running");
        // The workload installs its handlers right after it starts.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let pid = child.id() as i32;
        let target = if to_group { -pid } else { pid };
        // SAFETY: kill has no memory-safety preconditions; the pid (group) is our live child.
        unsafe { libc::kill(target, signal) };
        terminated.push(child.id());
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            (out.status.code(), stdout.trim()),
            (Some(want_code), want_out),
            "{cmd:?} after signal {signal}"
        );
        let jobs = bed.snas(&["jobs", "--prefix", &bed.prefix]);
        assert!(
            !String::from_utf8_lossy(&jobs.stdout).contains("demo"),
            "job still listed: {}",
            String::from_utf8_lossy(&jobs.stdout)
        );
    }

    // Nothing of the runs is left: no sandbox state (only the root skeleton all runs share),
    // no cgroups.
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name() != snas_sandbox::bundle::HOST_USR_SKELETON)
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // Run ids start with the launcher's pid in hex: the terminated runs left no cgroup.
    let prefixes: Vec<String> = terminated.iter().map(|p| format!("snas-{p:x}-")).collect();
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(Result::ok)
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten())
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| name.starts_with(p))
        })
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "{cgroups:?}");
}
