//! One sandbox run from start to cleanup.
//!
//! Owns the lifecycle: per-run directory (`<state_dir>/<id>/`: `config.json`, the generated
//! `/etc` files and runsc's `root/`; the root filesystem skeleton is shared, see
//! [`crate::bundle`]), cgroup with limits, the namespace's address and route, `runsc --root
//! <run>/root --platform P --network sandbox --gvisor-gro run --bundle <run> <id>` as a child
//! (in the root-namespace workaround when the kernel needs it), waiting with a deadline, `runsc kill` + SIGKILL on
//! timeout, and cleanup: leftover runsc processes killed and reaped, `runsc delete --force`
//! when state remains, cgroup directories removed, the per-run directory removed.
//!
//! Before anything is created it checks that the runsc binary has the chosen platform
//! ([`crate::platform::RunscInfo`]): an old runsc asked for systrap is a clear
//! [`LaunchError::Runsc`], not runsc's own `unknown platform` in the workload's stderr.
//!
//! # runsc's flags
//! [`runsc_flags`] is the one place that decides them, so that every caller (`snas run`, the
//! benchmark's gvisor-direct path, the cold-start program) runs gVisor the same way:
//! - the platform;
//! - gVisor's own network stack (`--network sandbox`), never the host's: `--network=host`
//!   was unreliable here (connect+send often ENOTCONN) and would put the workload on the
//!   host's kernel stack, which is what gVisor is there to keep it from;
//! - netstack GSO left at runsc's default (on): with `--gso=false` uploads fall from ~1.6
//!   GB/s to ~0.2 GB/s here;
//! - gVisor's receive offload (`--gvisor-gro`, off in runsc by default): through SNAS every
//!   packet reaches the sandbox MTU-sized (tier 1 hands decapsulated packets to the job's veth
//!   with `bpf_redirect_peer`, past the kernel's GRO), so netstack handles each one; GRO
//!   coalesces a flow's segments within one read batch (no timer, a segment with PSH, FIN or
//!   a new size is delivered at once). Measured: a gVisor download through SNAS 695 → 1,051
//!   Mbit/s (median of 10 interleaved pairs), TCP_RR and TCP_CRR unchanged (docs/sandbox.md).
//!   A caller can turn it off with `--gvisor-gro=false` in `extra_runsc_flags` (the last
//!   occurrence of a flag wins).
//!
//! # Invariants
//! - Cleanup runs on every path once anything was created: [`RunGuard`] does it on drop
//!   (also when a panic unwinds), and the normal path calls it explicitly to time it.
//! - The launcher only ever waits for processes it can name (its runsc child, then the pids
//!   whose command line carries the run's private `--root`); it never calls `wait(-1)`, so it
//!   can live in a process that has other children (tests, the `snas` binary).
//! - The process becomes a child subreaper ([`crate::process::become_subreaper`]) so that
//!   runsc's sandbox and gofer are ours to reap if runsc itself dies.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bundle::{self, BundleError, BundleSpec, Rootfs};
use crate::cgroup::{Cgroup, CgroupError, CgroupEvents, CGROUP_ROOT};
use crate::limits::{Bytes, Limits};
use crate::netcfg::{NetConfig, NetError};
use crate::platform::{Platform, RunscError, RunscInfo};
use crate::process;

/// Default base directory of per-run state.
pub const DEFAULT_STATE_DIR: &str = "/run/snas-sandbox";
/// Exit status reported for a run that hit its deadline (as `timeout(1)` does).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status reported for a run killed by the memory limit (128 + SIGKILL).
pub const EXIT_OOM: i32 = 137;
/// Exit status reported for a run that failed after the pids limit refused a fork (the
/// workload's own status is in the message): next to 124 (deadline) and 125 (nothing ran),
/// the other statuses the launcher's caller reserves.
pub const EXIT_PIDS: i32 = 123;
/// How long a run that was told to stop may take before it is SIGKILLed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// The longest a `runsc kill` or `runsc delete` may take before it is given up (SIGKILL).
const RUNSC_COMMAND_LIMIT: Duration = Duration::from_secs(5);
/// After this long without the sandbox running, the progress callback is told.
const SLOW_START: Duration = Duration::from_secs(1);

