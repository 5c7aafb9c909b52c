//! `snas run --policy TOKEN [--agent SOCKET | --prefix P --node N] [limits] -- CMD ARGS…`: the
//! main job.
//!
//! Where: with `--agent SOCKET`, on the node whose agent serves that API socket (a real node;
//! no testbed is involved, and the summary reads only the audit logs named by `--audit-log`);
//! otherwise on the local testbed (brought up on demand and left running), through node N's
//! agent. Either way it creates the job through the agent, runs CMD in a gVisor sandbox inside the job's network namespace (see
//! `snas-sandbox` and docs/sandbox.md), streams its stdout and stderr, then reads the job's
//! tier-1 drop counters and the audit lines the agent and the proxies wrote for the job,
//! deletes the job, prints a short egress summary on stderr, and exits with CMD's status.
//!
//! Exit codes: CMD's status (128 + signal when it was killed by one); 137 when the sandbox
//! exceeded its memory limit; 124 when it ran past `--timeout`; 123 when it failed after the
//! pids limit refused a fork; 125 when the job or the sandbox could not be set up (nothing
//! ran), including a runsc too old for the chosen platform.
//!
//! The platform is systrap unless `--platform` says otherwise; runsc's release is checked
//! before the job is created (and remembered in `<run dir>/runsc-release` while the binary
//! stays the same; the run directory is `<testbed state>/run` on the testbed, `--run-dir`
//! (default `/run/snas/run`) with `--agent`).
//!
//! Ctrl-C goes to the sandbox (runsc forwards it to CMD); `snas run` itself ignores it so
//! that it can still delete the job and clean up. SIGTERM and SIGHUP sent to `snas run` are
//! forwarded to the sandbox the same way; only SIGKILL leaves things behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use snas_agent::api::blocking::{AgentClient, OwnedJob};
use snas_policy::audit::{Action, AuditLine, Kind};
use snas_sandbox::bundle::{BundleSpec, Rootfs};
use snas_sandbox::launch::{self, humanize, Progress, RunOptions, Stdio3};
use snas_sandbox::limits::{parse_pids, Bytes, Limits, MilliCpus};
use snas_sandbox::netcfg::{NetConfig, NetConfig6};
use snas_sandbox::platform::{probe_kvm, Platform, RunscInfo, KVM_PROBE_TIMEOUT};
use snas_testbed::exec::read_token;
use snas_testbed::topology::{NODES, PROXIES};
use snas_testbed::{TestbedOptions, Topology, DEFAULT_PREFIX};
use snas_wire::JobKey;

/// How long the summary waits for the proxies' end-of-job lines after the job is deleted.
const JOB_END_WAIT: Duration = Duration::from_millis(1500);

/// Exit status when nothing could be run.
const EXIT_SETUP: u8 = 125;

