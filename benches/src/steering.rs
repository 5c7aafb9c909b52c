//! Steering the proxies' receive processing onto one CPU (RPS), and what each CPU did
//! meanwhile: the measurement behind "proxy packets per core" (`proxy_pps`).
//!
//! The proxies' fast path runs in softirq context on whichever CPU processes a packet's
//! receive, charged to no process. On this testbed every hop is a veth: a veth's transmit hands
//! the packet to its peer with `netif_rx`, which honours the peer's receive packet steering
//! (`/sys/class/net/<dev>/queues/rx-*/rps_cpus`) and queues it to the backlog of the CPU named
//! there (checked on Linux 6.18: a flood into a veth whose `rps_cpus` names CPU 1, sent from a
//! process pinned to CPU 0, was received — `/proc/net/softnet_stat` `processed` — entirely by
//! CPU 1, and CPU 1 carried the softirq time). [`Steering`] points every receive queue of the
//! proxies' namespaces (their underlay and transit veths, TUN and loopback) at the *proxy
//! CPU* and every receive queue of the other namespaces given (underlay switch, nodes,
//! internet) at the others; the caller pins the client to another CPU, so the job's own veth,
//! whose namespace exists only while it runs, is processed there too, and holds the
//! internet's servers there with [`Pinned`] (a server that the scheduler ran on the proxy CPU
//! handed its replies to the proxies without an RPS interrupt, and the proxy CPU's cost per
//! packet changed by up to 2× between repetitions with that placement). The proxy CPU then
//! does the proxies' receive processing — the fast path's programs and the transmit to the
//! next veth's backlog that their redirects start — and nothing else of the flood; every
//! packet reaches it the same way, handed over by another CPU (an RPS interrupt per batch).
//!
//! [`CpuSnapshot`] reads per CPU the `/proc/stat` times (`irq`, `softirq`, `idle` ...), the
//! packets its backlog processed and the RPS interrupts it received
//! (`/proc/net/softnet_stat`), so that the caller can charge the proxy CPU's busy time to the
//! proxies and check that the steering held: the proxy CPU received as many packets as the
//! proxies carried, and interrupt + softirq time was most of what it did.
//!
//! Invariants: [`Steering`] writes only `rps_cpus` files of the namespaces it is given and
//! writes every value it changed back when dropped (or by [`Steering::restore`], which reports
//! failures), also after a failed apply; [`Pinned`] writes every thread's affinity back when
//! dropped. Nothing global changes (`rps_sock_flow_entries`, RFS,
//! stays as it is; [`rfs_enabled`] tells the caller whether flow steering could override RPS).
//!
//! Limits: `/proc/stat`'s `irq` and `softirq` are sampled at the scheduler tick on kernels
//! without `CONFIG_IRQ_TIME_ACCOUNTING` (this one: 250 Hz). Its `idle` is measured (nohz idle
//! accounting), so `wall − idle − iowait` ([`CpuDelta::measured_busy_s`]) is a CPU's busy
//! time independently of the sampling. The two disagree on a partly idle CPU where the tick is
//! stopped in idle and restarted as the CPU wakes (this VM has no cpuidle driver, so every idle
//! entry stops it): ticks then land at the start of busy periods, and the sampled busy time
//! ([`CpuDelta::sampled_busy_s`]) came out 1.25–1.6× the measured one for the steered CPU
//! (about 1/3 busy). Charge measured busy time; use the sampled columns only for shares. RPS's
//! inter-processor interrupts land on the proxy CPU and are charged to the proxies, as a NIC's
//! interrupts would be. Writing `rps_cpus` needs root; sysfs shows the devices of the
//! namespace it was mounted in, so each namespace's files are reached through `ip netns exec`
//! (which mounts a sysfs of that namespace).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Instant;

const PROC_STAT: &str = "/proc/stat";
const SOFTNET_STAT: &str = "/proc/net/softnet_stat";
const RPS_SOCK_FLOW: &str = "/proc/sys/net/core/rps_sock_flow_entries";

