//! What machine a run happened on: kernel, CPUs, memory, load, whether `sch_fq` exists, when,
//! and from which source revision — the [`Machine`] line every figure is read against.
//!
//! Owns the reads of `/proc` and `/sys` and the two helper commands (`git describe`, and `tc`
//! through [`snas_bpf::fq_available`]). The parsers are pure functions over file contents so
//! that they are tested without the host.
//!
//! Decisions:
//! - `has_fq` is decided the way the agent decides it ([`snas_bpf::fq_available`]: add an `fq`
//!   qdisc to `lo` in a throwaway network namespace). Looking for `sch_fq.ko` misses built-in
//!   qdiscs and hosts without `/lib/modules` (this one), and `modinfo` needs kmod; trying the
//!   qdisc is what actually matters for EDT. The probe needs root (CAP_NET_ADMIN and `tc`); if
//!   it cannot run, `has_fq` is `false`, i.e. "not shown to exist", which is the conservative
//!   reading for EDT figures.
//! - `cores` counts online CPUs from `/sys/devices/system/cpu/online`, falling back to the
//!   `processor` lines of `/proc/cpuinfo`: the machine's size, not this process's affinity.
//! - `load_end` is set equal to `load_start` by [`probe`]; the caller overwrites it with
//!   [`load_average`] when the run ends.
//!
//! Limits: Linux only. `cpu_model` is `"unknown"` where `/proc/cpuinfo` has no `model name`
//! line (some ARM kernels); `revision` is `None` when git is missing, the binary was built
//! outside a work tree, or git refuses the tree (ownership checks).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use crate::results::Machine;

const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
const CPUINFO: &str = "/proc/cpuinfo";
const MEMINFO: &str = "/proc/meminfo";
const LOADAVG: &str = "/proc/loadavg";

/// Errors probing the machine: a `/proc` file that every Linux has could not be read or
/// did not have the expected shape.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but the field was missing or malformed.
    #[error("{path}: {field}: {reason}")]
    Parse {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// Probes the machine now. `load_end` equals `load_start`; set it at the end of the run.
pub fn probe() -> Result<Machine, MachineError> {
    let kernel = read(OSRELEASE)?.trim().to_string();
    let cpuinfo = read(CPUINFO)?;
    let cores = std::fs::read_to_string(CPU_ONLINE)
        .ok()
        .and_then(|s| parse_cpu_list(&s))
        .or_else(|| count_processors(&cpuinfo))
        .ok_or_else(|| MachineError::Parse {
            path: PathBuf::from(CPUINFO),
            field: "processor",
            reason: format!("no CPU listed (and {CPU_ONLINE} unreadable or malformed)"),
        })?;
    let cpu_model = cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_string());
    let memory_gib = parse_mem_total_gib(&read(MEMINFO)?).ok_or_else(|| MachineError::Parse {
        path: PathBuf::from(MEMINFO),
        field: "MemTotal",
        reason: "missing or not `<n> kB`".to_string(),
    })?;
    let load = parse_loadavg(&read(LOADAVG)?).ok_or_else(|| MachineError::Parse {
        path: PathBuf::from(LOADAVG),
        field: "1-minute load",
        reason: "first field is not a number".to_string(),
    })?;
    Ok(Machine {
        kernel,
        cores,
        cpu_model,
        memory_gib,
        load_start: load,
        load_end: load,
        // An error means the probe could not run (not root, no `tc`): not shown to exist.
        has_fq: snas_bpf::fq_available().unwrap_or(false),
        started_utc: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        revision: revision(),
    })
}

/// The 1-minute load average, or `None` if `/proc/loadavg` is unreadable or malformed.
pub fn load_average() -> Option<f64> {
    parse_loadavg(&std::fs::read_to_string(LOADAVG).ok()?)
}

/// `git describe --always --dirty` of the workspace this crate was built from.
fn revision() -> Option<String> {
    // The benches crate sits one level below the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let out = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!rev.is_empty()).then_some(rev)
}

fn read(path: &str) -> Result<String, MachineError> {
    std::fs::read_to_string(path).map_err(|source| MachineError::Read {
        path: PathBuf::from(path),
        source,
    })
}

/// The online CPUs (`/sys/devices/system/cpu/online`), in increasing order, or `None` when
/// the file is unreadable or malformed.
pub fn online_cpus() -> Option<Vec<usize>> {
    cpu_ids(&std::fs::read_to_string(CPU_ONLINE).ok()?)
}

/// Counts the CPUs of a kernel CPU list such as `0-3,6,8-9`.
fn parse_cpu_list(s: &str) -> Option<usize> {
    cpu_ids(s).map(|v| v.len())
}

/// The CPUs of a kernel CPU list such as `0-3,6,8-9`, in increasing order; `None` when it is
/// empty or malformed (a descending range, a non-number).
fn cpu_ids(s: &str) -> Option<Vec<usize>> {
    let mut ids = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?;
                ids.extend(a..=b);
            }
            None => ids.push(part.parse::<usize>().ok()?),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    (!ids.is_empty()).then_some(ids)
}

fn count_processors(cpuinfo: &str) -> Option<usize> {
    let n = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    (n > 0).then_some(n)
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

fn parse_mem_total_gib(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let kib: f64 = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(kib / (1024.0 * 1024.0))
}

fn parse_loadavg(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_counts_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn cpu_list_names_each_cpu_once_in_order() {
        assert_eq!(cpu_ids("0-1\n"), Some(vec![0, 1]));
        assert_eq!(cpu_ids("8-9,0,3-4"), Some(vec![0, 3, 4, 8, 9]));
        assert_eq!(cpu_ids("2,2"), Some(vec![2]));
        assert_eq!(cpu_ids("1-0"), None);
        assert_eq!(cpu_ids(""), None);
        assert!(online_cpus().is_some_and(|c| !c.is_empty()));
    }

    #[test]
    fn cpuinfo_gives_model_and_processor_count() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(count_processors(info), Some(2));
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\nCPU part : 0xd0c\n"), None);
    }

    #[test]
    fn meminfo_total_is_converted_to_gib() {
        let m = "MemTotal:       25165824 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total_gib(m), Some(24.0));
        assert_eq!(parse_mem_total_gib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total_gib("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn loadavg_first_field_is_the_one_minute_load() {
        assert_eq!(parse_loadavg("1.25 0.80 0.50 2/345 6789\n"), Some(1.25));
        assert_eq!(parse_loadavg(""), None);
    }

    #[test]
    fn probe_on_this_host_fills_plausible_values() {
        let m = probe().unwrap();
        assert!(!m.kernel.is_empty());
        assert!(m.cores >= 1);
        assert!(m.memory_gib > 0.0);
        assert!(m.load_start >= 0.0 && m.load_end == m.load_start);
        // RFC 3339 UTC, seconds precision: 2026-11-23T19:30:45Z
        assert_eq!(m.started_utc.len(), 20, "{}", m.started_utc);
        assert!(m.started_utc.ends_with('Z'));
        assert!(load_average().is_some());
    }
}