/// `snas run`.
#[derive(Debug, Args)]
#[command(
    after_help = "Where the job runs: `--agent SOCKET` runs it on a real node through \
    that node agent's API socket (e.g. /run/snas/agent.sock; no testbed). Without it, \
    `--prefix`/`--node` pick a node of the local testbed, which is brought up if needed."
)]
pub struct RunArgs {
    /// Run on a real node: the node agent's API socket (its `api_socket`, e.g.
    /// /run/snas/agent.sock). Excludes --prefix/--node.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["prefix", "node"])]
    agent: Option<PathBuf>,
    /// Testbed name prefix (the testbed shortcut; not with --agent).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Testbed node whose agent creates the job (1 or 2; not with --agent).
    #[arg(long, default_value_t = 1)]
    node: u8,
    /// With --agent: an audit log (the agent's `audit_log`, a proxy's `audit_log`) the
    /// summary reads this job's lines from (repeatable). Default: none with --agent (the
    /// summary shows the tier-1 drop counters only); the testbed's logs otherwise.
    #[arg(long = "audit-log", value_name = "FILE", requires = "agent")]
    audit_logs: Vec<PathBuf>,
    /// With --agent: directory for runsc's state and memos.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/snas/run",
        requires = "agent"
    )]
    run_dir: PathBuf,
    /// Signed policy: the token itself, `@FILE`, or the path of a file holding it.
    #[arg(long)]
    policy: String,
    /// CPU share of the sandbox (CFS quota), e.g. 0.5.
    #[arg(long, default_value = "1", value_parser = MilliCpus::parse)]
    cpus: MilliCpus,
    /// Memory of the whole sandbox (sentry + workload), e.g. 256M.
    #[arg(long, default_value = "512M", value_parser = Bytes::parse)]
    memory: Bytes,
    /// Host tasks of the sandbox, runsc's own ~43 threads included.
    #[arg(long, default_value = "512", value_parser = parse_pids)]
    pids: u32,
    /// Kill the workload after this long (e.g. 60s, 5m) and exit 124. Default: no deadline.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// gVisor platform: systrap (needs runsc >= 20240729, see scripts/setup.sh), ptrace (any
    /// runsc, 6-30x slower system calls), or kvm (used only if a probe sandbox works; else
    /// systrap).
    #[arg(long, default_value = "systrap")]
    platform: Platform,
    /// Root filesystem directory (read-only) instead of the host's /usr.
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Host folder mounted read-write at /app (also the working directory).
    #[arg(long, value_name = "DIR")]
    app: Option<PathBuf>,
    /// Environment variable for CMD (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The runsc binary.
    #[arg(long, default_value = "runsc")]
    runsc: PathBuf,
    /// Do not print the egress summary.
    #[arg(long)]
    no_summary: bool,
    /// Print how long each phase took (job network, sandbox, teardown) on stderr.
    #[arg(long)]
    timings: bool,
    /// Command and arguments to run inside the sandbox.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs `snas run`.