/// Errors steering receive processing.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// `ip netns exec` could not be started.
    #[error("ip netns exec {ns}: {source}")]
    Spawn {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    /// The script listing or writing `rps_cpus` failed in a namespace.
    #[error("rps_cpus in namespace {ns}: {stderr}")]
    Write { ns: String, stderr: String },
    /// `ip netns exec` printed a line that is not `<file> <mask>`.
    #[error("rps_cpus in namespace {ns}: unexpected output line `{line}`")]
    Output { ns: String, line: String },
}

/// A CPU set as `rps_cpus` takes it: hexadecimal, in comma-separated groups of 32 CPUs, the
/// highest group first (`0-1` → `3`; CPU 33 → `2,00000000`).
pub fn cpu_mask(cpus: &[usize]) -> String {
    let groups = cpus.iter().map(|c| c / 32 + 1).max().unwrap_or(1);
    let mut words = vec![0u32; groups];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    let mut out = String::new();
    for (i, w) in words.iter().enumerate().rev() {
        if i + 1 == groups {
            out.push_str(&format!("{w:x}"));
        } else {
            out.push_str(&format!(",{w:08x}"));
        }
    }
    out
}

/// Whether receive flow steering is configured machine-wide (`rps_sock_flow_entries` > 0):
/// with it, a receive queue that also has `rps_flow_cnt` set may follow the consuming
/// socket's CPU instead of its `rps_cpus`.
pub fn rfs_enabled() -> bool {
    std::fs::read_to_string(RPS_SOCK_FLOW)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// Lists every receive queue's `rps_cpus` (`<file> <old mask>` per line, relative to
/// /sys/class/net) and then writes the mask `$1` to it.
const APPLY_SCRIPT: &str = r#"cd /sys/class/net || exit 1
for f in */queues/rx-*/rps_cpus; do
  [ -e "$f" ] || continue
  printf '%s %s\n' "$f" "$(cat "$f")" || exit 1
  printf '%s\n' "$1" > "$f" || exit 1
done"#;

/// Writes pairs of arguments `<file> <mask>` back.
const RESTORE_SCRIPT: &str = r#"cd /sys/class/net || exit 1
while [ "$#" -ge 2 ]; do
  printf '%s\n' "$2" > "$1" || exit 1
  shift 2
done"#;

/// Receive steering applied to some namespaces; restores what it changed when dropped.
#[derive(Debug)]
pub struct Steering {
    /// Per namespace: the `rps_cpus` files changed and their values before.
    saved: BTreeMap<String, Vec<(String, String)>>,
}

impl Steering {
    /// Points every receive queue of the `to_proxy` namespaces at `proxy_cpus` and every one
    /// of the `to_rest` namespaces at `rest_cpus`. On an error, what was already changed is
    /// restored (the returned error says where it failed).
    pub fn apply(
        to_proxy: &[String],
        proxy_cpus: &[usize],
        to_rest: &[String],
        rest_cpus: &[usize],
    ) -> Result<Steering, SteerError> {
        let mut s = Steering {
            saved: BTreeMap::new(),
        };
        let plan = to_proxy
            .iter()
            .map(|ns| (ns, cpu_mask(proxy_cpus)))
            .chain(to_rest.iter().map(|ns| (ns, cpu_mask(rest_cpus))));
        for (ns, mask) in plan {
            // On error `s` drops here and restores the namespaces done so far.
            let (out, failed) = run_in(ns, APPLY_SCRIPT, &[&mask])?;
            // Keep what was listed even when a write failed or a line is odd: those files may
            // have changed, and must be restored.
            let mut odd = None;
            let files = s.saved.entry(ns.clone()).or_default();
            for line in out.lines() {
                match line.split_once(' ') {
                    Some((file, old)) => files.push((file.to_owned(), old.trim().to_owned())),
                    None => odd = Some(line.to_owned()),
                }
            }
            if let Some(stderr) = failed {
                return Err(SteerError::Write {
                    ns: ns.clone(),
                    stderr,
                });
            }
            if let Some(line) = odd {
                return Err(SteerError::Output {
                    ns: ns.clone(),
                    line,
                });
            }
        }
        Ok(s)
    }

    /// How many receive queues were steered.
    pub fn queues(&self) -> usize {
        self.saved.values().map(Vec::len).sum()
    }

    /// Writes every changed value back, reporting the namespaces where that failed (a
    /// namespace that is gone has nothing left to restore).
    pub fn restore(mut self) -> Result<(), SteerError> {
        self.restore_all()
    }

    fn restore_all(&mut self) -> Result<(), SteerError> {
        let mut first_err = None;
        for (ns, files) in std::mem::take(&mut self.saved) {
            if files.is_empty() || !snas_testbed::netns::list_netns().contains(&ns) {
                continue;
            }
            let args: Vec<&str> = files
                .iter()
                .flat_map(|(f, v)| [f.as_str(), v.as_str()])
                .collect();
            let r = match run_in(&ns, RESTORE_SCRIPT, &args) {
                Ok((_, None)) => Ok(()),
                Ok((_, Some(stderr))) => Err(SteerError::Write { ns, stderr }),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        if let Err(e) = self.restore_all() {
            eprintln!("snas-bench: restoring receive steering: {e}");
        }
    }
}

/// Runs `script` with `args` under `sh` in namespace `ns` (with that namespace's sysfs):
/// its stdout, and its stderr when it failed.
fn run_in(ns: &str, script: &str, args: &[&str]) -> Result<(String, Option<String>), SteerError> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script, "sh"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SteerError::Spawn {
            ns: ns.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed = (!out.status.success()).then(|| {
        format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )
    });
    Ok((stdout, failed))
}

/// Processes held to a set of CPUs while this lives: every thread's affinity is saved, set,
/// and written back when dropped (threads gone by then need nothing). Used to keep the
/// servers of the flood off the steered CPU, so that it does only the steered hop's work.
#[derive(Debug)]
pub struct Pinned {
    saved: Vec<(i32, libc::cpu_set_t)>,
}

impl Pinned {
    /// Holds every thread of `pids` to `cpus`. A thread that exits meanwhile is skipped; any
    /// other failure restores what was changed and is returned.
    pub fn pin(pids: &[i32], cpus: &[usize]) -> std::io::Result<Pinned> {
        // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
        let mut want: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: `c` is below CPU_SETSIZE, inside `want`.
            unsafe { libc::CPU_SET(c, &mut want) };
        }
        let mut p = Pinned { saved: Vec::new() };
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for tid in tasks.flatten() {
                let Some(tid) = tid.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
                    continue;
                };
                // SAFETY: as above.
                let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::cpu_set_t>();
                // SAFETY: `old` is a valid cpu_set_t of `size` bytes the kernel writes into.
                if unsafe { libc::sched_getaffinity(tid, size, &mut old) } != 0 {
                    continue; // exited
                }
                // SAFETY: `want` is a valid cpu_set_t of `size` bytes, only read.
                if unsafe { libc::sched_setaffinity(tid, size, &want) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        continue;
                    }
                    return Err(e); // `p` restores on drop
                }
                p.saved.push((tid, old));
            }
        }
        Ok(p)
    }

    /// Threads whose affinity was changed.
    pub fn threads(&self) -> usize {
        self.saved.len()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (tid, old) in &self.saved {
            // SAFETY: `old` is the valid cpu_set_t read from this thread; a thread that has
            // exited makes the call fail with ESRCH, which needs nothing.
            unsafe { libc::sched_setaffinity(*tid, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// One CPU's `/proc/stat` times, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CpuTimes {
    pub user: f64,
    pub nice: f64,
    pub system: f64,
    pub idle: f64,
    pub iowait: f64,
    pub irq: f64,
    pub softirq: f64,
    pub steal: f64,
}

impl CpuTimes {
    fn minus(self, o: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - o.user,
            nice: self.nice - o.nice,
            system: self.system - o.system,
            idle: self.idle - o.idle,
            iowait: self.iowait - o.iowait,
            irq: self.irq - o.irq,
            softirq: self.softirq - o.softirq,
            steal: self.steal - o.steal,
        }
    }
}

/// Per CPU: `/proc/stat` times and the packets its backlog has processed, at one instant.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    at: Instant,
    times: BTreeMap<usize, CpuTimes>,
    /// Per CPU: (packets processed, RPS interrupts received).
    processed: BTreeMap<usize, (u64, u64)>,
}

/// What one CPU did between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CpuDelta {
    pub cpu: usize,
    pub wall_s: f64,
    pub times: CpuTimes,
    /// Packets the CPU's receive processing handled (`softnet_stat` `processed`; a packet
    /// counts once per device it is received on).
    pub packets: u64,
    /// Inter-processor interrupts that woke its receive processing for packets steered to it
    /// (`softnet_stat` `received_rps`).
    pub rps_interrupts: u64,
}

