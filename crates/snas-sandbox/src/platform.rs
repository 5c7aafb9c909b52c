//! gVisor platform choice and what the installed runsc can do.
//!
//! - **systrap** (the default) intercepts system calls with seccomp traps and a stub in each
//!   guest process: 6–30× cheaper system calls than ptrace, no virtualisation needed. It
//!   needs runsc ≥ [`SYSTRAP_MIN_RELEASE`] (Debian 12's own suite has 20221219, which answers
//!   `unknown platform: systrap`; `scripts/setup.sh` installs 20240729 from bookworm-backports).
//! - **ptrace** works with every runsc, everywhere: the explicit fallback.
//! - **kvm** only after [`probe_kvm`] proved it: `runsc --platform kvm --network none
//!   --ignore-cgroups do /bin/true` in a scratch directory, with a deadline. On nested "PVM"
//!   KVM devices (as on the development machines) the sentry spins at 100% CPU forever after
//!   `machine.go: TSC scaling support: false`; the probe then kills everything it started
//!   (found by its private `--root` in their command lines), removes its scratch directory and
//!   reports the hang, so a caller falls back instead of waiting forever.
//!
//! Owns the runsc release check ([`RunscInfo`]): `runsc --version` costs 4–15 ms here (a
//! 30 MB static binary), a noticeable part of a ~200 ms cold start, so the answer can be kept
//! in a memo file keyed by the binary's identity (device, inode, size, modification time): a
//! replaced or upgraded binary is asked again.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::process;

/// Default deadline of the KVM probe (a working KVM sandbox starts in well under a second).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first runsc release packaged with the systrap platform (Debian's bookworm-backports,
/// trixie and sid carry it); the release SNAS is measured and tested with.
pub const SYSTRAP_MIN_RELEASE: Release = Release(20240729);

/// The gVisor platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Platform {
    /// System-call interception with seccomp traps: the default; needs runsc ≥ 20240729.
    #[default]
    Systrap,
    /// System-call interception with ptrace: works with every runsc, slower system calls.
    Ptrace,
    /// Hardware virtualisation: needs a working `/dev/kvm`.
    Kvm,
}

impl Platform {
    /// The runsc `--platform` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Systrap => "systrap",
            Platform::Ptrace => "ptrace",
            Platform::Kvm => "kvm",
        }
    }

    /// The oldest runsc release that has this platform.
    pub fn min_release(self) -> Option<Release> {
        match self {
            Platform::Systrap => Some(SYSTRAP_MIN_RELEASE),
            Platform::Ptrace | Platform::Kvm => None,
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
            "systrap" => Ok(Platform::Systrap),
            "ptrace" => Ok(Platform::Ptrace),
            "kvm" => Ok(Platform::Kvm),
            _ => Err(format!("platform {s:?}: expected systrap, ptrace or kvm")),
        }
    }
}

/// A runsc release: its date as `YYYYMMDD` (gVisor names releases by date).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release(pub u32);

impl Release {
    /// The release named in `runsc --version` output: Debian prints `runsc version
    /// 0.0~20240729.0`, gVisor's own builds `runsc version release-20240729.0`. `None` when
    /// the first line carries no plausible date (a development build).
    pub fn parse_version_output(text: &str) -> Option<Release> {
        let line = text.lines().next()?.strip_prefix("runsc version ")?;
        let bytes = line.as_bytes();
        (0..bytes.len().saturating_sub(7)).find_map(|i| {
            let digits = bytes.get(i..i + 8)?;
            let before = i.checked_sub(1).and_then(|j| bytes.get(j));
            let after = bytes.get(i + 8);
            let bounded =
                !before.is_some_and(u8::is_ascii_digit) && !after.is_some_and(u8::is_ascii_digit);
            if !bounded || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
            let (y, m, d) = (n / 10_000, n / 100 % 100, n % 100);
            ((2018..=2100).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d))
                .then_some(Release(n))
        })
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why runsc cannot run the chosen platform.
#[derive(Debug, thiserror::Error)]
pub enum RunscError {
    /// No runsc binary at the path or on `PATH`.
    #[error("runsc not found ({runsc}): run scripts/setup.sh, which installs it")]
    NotFound { runsc: PathBuf },
    /// `runsc --version` could not be run.
    #[error("running `{runsc} --version`: {source}")]
    Version {
        runsc: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The installed release predates the platform.
    #[error(
        "{runsc} is runsc {release}, which has no {platform} platform (it needs runsc >= {min}): \
         run scripts/setup.sh, which installs runsc {min} from Debian's bookworm-backports, or use \
         the ptrace platform (`snas run --platform ptrace`), 6-30x slower per system call"
    )]
    TooOld {
        runsc: PathBuf,
        release: Release,
        platform: Platform,
        min: Release,
    },
}

/// The runsc binary that will run, and its release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunscInfo {
    /// The binary (resolved on `PATH` when given as a bare name).
    pub path: PathBuf,
    /// Its release; `None` when `--version` names none (a development build: not judged).
    pub release: Option<Release>,
}