/// Errors that prevent a sandbox from running (a workload that fails is not an error).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The per-run directory could not be made.
    #[error("creating run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bundle could not be written.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The cgroup could not be created.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The namespace could not be prepared.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The network namespace could not be inspected.
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runsc binary is missing or cannot run the chosen platform.
    #[error(transparent)]
    Runsc(#[from] RunscError),
    /// runsc could not be started.
    #[error("starting {runsc}: {source}")]
    Spawn {
        runsc: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether to hide the root-namespace marker from runsc (see [`crate::process`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootNsWorkaround {
    /// Only when `/proc/sys/net/core/rmem_default` is visible inside the job's namespace.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never (a runsc that checks the namespace correctly).
    Never,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The runsc binary.
    pub runsc: PathBuf,
    /// gVisor platform (probe KVM with [`crate::platform::probe_kvm`] before choosing it).
    pub platform: Platform,
    /// Where the runsc release check keeps its answer between runs (see
    /// [`RunscInfo::probe`]); `None` asks `runsc --version` every run that needs to know.
    pub runsc_memo: Option<PathBuf>,
    /// Base directory of per-run state.
    pub state_dir: PathBuf,
    /// The bundle; its `netns` is the job's namespace, its `cgroups_path` is replaced by
    /// the run's own cgroup.
    pub bundle: BundleSpec,
    /// Address and route to (re)establish in the namespace before starting; `None` when
    /// the caller guarantees them.
    pub net: Option<NetConfig>,
    /// Deadline of the workload; `None` waits as long as it runs.
    pub timeout: Option<Duration>,
    /// The root-namespace workaround.
    pub root_ns_workaround: RootNsWorkaround,
    /// Extra global runsc flags (e.g. `--debug`).
    pub extra_runsc_flags: Vec<String>,
    /// Pass SIGINT/SIGTERM/SIGHUP sent to this process on to the workload (`runsc kill`), then
    /// clean up as usual. Needs [`crate::process::block_forwarded_signals`] called first thing
    /// in `main`; otherwise those signals kill the launcher before it can clean up.
    pub forward_signals: bool,
}

impl RunOptions {
    /// Options with defaults: `runsc` from `PATH`, systrap, [`DEFAULT_STATE_DIR`], no timeout.
    pub fn new(bundle: BundleSpec) -> RunOptions {
        RunOptions {
            runsc: "runsc".into(),
            platform: Platform::default(),
            runsc_memo: None,
            state_dir: DEFAULT_STATE_DIR.into(),
            bundle,
            net: None,
            timeout: None,
            root_ns_workaround: RootNsWorkaround::Auto,
            extra_runsc_flags: Vec::new(),
            forward_signals: false,
        }
    }
}

/// The sandbox's standard streams.
#[derive(Debug)]
pub struct Stdio3 {
    /// stdin of the workload.
    pub stdin: Stdio,
    /// stdout of the workload (and of runsc).
    pub stdout: Stdio,
    /// stderr of the workload (and runsc's error messages).
    pub stderr: Stdio,
}

impl Default for Stdio3 {
    /// stdin from `/dev/null`, stdout and stderr inherited.
    fn default() -> Stdio3 {
        Stdio3 {
            stdin: Stdio::null(),
            stdout: Stdio::inherit(),
            stderr: Stdio::inherit(),
        }
    }
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited (runsc reports a signal death as 128 + signal).
    Exited(i32),
    /// The host's memory controller killed the sandbox.
    MemoryLimit(Bytes),
    /// It ran past its deadline and was killed.
    TimedOut(Duration),
    /// It failed (status kept) after the pids limit refused a fork: every guest process needs
    /// host tasks (systrap and ptrace stubs), and the sentry may die when it cannot make one.
    /// Reported as [`EXIT_PIDS`].
    PidsLimit {
        /// The limit.
        limit: u32,
        /// The exit status seen.
        code: i32,
    },
}

impl Termination {
    /// The exit status to hand on: the workload's; 137 for the memory limit; 124 for the
    /// deadline; 123 for a failure after the pids limit was reached.
    pub fn exit_code(self) -> i32 {
        match self {
            Termination::Exited(c) => c,
            Termination::MemoryLimit(_) => EXIT_OOM,
            Termination::TimedOut(_) => EXIT_TIMEOUT,
            Termination::PidsLimit { .. } => EXIT_PIDS,
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Exited(0) => f.write_str("exited 0"),
            Termination::Exited(c) if *c > 128 => {
                write!(f, "exited {c} (killed by signal {})", c - 128)
            }
            Termination::Exited(c) => write!(f, "exited {c}"),
            Termination::MemoryLimit(m) => write!(f, "killed: memory limit ({m}) exceeded"),
            Termination::TimedOut(d) => {
                write!(f, "timed out after {}", humanize(*d))
            }
            Termination::PidsLimit { limit, code } => write!(
                f,
                "pids limit ({limit}) reached: a fork was refused and the sandbox failed (exit {code})"
            ),
        }
    }
}

/// `60s`, `1.5s`, `250ms`.
pub fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Wall-clock phases of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Bundle, cgroup, namespace check.
    pub prepare: Duration,
    /// From spawning runsc until it exited (sandbox start + workload + runsc's own stop).
    pub run: Duration,
    /// Killing leftovers, `runsc delete`, cgroup and directory removal.
    pub cleanup: Duration,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The run's id (runsc container id, cgroup `snas-<id>`).
    pub id: String,
    /// How the workload ended.
    pub termination: Termination,
    /// What the cgroup counted.
    pub events: CgroupEvents,
    /// The limits that applied.
    pub limits: Limits,
    /// Phases.
    pub timings: Timings,
    /// Whether the namespace's address had to be re-added.
    pub readded_address: bool,
    /// Whether the root-namespace workaround was applied.
    pub root_ns_workaround: bool,
    /// Things cleanup could not remove (empty when everything went).
    pub leftovers: Vec<String>,
}

impl RunReport {
    /// Human notes about limits that were hit without deciding the outcome.
    pub fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.events.pids_max_hits > 0
            && !matches!(self.termination, Termination::PidsLimit { .. })
        {
            v.push(format!(
                "pids limit ({}) reached: {} fork(s) refused (runsc's own threads count toward it)",
                self.limits.pids, self.events.pids_max_hits
            ));
        }
        if self.events.oom_kills > 0 && !matches!(self.termination, Termination::MemoryLimit(_)) {
            v.push(format!(
                "memory limit ({}) reached: {} task(s) OOM-killed",
                self.limits.memory, self.events.oom_kills
            ));
        }
        v
    }
}

/// Progress events for a person watching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The sandbox is not running yet after this long.
    StillStarting(Duration),
    /// runsc has exited (after this long); cleanup starts now. Work that needs the sandbox
    /// gone but not cleaned up (deleting the job's network) can start in parallel here.
    Exited(Duration),
}

/// A unique run id: `<pid hex>-<counter>-<time hex>`; short and safe for paths and cgroups.
pub fn new_run_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}-{n}-{:06x}", std::process::id(), t & 0xff_ffff)
}

