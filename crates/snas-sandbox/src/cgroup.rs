//! The sandbox's cgroup: created and limited by the launcher, joined by runsc, read and
//! removed by the launcher.
//!
//! Owns one cgroup per run, named `snas-<run id>` directly under the hierarchy root, on
//! cgroup v1 (`memory`, `pids`, `cpu` controllers; the others runsc creates itself) or on v2
//! (when `/sys/fs/cgroup/cgroup.controllers` lists `memory` and `pids`).
//!
//! Why the launcher creates the cgroup instead of letting runsc do it: runsc removes the
//! cgroups it created when it exits, so the OOM-kill and pids-limit counters would be gone
//! before anyone could say why the workload died; and runsc leaves them behind when it is
//! killed. runsc joins a pre-existing cgroup without changing its limits, so the limits are
//! written here (the same values are also in `config.json` for gVisor's own view, e.g. the
//! guest's `MemTotal`).
//!
//! # Invariants
//! - [`Cgroup::remove`] kills any task still inside (only sandbox tasks can be there) and
//!   removes every `snas-<id>` directory of every mounted hierarchy, including the ones runsc
//!   made; it is idempotent and is called by the launcher's guard on every path.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::limits::{Limits, CPU_PERIOD};

/// Root of the cgroup file systems.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors creating or limiting the cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a v2 hierarchy with memory+pids nor v1 memory/pids hierarchies are mounted.
    #[error("no usable cgroup hierarchy under {CGROUP_ROOT} (need v2 with memory and pids, or v1 memory, pids and cpu)")]
    Unsupported,
    /// Writing a cgroup file failed.
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup version the host uses for the controllers we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Separate hierarchies per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl CgroupVersion {
    /// Detects the version under `root` (normally [`CGROUP_ROOT`]).
    pub fn detect(root: &Path) -> Result<CgroupVersion, CgroupError> {
        if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let has = |n: &str| c.split_whitespace().any(|w| w == n);
            if has("memory") && has("pids") {
                return Ok(CgroupVersion::V2);
            }
        }
        if ["memory", "pids", "cpu"]
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists())
        {
            return Ok(CgroupVersion::V1);
        }
        Err(CgroupError::Unsupported)
    }
}

/// What the cgroup saw while the sandbox ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupEvents {
    /// Tasks killed by the memory controller.
    pub oom_kills: u64,
    /// Forks refused because `pids.max` was reached.
    pub pids_max_hits: u64,
    /// Times the memory usage hit the limit (v1 `failcnt`, v2 `max` events).
    pub memory_limit_hits: u64,
}

/// One run's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    version: CgroupVersion,
    root: PathBuf,
    name: String,
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    std::fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
}

fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Cgroup {
    /// Creates `snas-<id>` with `limits` under `root`.
    pub fn create(root: &Path, id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let version = CgroupVersion::detect(root)?;
        let cg = Cgroup {
            version,
            root: root.to_path_buf(),
            name: format!("snas-{id}"),
        };
        // From here on a failure still removes what was made (Drop is not used on purpose:
        // the launcher's guard decides when; here we clean up ourselves).
        let r = cg.create_inner(limits);
        if r.is_err() {
            cg.remove();
        }
        r.map(|()| cg)
    }

    fn create_inner(&self, limits: &Limits) -> Result<(), CgroupError> {
        let quota = limits.cpus.quota().as_micros();
        let period = CPU_PERIOD.as_micros();
        let mkdir = |p: PathBuf| {
            std::fs::create_dir(&p).map_err(|source| CgroupError::Io { path: p, source })
        };
        match self.version {
            CgroupVersion::V1 => {
                for c in ["memory", "pids", "cpu"] {
                    mkdir(self.root.join(c).join(&self.name))?;
                }
                let m = self.root.join("memory").join(&self.name);
                write(
                    m.join("memory.limit_in_bytes"),
                    &limits.memory.0.to_string(),
                )?;
                // Without swap accounting this file is absent; then the limit above is all.
                let _ = std::fs::write(
                    m.join("memory.memsw.limit_in_bytes"),
                    limits.memory.0.to_string(),
                );
                let p = self.root.join("pids").join(&self.name);
                write(p.join("pids.max"), &limits.pids.to_string())?;
                let c = self.root.join("cpu").join(&self.name);
                write(c.join("cpu.cfs_period_us"), &period.to_string())?;
                write(c.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            CgroupVersion::V2 => {
                // Enable the controllers for children of the root (already enabled on
                // systemd hosts; an error here shows up as a missing file below).
                let _ = std::fs::write(
                    self.root.join("cgroup.subtree_control"),
                    "+memory +pids +cpu",
                );
                let d = self.root.join(&self.name);
                mkdir(d.clone())?;
                write(d.join("memory.max"), &limits.memory.0.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                write(d.join("pids.max"), &limits.pids.to_string())?;
                write(d.join("cpu.max"), &format!("{quota} {period}"))?;
            }
        }
        Ok(())
    }

    /// The path handed to runsc as `cgroupsPath`.
    pub fn oci_path(&self) -> String {
        format!("/{}", self.name)
    }

    /// Detected version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Directories named after this run in every hierarchy (existing or not).
    fn dirs(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V2 => vec![self.root.join(&self.name)],
            CgroupVersion::V1 => {
                let mut v: Vec<PathBuf> = std::fs::read_dir(&self.root)
                    .map(|rd| {
                        rd.filter_map(Result::ok)
                            .map(|e| e.path().join(&self.name))
                            .collect()
                    })
                    .unwrap_or_default();
                v.sort();
                v
            }
        }
    }

    /// Existing directories of this run (empty once removed).
    pub fn existing_dirs(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().filter(|d| d.is_dir()).collect()
    }

    /// Reads the OOM and pids counters.
    pub fn events(&self) -> CgroupEvents {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        match self.version {
            CgroupVersion::V1 => {
                let m = self.root.join("memory").join(&self.name);
                let p = self.root.join("pids").join(&self.name);
                CgroupEvents {
                    oom_kills: keyed(&read(m.join("memory.oom_control")), "oom_kill"),
                    memory_limit_hits: read(m.join("memory.failcnt")).trim().parse().unwrap_or(0),
                    pids_max_hits: keyed(&read(p.join("pids.events")), "max"),
                }
            }
            CgroupVersion::V2 => {
                let d = self.root.join(&self.name);
                let mem = read(d.join("memory.events"));
                CgroupEvents {
                    oom_kills: keyed(&mem, "oom_kill"),
                    memory_limit_hits: keyed(&mem, "max"),
                    pids_max_hits: keyed(&read(d.join("pids.events")), "max"),
                }
            }
        }
    }

    /// Kills whatever is still inside and removes every directory of this run; waits up to
    /// 2 s for dying tasks to leave. Returns the directories that could not be removed.
    pub fn remove(&self) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut left = Vec::new();
        for d in self.dirs() {
            if !d.is_dir() {
                continue;
            }
            loop {
                kill_tasks(&d);
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => {
                        left.push(d.clone());
                        break;
                    }
                }
            }
        }
        left
    }
}

/// SIGKILLs every task listed in `dir/cgroup.procs`.
fn kill_tasks(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 1 {
            crate::process::kill(pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_counters_are_read_by_name() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(v1, "oom_kill"), 3);
        assert_eq!(keyed(v1, "oom"), 0);
        assert_eq!(keyed("max 7\n", "max"), 7);
        assert_eq!(keyed("", "max"), 0);
    }

    fn fake_root(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("snas-cg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn limits() -> Limits {
        Limits {
            cpus: crate::limits::MilliCpus(500),
            memory: crate::limits::Bytes(256 << 20),
            pids: 128,
        }
    }

    #[test]
    fn v2_limits_and_events_use_the_unified_files() {
        let root = fake_root("v2");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let cg = Cgroup::create(&root, "t1", &limits()).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        assert_eq!(cg.oci_path(), "/snas-t1");
        let d = root.join("snas-t1");
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("pids.max"), "128");
        assert_eq!(read("cpu.max"), "50000 100000");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(d.join("pids.events"), "max 4\n").unwrap();
        let ev = cg.events();
        assert_eq!(
            (ev.oom_kills, ev.memory_limit_hits, ev.pids_max_hits),
            (1, 9, 4)
        );
        assert_eq!(cg.existing_dirs(), vec![d]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_limits_and_events_use_the_per_controller_files() {
        let root = fake_root("v1");
        for c in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        let cg = Cgroup::create(&root, "t2", &limits()).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(root.join(c).join("snas-t2").join(f)).unwrap()
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "128");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        let m = root.join("memory").join("snas-t2");
        std::fs::write(
            m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(m.join("memory.failcnt"), "17\n").unwrap();
        std::fs::write(
            root.join("pids").join("snas-t2").join("pids.events"),
            "max 3\n",
        )
        .unwrap();
        let ev = cg.events();
        assert_eq!(
            (ev.oom_kills, ev.memory_limit_hits, ev.pids_max_hits),
            (2, 17, 3)
        );
        assert_eq!(cg.existing_dirs().len(), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_is_detected_only_with_memory_and_pids() {
        let d = std::env::temp_dir().join(format!("snas-cg-detect-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(CgroupVersion::detect(&d).unwrap(), CgroupVersion::V2);
        std::fs::write(d.join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(CgroupVersion::detect(&d).is_err());
        for c in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(d.join(c)).unwrap();
            std::fs::write(d.join(c).join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(CgroupVersion::detect(&d).unwrap(), CgroupVersion::V1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