pub fn run(a: RunArgs) -> ExitCode {
    match job(&a) {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("snas run: {msg}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

/// Makes sure the testbed's agent for `node` answers; brings the testbed up otherwise (and
/// leaves it up, like `snas testbed up`).
fn ensure_testbed(t: &Topology, prefix: &str, node: u8) -> Result<(), String> {
    if UnixStream::connect(t.agent_socket(node)).is_ok() {
        return Ok(());
    }
    eprintln!(
        "snas: bringing up the testbed {prefix} (it stays up; `snas testbed down` removes it)…"
    );
    let binary = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    snas_testbed::up_unguarded(&TestbedOptions::new(prefix, binary)).map_err(|e| {
        format!("bringing up the testbed: {e} (see `snas testbed status --prefix {prefix}`)")
    })?;
    Ok(())
}

/// Audit logs of the testbed with their current sizes, so that only this job's new lines
/// are read afterwards.
fn audit_logs(t: &Topology) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    for n in 1..=NODES {
        v.push(t.node_dir(n).join("state").join("audit.log"));
        v.push(t.node_dir(n).join("audit.log"));
    }
    for n in 1..=PROXIES {
        v.push(t.proxy_dir(n).join("audit.jsonl"));
    }
    with_sizes(v)
}

/// Each log with its current size (0 if it does not exist yet).
fn with_sizes(logs: Vec<PathBuf>) -> Vec<(PathBuf, u64)> {
    logs.into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect()
}

/// The job's new audit lines once every proxy that carried it has written the end of the job
/// (its `flow_end` lines come with that, after the agent's job-ended notice), or after `limit`.
fn lines_after_job_end(
    logs: &[(PathBuf, u64)],
    job_key: JobKey,
    limit: Duration,
) -> Vec<AuditLine> {
    let began = std::time::Instant::now();
    loop {
        let pending = logs.iter().any(|log| {
            let lines = new_lines(std::slice::from_ref(log), job_key);
            // A proxy that admitted a flow of the job holds state for it and answers the
            // job-ended notice with a `job` line.
            lines
                .iter()
                .any(|l| l.kind == Some(Kind::Flow) && l.action == Action::Allow)
                && !lines.iter().any(|l| l.kind == Some(Kind::Job))
        });
        if !pending || began.elapsed() >= limit {
            return new_lines(logs, job_key);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn new_lines(logs: &[(PathBuf, u64)], job_key: JobKey) -> Vec<AuditLine> {
    let mut out = Vec::new();
    for (p, from) in logs {
        let Ok(mut f) = std::fs::File::open(p) else {
            continue;
        };
        // A log truncated by rotation since: read it from the start.
        let start = match f.metadata() {
            Ok(m) if m.len() < *from => 0,
            _ => *from,
        };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_string(&mut text).is_err() {
            continue;
        }
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<AuditLine>(l).ok())
                .filter(|v| v.job_key == Some(job_key)),
        );
    }
    out
}

/// One row of the egress summary.
#[derive(Debug, Default)]
struct Row {
    /// Decisions per tier: a connection both tiers allowed is one decision of each, so the row
    /// counts the most any one tier took.
    per_tier: BTreeMap<u64, u64>,
    /// Bytes the row's flows moved from the job and toward it (the proxies' flow-end lines).
    bytes_out: u64,
    bytes_in: u64,
    /// Whether any flow of the row has ended (so its byte counts are known).
    ended: bool,
    /// Names the destination was resolved from (tier 1's events carry none; tier 2's do).
    names: std::collections::BTreeSet<String>,
    tiers: std::collections::BTreeSet<u64>,
    reasons: std::collections::BTreeSet<String>,
}

/// The egress summary from audit lines and tier-1 drop counters. Pure.
///
/// A row is a decision (`allow`, `deny`, `refuse`) about one destination (or DNS name) with how
/// often it was taken. Allowed flows also show the bytes they moved each way, from the proxies'
/// `flow_end` lines (written when a flow ends, at the latest when the job is deleted).
pub fn summarize(lines: &[AuditLine], drops: &BTreeMap<String, u64>) -> String {
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for l in lines {
        if l.kind == Some(Kind::Job) {
            continue;
        }
        let flow_end = l.kind == Some(Kind::FlowEnd);
        let dns = l.kind == Some(Kind::Dns);
        let action = if flow_end { Action::Allow } else { l.action };
        let action = action.name().to_owned();
        let host = l.hostname();
        let dst = l.dst.value().map(|d| d.to_string()).unwrap_or_default();
        // Flows are grouped by destination (both tiers' lines of one destination make one row;
        // the name comes from whichever line carries it), DNS lines by name and type.
        let what = if dns {
            let q = l.qtype.as_deref().unwrap_or("");
            format!("DNS {host} {q}").trim_end().to_owned()
        } else {
            let port = l.port.value().map(|p| format!("/{p}")).unwrap_or_default();
            format!("{dst} {}{port}", l.proto)
        };
        let row = rows.entry((action, what)).or_default();
        if !dns && !host.is_empty() {
            row.names.insert(host.to_owned());
        }
        let tier = u64::from(l.tier);
        row.tiers.insert(tier);
        if flow_end {
            row.bytes_out += l.bytes_out.unwrap_or(0);
            row.bytes_in += l.bytes_in.unwrap_or(0);
            row.ended = true;
            continue;
        }
        *row.per_tier.entry(tier).or_default() += 1;
        let r = l.reason();
        if !matches!(r, "allowed" | "new_flow" | "") {
            row.reasons.insert(r.to_owned());
        }
    }
    fold_dns_names(&mut rows);
    let mut s = String::new();
    if rows.is_empty() {
        s.push_str("  no audited egress\n");
    }
    for ((action, what), r) in &rows {
        let tiers: Vec<String> = r.tiers.iter().map(|t| t.to_string()).collect();
        let what = if r.names.is_empty() {
            what.clone()
        } else {
            let names: Vec<&str> = r.names.iter().map(String::as_str).collect();
            format!("{} ({what})", names.join(","))
        };
        let what = clip(&what, SUMMARY_WIDTH);
        let moved = if r.ended {
            format!(
                "{} out, {} in",
                super::human_bytes(r.bytes_out),
                super::human_bytes(r.bytes_in)
            )
        } else {
            String::new()
        };
        let _ = write!(
            s,
            "  {action:<7} {what:<48} {:>4}x {moved:>22}  tier {}",
            r.events(),
            tiers.join("+")
        );
        if !r.reasons.is_empty() {
            let reasons: Vec<&str> = r.reasons.iter().map(String::as_str).collect();
            let _ = write!(s, "  ({})", reasons.join(", "));
        }
        s.push('\n');
    }
    let nonzero: Vec<String> = drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if nonzero.is_empty() {
        s.push_str("  tier-1 drops: none\n");
    } else {
        let _ = writeln!(s, "  tier-1 drops: {}", nonzero.join(", "));
    }
    s
}

impl Row {
    /// How many times the row's decision was taken (by the tier that took it most often).
    fn events(&self) -> u64 {
        self.per_tier.values().copied().max().unwrap_or(0)
    }
}

/// Width of the destination column of the summary; longer names (DNS tunnelling makes very
/// long ones) are cut with an ellipsis.
const SUMMARY_WIDTH: usize = 48;

/// `s` cut to `width` characters, the last one an ellipsis when cut.
fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Most DNS rows shown per action; the rest (DNS tunnelling makes thousands of names) are
/// folded into one row.
const DNS_ROWS: usize = 6;

fn fold_dns_names(rows: &mut BTreeMap<(String, String), Row>) {
    let mut by_action: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for ((action, what), r) in rows.iter() {
        if what.starts_with("DNS ") {
            by_action
                .entry(action.clone())
                .or_default()
                .push((what.clone(), r.events()));
        }
    }
    for (action, mut names) in by_action {
        if names.len() <= DNS_ROWS {
            continue;
        }
        // Keep the most frequent names; fold the rest.
        names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let folded: Vec<String> = names.split_off(DNS_ROWS).into_iter().map(|n| n.0).collect();
        let mut merged = Row::default();
        for what in &folded {
            if let Some(r) = rows.remove(&(action.clone(), what.clone())) {
                for (t, n) in r.per_tier {
                    *merged.per_tier.entry(t).or_default() += n;
                }
                merged.tiers.extend(r.tiers);
                merged.reasons.extend(r.reasons);
            }
        }
        rows.insert(
            (action, format!("DNS {} other names", folded.len())),
            merged,
        );
    }
}

fn counters(client: &AgentClient, job_key: &str) -> Option<BTreeMap<String, u64>> {
    client.counters(job_key).ok().map(|c| c.drops)
}

/// The sandbox's stream for our fd 1 or 2: inherited, unless it is a regular file. gVisor
/// writes a shared regular file at its own offset and would overwrite what we wrote (e.g.
/// `snas run … > log 2>&1`), so then the output goes through a pipe and a copier thread that
/// writes at the file's shared offset.
fn stream(fd: u8) -> Result<(Stdio, Option<std::thread::JoinHandle<()>>), String> {
    let is_file = std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| m.is_file());
    if !is_file {
        return Ok((Stdio::inherit(), None));
    }
    let (mut r, w) = snas_sandbox::process::pipe().map_err(|e| format!("pipe: {e}"))?;
    // Lock per chunk, never across a read: our own messages (progress) share these streams.
    let copier = std::thread::spawn(move || {
        use std::io::Write;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let _ = if fd == 1 {
                std::io::stdout()
                    .write_all(chunk)
                    .and_then(|()| std::io::stdout().flush())
            } else {
                std::io::stderr().write_all(chunk)
            };
        }
    });
    Ok((Stdio::from(w), Some(copier)))
}

/// What the teardown thread found.
#[derive(Debug, Default)]
struct Teardown {
    drops: Option<BTreeMap<String, u64>>,
    delete_error: Option<String>,
    took: Duration,
}

/// Reads the job's counters, then deletes it.
fn delete_job(guard: OwnedJob) -> Teardown {
    let t = Instant::now();
    let drops = counters(guard.client(), &guard.view().job_key.to_string());
    let delete_error = guard.delete().err().map(|e| e.to_string());
    Teardown {
        drops,
        delete_error,
        took: t.elapsed(),
    }
}

/// Chooses the platform and checks that runsc has it: the one asked for, or for kvm the
/// probe's verdict. A failed probe is remembered in `<scratch>/kvm-unusable` (a hang costs the
/// probe's whole deadline); delete the file to probe again, e.g. after a kernel or runsc
/// update. Without KVM the sandbox runs on systrap, or on ptrace where runsc predates systrap.
fn choose_platform(a: &RunArgs, scratch: &Path) -> Result<Platform, String> {
    let _ = std::fs::create_dir_all(scratch);
    let runsc =
        RunscInfo::probe(&a.runsc, Some(&scratch.join(RUNSC_MEMO))).map_err(|e| e.to_string())?;
    if a.platform != Platform::Kvm {
        runsc.check(a.platform).map_err(|e| e.to_string())?;
        return Ok(a.platform);
    }
    let fallback = if runsc.check(Platform::Systrap).is_ok() {
        Platform::Systrap
    } else {
        Platform::Ptrace
    };
    let memo = scratch.join("kvm-unusable");
    if let Ok(why) = std::fs::read_to_string(&memo) {
        eprintln!(
            "snas: kvm was found unusable here ({}); using {fallback} (delete {} to probe again)",
            why.trim(),
            memo.display()
        );
        return Ok(fallback);
    }
    match probe_kvm(&a.runsc, &scratch.join("kvm-probe"), KVM_PROBE_TIMEOUT) {
        Ok(()) => Ok(Platform::Kvm),
        Err(e) => {
            eprintln!("snas: kvm is not usable here ({e}); using {fallback}");
            let _ = std::fs::write(&memo, format!("{e}\n"));
            Ok(fallback)
        }
    }
}

/// Where the job runs: a node agent named by its socket, or a testbed node.
#[derive(Debug)]
enum Target {
    Agent(PathBuf),
    Testbed(Topology),
}

impl Target {
    fn of(a: &RunArgs) -> Result<Target, String> {
        if let Some(socket) = &a.agent {
            return Ok(Target::Agent(socket.clone()));
        }
        let t = Topology::new(&a.prefix).map_err(|e| e.to_string())?;
        if !(1..=NODES).contains(&a.node) {
            return Err(format!(
                "--node {}: the testbed has nodes 1 to {NODES}",
                a.node
            ));
        }
        Ok(Target::Testbed(t))
    }

    /// For messages: `agent /run/snas/agent.sock` or `node 1`.
    fn label(&self, a: &RunArgs) -> String {
        match self {
            Target::Agent(s) => format!("agent {}", s.display()),
            Target::Testbed(_) => format!("node {}", a.node),
        }
    }

    /// runsc's state and the memos.
    fn scratch(&self, a: &RunArgs) -> PathBuf {
        match self {
            Target::Agent(_) => a.run_dir.clone(),
            Target::Testbed(t) => t.state_dir().join("run"),
        }
    }

    /// The agent's socket (the testbed brought up if needed) and the audit logs to read, with
    /// their sizes now.
    fn prepare(&self, a: &RunArgs) -> Result<(PathBuf, Vec<(PathBuf, u64)>), String> {
        match self {
            Target::Agent(s) => Ok((s.clone(), with_sizes(a.audit_logs.clone()))),
            Target::Testbed(t) => {
                ensure_testbed(t, &a.prefix, a.node)?;
                Ok((t.agent_socket(a.node), audit_logs(t)))
            }
        }
    }
}

/// The memo of runsc's release, in the run directory.
const RUNSC_MEMO: &str = "runsc-release";

/// The job's IPv6 address and gateway as the sandbox's network must keep them (runsc takes
/// the namespace's addresses; [`NetConfig::ensure`] puts them back), for a dual-stack job.
fn ipv6_of(info: &snas_agent::api::JobView) -> Option<NetConfig6> {
    info.sandbox_ip6
        .zip(info.gateway_ip6)
        .map(|(addr, gateway)| NetConfig6 { addr, gateway })
}

fn job(a: &RunArgs) -> Result<u8, String> {
    // Before any thread exists: SIGTERM/SIGHUP stay pending until the launcher forwards them
    // to the sandbox, so a terminated `snas run` still deletes its job and cleans up.
    snas_sandbox::process::block_forwarded_signals().map_err(|e| format!("signal mask: {e}"))?;
    let target = Target::of(a)?;
    let token = read_token(&a.policy).map_err(|e| e.to_string())?;
    let scratch = target.scratch(a);
    // Before the job exists: a runsc that cannot run the platform leaves nothing to undo.
    let platform = choose_platform(a, &scratch)?;

    let t_net = Instant::now();
    let (socket, logs) = target.prepare(a)?;
    let client = AgentClient::new(socket);
    let guard = OwnedJob::create(client, &token)
        .map_err(|e| format!("creating the job on {}: {e}", target.label(a)))?;
    let net_time = t_net.elapsed();
    let info = guard.view().clone();
    // The sandbox's network is IPv4 (the job pool is).
    let v4 = |what: &str, ip: IpAddr| match ip {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(_) => Err(format!("agent answered an IPv6 {what} {ip}")),
    };
    let sandbox_ip = v4("sandbox_ip", info.sandbox_ip)?;
    let gateway_ip = v4("gateway_ip", info.gateway_ip)?;
    let resolver = v4("dns_ip", info.resolver())?;

    let mut spec = BundleSpec::new(a.command.clone(), info.netns_path.clone(), String::new());
    spec.env = a.env.clone();
    spec.hostname = info
        .job
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(63)
        .collect();
    if spec.hostname.is_empty() {
        spec.hostname = "sandbox".into();
    }
    spec.nameservers = vec![resolver];
    spec.limits = Limits {
        cpus: a.cpus,
        memory: a.memory,
        pids: a.pids,
    };
    let absolute = |flag: &str, p: &Path| {
        std::fs::canonicalize(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
    };
    if let Some(r) = &a.rootfs {
        spec.rootfs = Rootfs::Dir(absolute("--rootfs", r)?);
    }
    if let Some(app) = &a.app {
        spec.app_dir = Some(absolute("--app", app)?);
        spec.cwd = "/app".into();
    }
    let mut opts = RunOptions::new(spec);
    opts.runsc = a.runsc.clone();
    opts.platform = platform;
    opts.runsc_memo = Some(scratch.join(RUNSC_MEMO));
    opts.state_dir = scratch.join("sandbox");
    opts.timeout = a.timeout;
    opts.forward_signals = true;
    opts.net = Some(NetConfig {
        netns: info.netns_path.clone(),
        iface: "eth0".into(),
        addr: sandbox_ip,
        prefix_len: 30,
        gateway: gateway_ip,
        ipv6: ipv6_of(&info),
    });

    snas_sandbox::process::shield_terminal_signals();
    let (out_stdio, out_copy) = stream(1)?;
    let (err_stdio, err_copy) = stream(2)?;
    let stdio = Stdio3 {
        stdin: Stdio::inherit(),
        stdout: out_stdio,
        stderr: err_stdio,
    };
    // When runsc has exited, read the counters and delete the job on a thread while the
    // launcher cleans the sandbox up: the two do not depend on each other.
    let mut guard = Some(guard);
    let mut teardown: Option<(Instant, std::thread::JoinHandle<Teardown>)> = None;
    let report = launch::run(&opts, stdio, &mut |p| match p {
        Progress::StillStarting(d) => eprintln!(
            "snas: starting the gVisor sandbox ({}, {})…",
            opts.platform,
            humanize(d)
        ),
        Progress::Exited(_) => {
            if let Some(g) = guard.take() {
                teardown = Some((Instant::now(), std::thread::spawn(move || delete_job(g))));
            }
        }
    })
    .map_err(|e| format!("sandbox: {e}"))?;
    let sandbox_time = report.timings.prepare + report.timings.run;
    for c in [out_copy, err_copy].into_iter().flatten() {
        let _ = c.join();
    }

    let (t_down, td) = match teardown.take() {
        Some((t, h)) => (t, h.join().unwrap_or_default()),
        None => (
            Instant::now(),
            guard.take().map(delete_job).unwrap_or_default(),
        ),
    };
    if let Some(e) = &td.delete_error {
        eprintln!("snas run: deleting the job failed: {e}");
    }
    let drops = td.drops;
    // The proxies write a flow's byte counts when it ends: at the latest when the agent tells
    // them the job ended (just now, on delete). Waiting for that only matters for the summary.
    let lines = if a.no_summary {
        Vec::new()
    } else {
        lines_after_job_end(&logs, info.job_key, JOB_END_WAIT)
    };
    let down_time = t_down.elapsed();

    let term = report.termination;
    if !matches!(term, launch::Termination::Exited(_)) {
        eprintln!("snas: {term}");
    }
    for n in report.notes() {
        eprintln!("snas: {n}");
    }
    for l in &report.leftovers {
        eprintln!("snas: cleanup could not remove {l}");
    }
    if !a.no_summary {
        let mut s = format!(
            "snas: job {} (key {}) on {}, gVisor {}: {} after {}; egress:\n",
            info.job,
            info.job_key,
            target.label(a),
            opts.platform,
            term,
            humanize(report.timings.run)
        );
        match &drops {
            Some(d) => s.push_str(&summarize(&lines, d)),
            None => {
                s.push_str(&summarize(&lines, &BTreeMap::new()));
                s.push_str("  (tier-1 counters unavailable)\n");
            }
        }
        eprint!("{s}");
    }
    if a.timings {
        eprintln!(
            "snas: timings: job-network {:.1} ms, sandbox {:.1} ms (prepare {:.1}, runsc {:.1}), teardown {:.1} ms (sandbox cleanup {:.1} in parallel with job counters + delete {:.1})",
            ms(net_time),
            ms(sandbox_time),
            ms(report.timings.prepare),
            ms(report.timings.run),
            ms(down_time),
            ms(report.timings.cleanup),
            ms(td.took)
        );
    }
    Ok(u8::try_from(term.exit_code()).unwrap_or(1))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Audit lines as the logs hold them (read with the reader's type).
    fn lines_of(v: Vec<serde_json::Value>) -> Vec<AuditLine> {
        v.into_iter()
            .map(|l| serde_json::from_value(l).unwrap())
            .collect()
    }

    #[test]
    fn summary_groups_by_decision_and_destination() {
        let lines = lines_of(vec![
            json!({"tier":1,"action":"allow","job_key":"00000000000000ab","proto":"tcp","dst":"203.0.113.10","port":80,"hostname":null,"reason":"new_flow","bytes":0}),
            json!({"tier":2,"action":"allow","job_key":"00000000000000ab","proto":"tcp","dst":"203.0.113.10","port":80,"hostname":"api.example.com","reason":"allowed","bytes":60}),
            json!({"tier":1,"action":"deny","job_key":"00000000000000ab","proto":"tcp","dst":"203.0.113.20","port":80,"hostname":null,"reason":"policy_no_match","bytes":60}),
            json!({"tier":1,"kind":"dns","action":"refuse","job_key":"00000000000000ab","proto":"udp","hostname":"nothere.example.org","qtype":"A","reason":"dns_refused","bytes":40}),
        ]);
        let drops = BTreeMap::from([("policy_no_match".to_owned(), 3), ("ttl".to_owned(), 0)]);
        let s = summarize(&lines, &drops);
        let allow = s.lines().find(|l| l.contains("api.example.com")).unwrap();
        // Tier 1's event (no name) and tier 2's (with the name) are one row.
        assert!(
            allow.contains("allow   api.example.com (203.0.113.10 tcp/80)") && allow.contains("1x"),
            "{s}"
        );
        assert!(!allow.contains("new_flow"), "{allow}");
        // Byte counts come only from flow ends: none yet, so none shown (not the first packet's).
        assert!(!allow.contains(" B"), "{allow}");
        assert!(allow.contains("tier 1+2"));
        let deny = s.lines().find(|l| l.contains("203.0.113.20")).unwrap();
        assert!(deny.contains("deny") && deny.contains("(policy_no_match)"));
        assert!(s.contains("refuse  DNS nothere.example.org A"));
        assert!(s.contains("tier-1 drops: policy_no_match 3\n"));
        assert!(!s.contains("ttl"));
    }

    #[test]
    fn allowed_rows_show_the_bytes_their_flows_moved_each_way() {
        let dest = json!({"job_key":"00000000000000ab","proto":"tcp","dst":"203.0.113.40","port":5201,"hostname":"bulk.example.com"});
        let with = |extra: serde_json::Value| {
            let mut v = dest.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let lines = lines_of(vec![
            with(json!({"tier":2,"kind":"flow","action":"allow","bytes":60})),
            with(json!({"tier":2,"kind":"flow","action":"allow","bytes":60})),
            with(
                json!({"tier":2,"kind":"flow_end","action":"end","bytes_out":4_000,"bytes_in":1_000_000,"bytes":1_004_000}),
            ),
            with(
                json!({"tier":2,"kind":"flow_end","action":"end","bytes_out":812,"bytes_in":500_000,"bytes":500_812}),
            ),
            json!({"tier":2,"kind":"job","action":"end","job_key":"00000000000000ab","flows":2}),
        ]);
        let s = summarize(&lines, &BTreeMap::new());
        let rows: Vec<&str> = s
            .lines()
            .filter(|l| l.contains("bulk.example.com"))
            .collect();
        assert_eq!(rows.len(), 1, "{s}");
        assert!(
            rows[0].contains("2x") && rows[0].contains("4.8 kB out, 1.5 MB in"),
            "{s}"
        );
        assert!(!s.contains("end "), "{s}");
    }

    #[test]
    fn many_refused_dns_names_are_folded_into_one_row() {
        let lines = lines_of((0..20)
            .map(|i| json!({"tier":1,"kind":"dns","action":"refuse","job_key":"00000000000000ab","hostname":format!("x{i}.example.org"),"qtype":"A","reason":"dns_refused","bytes":10}))
            .collect());
        let s = summarize(&lines, &BTreeMap::new());
        let refuse_rows = s.lines().filter(|l| l.contains("refuse")).count();
        assert_eq!(refuse_rows, DNS_ROWS + 1, "{s}");
        let folded = s.lines().find(|l| l.contains("other names")).unwrap();
        assert!(
            folded.contains("DNS 14 other names") && folded.contains("14x"),
            "{folded}"
        );
    }

    #[test]
    fn summary_without_events_says_so() {
        let s = summarize(&[], &BTreeMap::new());
        assert!(s.contains("no audited egress"));
        assert!(s.contains("tier-1 drops: none"));
    }
}