impl RunscInfo {
    /// Finds `runsc` (a path, or a name looked up on `PATH`) and its release. With `memo`, the
    /// answer is read from / written to that file, keyed by the binary's identity; a memo that
    /// cannot be written is not an error (the next run asks runsc again).
    pub fn probe(runsc: &Path, memo: Option<&Path>) -> Result<RunscInfo, RunscError> {
        let path = resolve(runsc).ok_or_else(|| RunscError::NotFound {
            runsc: runsc.to_path_buf(),
        })?;
        let meta = std::fs::metadata(&path).map_err(|_| RunscError::NotFound {
            runsc: path.clone(),
        })?;
        let key = format!(
            "{} {} {} {} {}",
            path.display(),
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime_nsec() + meta.mtime() * 1_000_000_000
        );
        if let Some(m) = memo {
            if let Ok(text) = std::fs::read_to_string(m) {
                if let Some(release) = text
                    .lines()
                    .next()
                    .filter(|l| *l == key)
                    .and_then(|_| text.lines().nth(1))
                {
                    return Ok(RunscInfo {
                        path,
                        release: release.trim().parse().ok().map(Release),
                    });
                }
            }
        }
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|source| RunscError::Version {
                runsc: path.clone(),
                source,
            })?;
        let release = Release::parse_version_output(&String::from_utf8_lossy(&out.stdout));
        if let Some(m) = memo {
            let text = format!("{key}\n{}\n", release.map(|r| r.0).unwrap_or(0));
            let tmp = m.with_extension("tmp");
            let _ = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, m));
        }
        Ok(RunscInfo { path, release })
    }

    /// Whether this runsc has `platform`; an unknown release is given the benefit of the doubt
    /// (runsc itself then says what it cannot do).
    pub fn check(&self, platform: Platform) -> Result<(), RunscError> {
        match (platform.min_release(), self.release) {
            (Some(min), Some(release)) if release < min => Err(RunscError::TooOld {
                runsc: self.path.clone(),
                release,
                platform,
                min,
            }),
            _ => Ok(()),
        }
    }
}

/// `runsc` as a path, or looked up on `PATH` when it is a bare name.
fn resolve(runsc: &Path) -> Option<PathBuf> {
    if runsc.components().count() > 1 || runsc.is_absolute() {
        return runsc.is_file().then(|| runsc.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(runsc))
        .find(|p| p.is_file())
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
    fn platform_names_round_trip_and_systrap_is_default() {
        assert_eq!(Platform::default(), Platform::Systrap);
        for p in [Platform::Systrap, Platform::Ptrace, Platform::Kvm] {
            assert_eq!(p.as_str().parse::<Platform>().unwrap(), p);
        }
        assert!("host".parse::<Platform>().is_err());
    }

    #[test]
    fn releases_are_read_from_debian_and_upstream_version_lines() {
        let debian = "runsc version 0.0~20240729.0\nspec: 1.0.2-dev\n";
        assert_eq!(
            Release::parse_version_output(debian),
            Some(Release(20240729))
        );
        let old = "runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n";
        assert_eq!(Release::parse_version_output(old), Some(Release(20221219)));
        let upstream = "runsc version release-20251110.0\nspec: 1.1.0\n";
        assert_eq!(
            Release::parse_version_output(upstream),
            Some(Release(20251110))
        );
        for unknown in [
            "runsc version VERSION_MISSING\n",
            "runsc version 123456789\n",
            "runsc version 0.0~20241399.0\n",
            "something else 20240729\n",
            "",
        ] {
            assert_eq!(Release::parse_version_output(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn an_old_runsc_is_refused_for_systrap_with_the_fix_named() {
        let old = RunscInfo {
            path: "/usr/bin/runsc".into(),
            release: Some(Release(20221219)),
        };
        let e = old.check(Platform::Systrap).unwrap_err().to_string();
        for part in [
            "/usr/bin/runsc is runsc 20221219",
            "no systrap platform",
            ">= 20240729",
            "scripts/setup.sh",
            "--platform ptrace",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e}");
        }
        assert!(old.check(Platform::Ptrace).is_ok());
        assert!(old.check(Platform::Kvm).is_ok());
        let new = RunscInfo {
            release: Some(Release(20240729)),
            ..old.clone()
        };
        assert!(new.check(Platform::Systrap).is_ok());
        let dev = RunscInfo {
            release: None,
            ..old
        };
        assert!(dev.check(Platform::Systrap).is_ok());
    }

    #[test]
    fn the_release_memo_is_keyed_by_the_binary_and_follows_a_replacement() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("snas-runsc-memo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("runsc");
        let memo = dir.join("memo");
        let install = |release: &str| {
            let tmp = dir.join("runsc.new");
            let script = format!("#!/bin/sh\necho 'runsc version 0.0~{release}.0'\n");
            std::fs::write(&tmp, script).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            // A new inode, as a package upgrade makes.
            std::fs::rename(&tmp, &fake).unwrap();
        };
        install("20221219");
        let a = RunscInfo::probe(&fake, Some(&memo)).unwrap();
        assert_eq!(a.release, Some(Release(20221219)));
        // The memo answers while the binary is the same: doctor its answer and ask again.
        let text = std::fs::read_to_string(&memo).unwrap();
        let key = text.lines().next().unwrap();
        std::fs::write(&memo, format!("{key}\n20200101\n")).unwrap();
        let b = RunscInfo::probe(&fake, Some(&memo)).unwrap();
        assert_eq!(b.release, Some(Release(20200101)));
        // A replaced binary is asked again.
        install("20240729");
        let c = RunscInfo::probe(&fake, Some(&memo)).unwrap();
        assert_eq!(c.release, Some(Release(20240729)));
        assert!(matches!(
            RunscInfo::probe(&dir.join("absent"), None),
            Err(RunscError::NotFound { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