impl CpuDelta {
    /// Interrupt + softirq seconds (sampled at the tick).
    pub fn irq_s(&self) -> f64 {
        self.times.irq + self.times.softirq
    }

    /// Busy seconds as the tick sampled them: every non-idle column, steal included.
    pub fn sampled_busy_s(&self) -> f64 {
        let t = &self.times;
        t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    }

    /// Busy seconds as measured: wall time less the (measured, nohz) idle and iowait time.
    pub fn measured_busy_s(&self) -> f64 {
        self.wall_s - self.times.idle - self.times.iowait
    }
}

/// Errors reading the per-CPU counters.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse {
        path: &'static str,
        reason: &'static str,
    },
}

impl CpuSnapshot {
    /// Reads `/proc/stat` and `/proc/net/softnet_stat` now.
    pub fn read() -> Result<CpuSnapshot, SnapshotError> {
        let read = |path: &'static str| {
            std::fs::read_to_string(path).map_err(|source| SnapshotError::Read { path, source })
        };
        let stat = read(PROC_STAT)?;
        let softnet = read(SOFTNET_STAT)?;
        let at = Instant::now();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let times = parse_cpu_lines(&stat, hz).ok_or(SnapshotError::Parse {
            path: PROC_STAT,
            reason: "no well-formed `cpuN` line",
        })?;
        let processed = parse_softnet(&softnet).ok_or(SnapshotError::Parse {
            path: SOFTNET_STAT,
            reason: "a line without hexadecimal `processed` and `received_rps` fields",
        })?;
        Ok(CpuSnapshot {
            at,
            times,
            processed,
        })
    }

    /// Per CPU present in both snapshots: what it did from `earlier` to `self`.
    pub fn since(&self, earlier: &CpuSnapshot) -> Vec<CpuDelta> {
        let wall_s = self.at.duration_since(earlier.at).as_secs_f64();
        self.times
            .iter()
            .filter_map(|(&cpu, &t)| {
                let t0 = *earlier.times.get(&cpu)?;
                let (p, i) = self.processed.get(&cpu).copied().unwrap_or_default();
                let (p0, i0) = earlier.processed.get(&cpu).copied().unwrap_or_default();
                Some(CpuDelta {
                    cpu,
                    wall_s,
                    times: t.minus(t0),
                    packets: wrapping_u32_delta(p0, p),
                    rps_interrupts: wrapping_u32_delta(i0, i),
                })
            })
            .collect()
    }
}