/// Owns everything a run created; cleans it all up on [`RunGuard::cleanup`] or drop.
#[derive(Debug)]
pub struct RunGuard {
    id: String,
    runsc: PathBuf,
    run_dir: PathBuf,
    root_dir: PathBuf,
    cgroup: Option<Cgroup>,
    done: bool,
}

impl RunGuard {
    /// Removes everything; returns what could not be removed.
    pub fn cleanup(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut left = Vec::new();
        let root_arg = self.root_dir.display().to_string();
        // 1. Processes of this run (runsc, sandbox, gofer): kill and reap; never wait forever.
        // A process loses its command line as soon as it is a zombie, so every pid found once
        // is reaped until it is gone or turns out not to be our child; the sandbox and gofer
        // named by runsc's state may already be zombies (our children through the subreaper
        // flag) and are only reaped, never signalled: their pids may have been reused if
        // runsc reaped them itself. A zombie left unreaped would make `runsc delete` wait for
        // it for two minutes.
        for pid in state_pids(&self.root_dir) {
            process::try_reap(pid);
        }
        let mut pending = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let live = process::pids_with_arg(&root_arg);
            for &pid in &live {
                process::kill(pid, libc::SIGKILL);
            }
            pending.extend(live);
            if pending.is_empty() {
                break;
            }
            pending.retain(|&pid| !process::try_reap(pid));
            if pending.is_empty() {
                continue;
            }
            if Instant::now() > deadline {
                left.push(format!("processes {pending:?}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // 2. runsc's state, if it has any left (a normal `runsc run` removes its own).
        if has_state(&self.root_dir) {
            let ok = runsc_bounded(
                &self.runsc,
                &self.root_dir,
                &["delete", "--force", &self.id],
                RUNSC_COMMAND_LIMIT,
            );
            if !ok {
                left.push(format!("runsc state in {}", self.root_dir.display()));
            }
        }
        // 3. cgroups (ours and any runsc made under the same name).
        if let Some(cg) = &self.cgroup {
            for d in cg.remove() {
                left.push(format!("cgroup {}", d.display()));
            }
        }
        // 4. bundle and runsc root.
        if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                left.push(format!("{}: {e}", self.run_dir.display()));
            }
        }
        left
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// `runsc --root <root> ARGS` with its output discarded; true when it succeeded within
/// `limit` (it is SIGKILLed and reaped after that).
fn runsc_bounded(runsc: &Path, root: &Path, args: &[&str], limit: Duration) -> bool {
    let child = Command::new(runsc)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The pids runsc's state files name (the sandbox and the gofer).
fn state_pids(root: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".state"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .flat_map(|v| [v["sandbox"]["pid"].as_i64(), v["goferPid"].as_i64()])
        .flatten()
        .filter_map(|p| i32::try_from(p).ok())
        .filter(|&p| p > 1)
        .collect()
}

fn has_state(root: &Path) -> bool {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(".state"))
        })
        .unwrap_or(false)
}

fn sandbox_running(root: &Path) -> bool {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".state"))
                .any(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|s| s.contains("\"status\":\"running\""))
                })
        })
        .unwrap_or(false)
}

