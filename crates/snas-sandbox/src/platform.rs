//! gVisor platform choice: `ptrace` always works; `kvm` only after a probe proved it.
//!
//! Owns the KVM probe: `runsc --platform kvm --network none --ignore-cgroups do /bin/true`
//! in a scratch directory, with a deadline. On nested "PVM" KVM devices (as on the
//! development machines) the sentry spins at 100% CPU forever after
//! `machine.go: TSC scaling support: false`; the probe then kills everything it started
//! (found by its private `--root` in their command lines), removes its scratch directory and
//! reports the hang, so a caller falls back to ptrace instead of waiting forever.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::process;

/// Default deadline of the KVM probe (a working KVM sandbox starts in well under a second).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The gVisor platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Platform {
    /// System-call interception with ptrace: works everywhere, slower system calls.
    #[default]
    Ptrace,
    /// Hardware virtualisation: needs a working `/dev/kvm`.
    Kvm,
}

impl Platform {
    /// The runsc `--platform` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ptrace => "ptrace",
            Platform::Kvm => "kvm",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        match s {
            "ptrace" => Ok(Platform::Ptrace),
            "kvm" => Ok(Platform::Kvm),
            _ => Err(format!("platform {s:?}: expected ptrace or kvm")),
        }
    }
}

/// Why KVM is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KvmProbeError {
    /// No `/dev/kvm`.
    #[error("/dev/kvm does not exist")]
    NoDevice,
    /// The probe sandbox did not finish in time (the known nested-PVM hang).
    #[error(
        "a KVM test sandbox did not finish within {0:?} (the sentry hangs on this host's KVM)"
    )]
    Hang(Duration),
    /// The probe sandbox failed.
    #[error("a KVM test sandbox failed: {0}")]
    Failed(String),
    /// The probe could not be started.
    #[error("starting the KVM probe ({runsc}): {source}")]
    Spawn {
        runsc: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a tiny sandbox on KVM in `scratch` (created and removed here) and reports whether it
/// finished successfully within `timeout`.
pub fn probe_kvm(runsc: &Path, scratch: &Path, timeout: Duration) -> Result<(), KvmProbeError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmProbeError::NoDevice);
    }
    let root = scratch.join("root");
    let _ = std::fs::create_dir_all(&root);
    let root_arg = root.display().to_string();
    let mut cmd = Command::new(runsc);
    cmd.arg("--root")
        .arg(&root)
        .args([
            "--platform",
            "kvm",
            "--network",
            "none",
            "--ignore-cgroups",
            "do",
            "/bin/true",
        ])
        .env("TMPDIR", scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let result = match cmd.spawn() {
        Err(source) => Err(KvmProbeError::Spawn {
            runsc: runsc.to_path_buf(),
            source,
        }),
        Ok(child) => {
            let pid = child.id() as i32;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait_with_output());
            });
            match rx.recv_timeout(timeout) {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(KvmProbeError::Failed(
                    String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                )),
                Ok(Err(e)) => Err(KvmProbeError::Failed(e.to_string())),
                Err(_) => {
                    process::kill(pid, libc::SIGKILL);
                    Err(KvmProbeError::Hang(timeout))
                }
            }
        }
    };
    // Whatever happened, nothing of the probe may stay behind.
    for pid in process::pids_with_arg(&root_arg) {
        process::kill(pid, libc::SIGKILL);
    }
    for _ in 0..100 {
        let left = process::pids_with_arg(&root_arg);
        if left.is_empty() {
            break;
        }
        for pid in left {
            process::try_reap(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_names_round_trip_and_ptrace_is_default() {
        assert_eq!(Platform::default(), Platform::Ptrace);
        for p in [Platform::Ptrace, Platform::Kvm] {
            assert_eq!(p.as_str().parse::<Platform>().unwrap(), p);
        }
        assert!("systrap".parse::<Platform>().is_err());
    }
}