/// `later − earlier` of a 32-bit counter that may have wrapped once (softnet counters are
/// `unsigned int`).
fn wrapping_u32_delta(earlier: u64, later: u64) -> u64 {
    if later >= earlier {
        later - earlier
    } else {
        later + (1 << 32) - earlier
    }
}

/// The `cpuN` lines of `/proc/stat` (in `USER_HZ` ticks, `hz` per second) as seconds.
fn parse_cpu_lines(stat: &str, hz: f64) -> Option<BTreeMap<usize, CpuTimes>> {
    let mut out = BTreeMap::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(cpu) = f
            .next()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<f64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]
        let g = |i: usize| v.get(i).map(|x| x / hz);
        out.insert(
            cpu,
            CpuTimes {
                user: g(0)?,
                nice: g(1)?,
                system: g(2)?,
                idle: g(3)?,
                iowait: g(4)?,
                irq: g(5)?,
                softirq: g(6)?,
                steal: g(7).unwrap_or(0.0),
            },
        );
    }
    (!out.is_empty()).then_some(out)
}

/// Per CPU, the `processed` (1st) and `received_rps` (10th) columns of
/// `/proc/net/softnet_stat` (hexadecimal). The CPU is the 13th column where the kernel prints
/// it (5.10+); older kernels print one line per online CPU in order, without it.
fn parse_softnet(text: &str) -> Option<BTreeMap<usize, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let hex = |n: usize| u64::from_str_radix(f.get(n)?, 16).ok();
        let cpu = match f.get(12) {
            Some(c) => usize::from_str_radix(c, 16).ok()?,
            None => i,
        };
        out.insert(cpu, (hex(0)?, hex(9)?));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_mask_is_hex_in_groups_of_32_highest_first() {
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 1]), "3");
        assert_eq!(cpu_mask(&[0, 2, 3, 31]), "8000000d");
        assert_eq!(cpu_mask(&[33]), "2,00000000");
        assert_eq!(cpu_mask(&[0, 64]), "1,00000000,00000001");
        assert_eq!(cpu_mask(&[]), "0");
    }

    const STAT: &str = "cpu  300 0 200 1000 4 2 50 1 0 0\n\
cpu0 100 0 150 400 2 1 10 0 0 0\n\
cpu1 200 0 50 600 2 1 40 1 0 0\n\
intr 12345 0 0\nctxt 999\nsoftirq 1 2 3\n";

    #[test]
    fn proc_stat_cpu_lines_become_seconds_per_cpu() {
        let t = parse_cpu_lines(STAT, 100.0).unwrap();
        assert_eq!(t.len(), 2, "the machine-wide `cpu` line is not a CPU");
        assert_eq!(t[&1].softirq, 0.40);
        assert_eq!(t[&1].irq, 0.01);
        assert_eq!(t[&0].system, 1.5);
        assert_eq!(t[&1].steal, 0.01);
        assert!(parse_cpu_lines("intr 1 2\n", 100.0).is_none());
        assert!(parse_cpu_lines("cpu0 1 2 x 4 5 6 7\n", 100.0).is_none());
        assert!(parse_cpu_lines("cpu0 1 2 3\n", 100.0).is_none());
    }

    #[test]
    fn softnet_processed_is_keyed_by_the_cpu_column_or_the_line() {
        let with_index = "85483188 00000000 00000007 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n\
973fee15 00000000 00000003 00000000 00000000 00000000 00000000 00000000 00000000 0000001f 00000000 00000000 00000002 00000000 00000000\n";
        let p = parse_softnet(with_index).unwrap();
        assert_eq!(p[&0], (0x85483188, 0));
        assert_eq!(p[&2], (0x973fee15, 31), "an offline CPU 1 has no line");
        let old = "0000000a 0 0 0 0 0 0 0 0 3 0\n0000000b 0 0 0 0 0 0 0 0 4 0\n";
        let p = parse_softnet(old).unwrap();
        assert_eq!((p[&0], p[&1]), ((10, 3), (11, 4)));
        assert!(parse_softnet("zz 0 0 0 0 0 0 0 0 0\n").is_none());
        assert!(
            parse_softnet("0a 0 0\n").is_none(),
            "no received_rps column"
        );
    }

    #[test]
    fn deltas_charge_each_cpu_its_own_time_and_packets_across_a_wrap() {
        let at = Instant::now();
        let snap = |stat: &str, p0: u64, p1: u64, dt: f64| CpuSnapshot {
            at: at + std::time::Duration::from_secs_f64(dt),
            times: parse_cpu_lines(stat, 100.0).unwrap(),
            processed: BTreeMap::from([(0, (p0, 5)), (1, (p1, 7))]),
        };
        let a = snap(STAT, 0xffff_fff0, 1000, 0.0);
        let later = "cpu0 150 0 200 600 2 1 20 0 0 0\ncpu1 200 0 60 800 2 1 140 1 0 0\n";
        let b = snap(later, 0x10, 301_000, 3.0);
        let d = b.since(&a);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].packets, 0x20,
            "a wrapped 32-bit counter still counts forward"
        );
        assert_eq!(d[1].packets, 300_000);
        assert_eq!(d[1].rps_interrupts, 0);
        assert!((d[1].irq_s() - 1.0).abs() < 1e-9);
        assert!((d[1].measured_busy_s() - 1.0).abs() < 1e-9);
        assert!((d[1].sampled_busy_s() - 1.1).abs() < 1e-9);
        assert!((d[0].sampled_busy_s() - 1.1).abs() < 1e-9);
    }
}