fn code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// runsc's global flags for a run: `--root <root> --platform P --network sandbox
/// --gvisor-gro`, then `extra` (see the module docs). Netstack GSO is runsc's default (on)
/// and is never turned off here.
pub fn runsc_flags(root: &Path, platform: Platform, extra: &[String]) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["--root".into(), root.into()];
    for a in [
        "--platform",
        platform.as_str(),
        "--network",
        "sandbox",
        "--gvisor-gro",
    ] {
        v.push(a.into());
    }
    v.extend(extra.iter().map(Into::into));
    v
}

/// Runs one sandbox to completion and cleans up; see the module docs.
pub fn run(
    opts: &RunOptions,
    stdio: Stdio3,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunReport, LaunchError> {
    let t0 = Instant::now();
    if opts.platform.min_release().is_some() {
        RunscInfo::probe(&opts.runsc, opts.runsc_memo.as_deref())?.check(opts.platform)?;
    }
    // Best effort: without it orphans go to init, which only slows `runsc delete` down.
    let _ = process::become_subreaper();
    let id = new_run_id();
    // The bundle is the run directory itself (config.json and the generated /etc files); the
    // root filesystem skeleton is shared by all runs (see `bundle`), runsc's state is `root/`.
    let run_dir = opts.state_dir.join(&id);
    let bundle_dir = run_dir.clone();
    let root_dir = run_dir.join("root");
    std::fs::create_dir_all(&root_dir).map_err(|source| LaunchError::RunDir {
        path: root_dir.clone(),
        source,
    })?;
    let mut guard = RunGuard {
        id: id.clone(),
        runsc: opts.runsc.clone(),
        run_dir,
        root_dir: root_dir.clone(),
        cgroup: None,
        done: false,
    };
    let limits = opts.bundle.limits;
    let cg = Cgroup::create(Path::new(CGROUP_ROOT), &id, &limits)?;
    let mut spec = opts.bundle.clone();
    spec.cgroups_path = cg.oci_path();
    guard.cgroup = Some(cg);
    if spec.rootfs == Rootfs::HostUsr {
        let skeleton = bundle::ensure_host_usr_skeleton(&opts.state_dir)?;
        bundle::write_bundle_shared(&spec, &bundle_dir, &skeleton)?;
    } else {
        bundle::write_bundle(&spec, &bundle_dir)?;
    }
    let readded_address = match &opts.net {
        Some(n) => n.ensure()?,
        None => false,
    };
    let workaround = match opts.root_ns_workaround {
        RootNsWorkaround::Always => true,
        RootNsWorkaround::Never => false,
        RootNsWorkaround::Auto => {
            process::root_ns_marker_visible(&spec.netns).map_err(|source| LaunchError::Netns {
                path: spec.netns.clone(),
                source,
            })?
        }
    };

    let mut cmd = Command::new(&opts.runsc);
    cmd.args(runsc_flags(
        &root_dir,
        opts.platform,
        &opts.extra_runsc_flags,
    ))
    .arg("run")
    .arg("--bundle")
    .arg(&bundle_dir)
    .arg(&id)
    .stdin(stdio.stdin)
    .stdout(stdio.stdout)
    .stderr(stdio.stderr);
    process::terminal_signals_for_runsc(&mut cmd, opts.forward_signals);
    if workaround {
        process::hide_root_ns_marker(&mut cmd);
    }
    let prepare = t0.elapsed();
    let t1 = Instant::now();
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        runsc: opts.runsc.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });

    let exited = Arc::new(AtomicBool::new(false));
    if opts.forward_signals {
        let exited = exited.clone();
        let (runsc, root, id) = (opts.runsc.clone(), root_dir.clone(), id.clone());
        // Not joined: it notices `exited` within one poll and must not delay the teardown.
        std::thread::spawn(move || {
            while !exited.load(Ordering::Acquire) {
                if let Some(sig) = process::wait_forwarded_signal(Duration::from_millis(100)) {
                    if exited.load(Ordering::Acquire) {
                        break;
                    }
                    // SIGINT, like a terminal's, goes to every process of the workload;
                    // SIGTERM and SIGHUP, like `docker stop`, to its first process.
                    let n = sig.to_string();
                    let mut args = vec!["kill"];
                    if sig == libc::SIGINT {
                        args.push("--all");
                    }
                    args.extend([id.as_str(), n.as_str()]);
                    if !runsc_bounded(&runsc, &root, &args, RUNSC_COMMAND_LIMIT)
                        && !exited.load(Ordering::Acquire)
                    {
                        // No container to signal yet (still starting) or runsc is stuck: stop
                        // the run. Until `exited` is set runsc is our child and its pid cannot
                        // be reused; the only window is between the waiter reaping it and the
                        // flag being set (microseconds), in which the pid would have to be
                        // recycled.
                        process::kill(pid, libc::SIGTERM);
                    }
                }
            }
        });
    }
    let deadline = opts.timeout.map(|t| t1 + t);
    let mut told_slow = false;
    let mut timed_out = false;
    let status = loop {
        let now = Instant::now();
        let mut wake = deadline.unwrap_or(now + Duration::from_secs(3600));
        if !told_slow {
            wake = wake.min(t1 + SLOW_START);
        }
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(r) => break r.ok(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !told_slow && t1.elapsed() >= SLOW_START {
            told_slow = true;
            if !sandbox_running(&root_dir) {
                progress(Progress::StillStarting(t1.elapsed()));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            // Ask runsc to stop the container; then make sure.
            let _ = runsc_bounded(
                &opts.runsc,
                &root_dir,
                &["kill", "--all", &id, "KILL"],
                RUNSC_COMMAND_LIMIT,
            );
            match rx.recv_timeout(KILL_GRACE) {
                Ok(r) => break r.ok(),
                Err(_) => {
                    process::kill(pid, libc::SIGKILL);
                    break rx.recv_timeout(KILL_GRACE).ok().and_then(Result::ok);
                }
            }
        }
    };
    exited.store(true, Ordering::Release);
    let run = t1.elapsed();
    progress(Progress::Exited(run));
    let events = guard
        .cgroup
        .as_ref()
        .map(Cgroup::events)
        .unwrap_or_default();
    let t2 = Instant::now();
    let leftovers = guard.cleanup();
    let cleanup = t2.elapsed();

    let code = status.map(code_of).unwrap_or(1);
    let termination = if timed_out {
        Termination::TimedOut(opts.timeout.unwrap_or_default())
    } else if events.oom_kills > 0 && code != 0 {
        Termination::MemoryLimit(limits.memory)
    } else if events.pids_max_hits > 0 && code != 0 {
        Termination::PidsLimit {
            limit: limits.pids,
            code,
        }
    } else {
        Termination::Exited(code)
    };
    Ok(RunReport {
        id,
        termination,
        events,
        limits,
        timings: Timings {
            prepare,
            run,
            cleanup,
        },
        readded_address,
        root_ns_workaround: workaround,
        leftovers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminations_map_to_exit_codes_and_messages() {
        let mem = Termination::MemoryLimit(Bytes(512 << 20));
        assert_eq!(mem.exit_code(), 137);
        assert_eq!(mem.to_string(), "killed: memory limit (512M) exceeded");
        let t = Termination::TimedOut(Duration::from_secs(60));
        assert_eq!(t.exit_code(), 124);
        assert_eq!(t.to_string(), "timed out after 60s");
        assert_eq!(Termination::Exited(3).exit_code(), 3);
        let pids = Termination::PidsLimit {
            limit: 100,
            code: 2,
        };
        assert_eq!(pids.exit_code(), 123);
        assert_eq!(
            pids.to_string(),
            "pids limit (100) reached: a fork was refused and the sandbox failed (exit 2)"
        );
        // The reserved statuses are distinct from each other.
        let reserved = [EXIT_PIDS, EXIT_TIMEOUT, EXIT_OOM];
        assert!(reserved
            .iter()
            .all(|a| reserved.iter().filter(|b| a == *b).count() == 1));
        assert_eq!(
            Termination::Exited(137).to_string(),
            "exited 137 (killed by signal 9)"
        );
    }

    #[test]
    fn runsc_runs_with_the_platform_its_own_network_stack_gro_and_gso_left_on() {
        let f = runsc_flags(Path::new("/run/x/root"), Platform::Systrap, &[]);
        let f: Vec<&str> = f.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(
            f,
            [
                "--root",
                "/run/x/root",
                "--platform",
                "systrap",
                "--network",
                "sandbox",
                "--gvisor-gro"
            ]
        );
        assert!(!f.iter().any(|a| a.contains("gso")));
        let extra = runsc_flags(Path::new("/r"), Platform::Ptrace, &["--debug".into()]);
        assert_eq!(extra.last().and_then(|a| a.to_str()), Some("--debug"));
        assert!(extra.iter().any(|a| a == "ptrace"));
    }

    #[test]
    fn run_ids_are_unique_and_path_safe() {
        let a = new_run_id();
        let b = new_run_id();
        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c.is_ascii_digit()));
    }

    #[test]
    fn durations_are_written_for_people() {
        assert_eq!(humanize(Duration::from_secs(60)), "60s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
    }
}
