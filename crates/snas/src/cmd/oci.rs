//! `snas oci`: a runc-compatible runtime for containerd (and so Kubernetes) that runs each
//! container in gVisor inside its job's network.
//!
//! containerd's runc shim (`io.containerd.runc.v2`) runs it as `BinaryName` (a symlink named
//! `snas-oci` to `snas`, or a script `exec snas oci "$@"`), with runc's command line:
//! `[global flags] create|start|state|kill|delete|… [flags] ID`. Every command is handed to
//! runsc with the same global flags (`--root`, `--log`, `--log-format`, `--debug`,
//! `--systemd-cgroup`) plus gVisor's own (`--platform`, `--network sandbox`, see
//! `snas_sandbox::launch::runsc_flags`). Two commands do more:
//!
//! - **create**: reads the job's signed policy from the OCI annotation `snas.dev/policy` of the
//!   bundle's `config.json` (containerd passes pod annotations through with the runtime
//!   handler's `pod_annotations`), asks the node agent for the job network (`POST /v1/jobs` on
//!   its API socket, the API `snas run` uses), points the spec's network namespace
//!   (`linux.namespaces[type=network].path`) at the job's namespace, remembers the job under
//!   the container's id, and runs `runsc create` (in the private mount namespace that hides the
//!   root-namespace marker where needed, docs/sandbox.md). A container without the annotation
//!   is refused: nothing runs with an unaudited network. The other containers of a Kubernetes
//!   pod (`io.kubernetes.cri.container-type: container`) join their pod's sandbox, whose job
//!   network they share: no job of their own.
//! - **start**: `runsc start` where the root-namespace marker is hidden (the sandbox brings
//!   its network up now).
//! - **delete**: `runsc delete`, then deletes the job (`DELETE /v1/jobs/{key}`) and forgets it
//!   — once the container is gone (a refused delete of a running container keeps its network).
//!   A job is also deleted when `runsc create` fails.
//!
//! `run` and `restore` are refused (containerd uses create + start). `features` answers from
//! runsc if it knows the command, else with the OCI versions it supports. `--version` prints
//! ours and runsc's.
//!
//! # Settings (environment, for the shim's process)
//! `SNAS_OCI_AGENT` (default `/run/snas/agent.sock`), `SNAS_OCI_RUNSC` (default `runsc`),
//! `SNAS_OCI_PLATFORM` (default `systrap`), `SNAS_OCI_STATE` (default `/run/snas/oci`: one file
//! per container naming its job).
//!
//! # Errors
//! Messages go to stderr and, when containerd passed `--log`, into that file as a runc-style
//! JSON line (`{"level":"error","msg":…}`), which the shim reports as the cause of a failure.
//! Exit status 1, or runsc's.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use snas_agent::api::blocking::AgentClient;
use snas_sandbox::netcfg::{NetConfig, NetConfig6};
use snas_sandbox::platform::Platform;

/// The annotation carrying the job's signed policy (a compact JWS).
pub const POLICY_ANNOTATION: &str = "snas.dev/policy";

/// containerd CRI's annotation telling a pod's sandbox from its other containers.
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// runc's global flags that take a value (passed on to runsc).
const GLOBAL_WITH_VALUE: [&str; 4] = ["--root", "--log", "--log-format", "--criu"];
/// runc's global flags without a value; `--debug` and `--systemd-cgroup` are passed on.
const GLOBAL_SWITCHES: [&str; 3] = ["--debug", "--systemd-cgroup", "--rootless"];

/// The parsed command line: global flags, then the command and its arguments.
#[derive(Debug, Default, PartialEq, Eq)]
struct Invocation {
    /// Global flags for runsc, in order.
    globals: Vec<String>,
    root: Option<PathBuf>,
    log: Option<PathBuf>,
    command: String,
    args: Vec<String>,
}

fn parse(argv: &[String]) -> Result<Invocation, String> {
    let mut inv = Invocation::default();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        // runc accepts `-root` as well as `--root`.
        let long = if name.starts_with("--") {
            name.to_owned()
        } else if name.starts_with('-') && name.len() > 2 {
            format!("-{name}")
        } else {
            name.to_owned()
        };
        if GLOBAL_WITH_VALUE.contains(&long.as_str()) {
            let v = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    argv.get(i)
                        .cloned()
                        .ok_or(format!("{long} needs a value"))?
                }
            };
            match long.as_str() {
                "--root" => inv.root = Some(PathBuf::from(&v)),
                "--log" => inv.log = Some(PathBuf::from(&v)),
                _ => {}
            }
            if long != "--criu" {
                inv.globals.push(format!("{long}={v}"));
            }
        } else if GLOBAL_SWITCHES.contains(&long.as_str()) {
            if long != "--rootless" {
                inv.globals.push(long);
            }
        } else if a.starts_with('-') && a != "-" {
            // --version, --help: handled by the caller as commands.
            inv.command = a.clone();
            inv.args = argv[i + 1..].to_vec();
            return Ok(inv);
        } else {
            inv.command = a.clone();
            inv.args = argv[i + 1..].to_vec();
            return Ok(inv);
        }
        i += 1;
    }
    Err("no command (create, start, state, kill, delete, …)".into())
}

/// `--bundle B` / `-b B` / `--bundle=B` of `create`, and the container id (the last operand).
fn bundle_and_id(args: &[String]) -> Result<(PathBuf, String), String> {
    let mut bundle = None;
    let mut i = 0;
    let mut operands = Vec::new();
    // create's flags that take a value (runc 1.1).
    const WITH_VALUE: [&str; 4] = [
        "--bundle",
        "--pid-file",
        "--console-socket",
        "--preserve-fds",
    ];
    while i < args.len() {
        let a = args[i].as_str();
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n, Some(v)),
            _ => (a, None),
        };
        let long = match name {
            "-b" | "-bundle" => "--bundle",
            "-pid-file" => "--pid-file",
            "-console-socket" => "--console-socket",
            n => n,
        };
        if WITH_VALUE.contains(&long) {
            let v = match inline {
                Some(v) => v.to_owned(),
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or(format!("{long} needs a value"))?
                }
            };
            if long == "--bundle" {
                bundle = Some(PathBuf::from(v));
            }
        } else if !a.starts_with('-') {
            operands.push(a.to_owned());
        }
        i += 1;
    }
    let id = operands.pop().ok_or("create: no container id")?;
    // runc's default bundle is the working directory.
    let bundle = match bundle {
        Some(b) => b,
        None => std::env::current_dir().map_err(|e| format!("working directory: {e}"))?,
    };
    Ok((bundle, id))
}

/// What to do with a bundle's spec, from its annotations.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// A sandbox (or a plain container): make a job from this token.
    Job(String),
    /// A Kubernetes pod's further container: it joins the pod's sandbox and its job network.
    JoinsPod,
    /// No policy: refused.
    Refused,
}

fn admission(spec: &serde_json::Value) -> Admission {
    let ann = &spec["annotations"];
    if ann[CRI_CONTAINER_TYPE].as_str() == Some("container") {
        return Admission::JoinsPod;
    }
    match ann[POLICY_ANNOTATION].as_str().map(str::trim) {
        Some(t) if !t.is_empty() => Admission::Job(t.to_owned()),
        _ => Admission::Refused,
    }
}

/// Points the spec's network namespace at `netns` (adding the entry if the spec has none).
fn set_network_namespace(spec: &mut serde_json::Value, netns: &Path) -> Result<(), String> {
    let entry = serde_json::json!({"type": "network", "path": netns});
    let linux = spec
        .as_object_mut()
        .ok_or("config.json is not an object")?
        .entry("linux")
        .or_insert_with(|| serde_json::json!({}));
    let namespaces = linux
        .as_object_mut()
        .ok_or("config.json: `linux` is not an object")?
        .entry("namespaces")
        .or_insert_with(|| serde_json::json!([]));
    let list = namespaces
        .as_array_mut()
        .ok_or("config.json: `linux.namespaces` is not a list")?;
    list.retain(|n| n["type"].as_str() != Some("network"));
    list.push(entry);
    Ok(())
}

/// Settings from the environment.
#[derive(Debug)]
struct Settings {
    agent: PathBuf,
    runsc: PathBuf,
    platform: Platform,
    state: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        let platform = var("SNAS_OCI_PLATFORM", "systrap");
        Ok(Settings {
            agent: PathBuf::from(var("SNAS_OCI_AGENT", "/run/snas/agent.sock")),
            runsc: PathBuf::from(var("SNAS_OCI_RUNSC", "runsc")),
            platform: platform
                .parse()
                .map_err(|e| format!("SNAS_OCI_PLATFORM={platform}: {e}"))?,
            state: PathBuf::from(var("SNAS_OCI_STATE", "/run/snas/oci")),
        })
    }

    /// The file remembering the job of container `id` under runtime root `root`.
    fn job_file(&self, root: Option<&Path>, id: &str) -> PathBuf {
        let root = root
            .map(|r| r.display().to_string().replace('/', "_"))
            .unwrap_or_default();
        self.state.join(format!("{root}--{id}.job"))
    }
}

/// The runsc command for `inv`'s globals and `command args`.
fn runsc(s: &Settings, inv: &Invocation, command: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(&s.runsc);
    // runsc_flags puts --root first; containerd's --root (also in globals) wins as runsc reads
    // the last occurrence.
    let root = inv
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/runsc"));
    cmd.args(snas_sandbox::launch::runsc_flags(&root, s.platform, &[]));
    cmd.args(inv.globals.iter().filter(|g| !g.starts_with("--root=")));
    cmd.arg(command).args(args);
    cmd
}

/// Reports `msg` on stderr and in containerd's runtime log.
fn fail(inv: Option<&Invocation>, msg: &str) -> ExitCode {
    eprintln!("snas oci: {msg}");
    if let Some(log) = inv.and_then(|i| i.log.as_ref()) {
        let line = serde_json::json!({
            "level": "error",
            "msg": format!("snas oci: {msg}"),
            "time": snas_policy::audit::rfc3339_millis(std::time::SystemTime::now()),
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    ExitCode::from(1)
}

fn code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let c = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

/// Runs `snas oci ARGS…` (everything after `oci`, as runc's command line).
pub fn run(argv: Vec<OsString>) -> ExitCode {
    let argv: Vec<String> = argv
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let inv = match parse(&argv) {
        Ok(i) => i,
        Err(e) => return fail(None, &e),
    };
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return fail(Some(&inv), &e),
    };
    match inv.command.as_str() {
        "--version" | "-v" | "version" => version(&s),
        "--help" | "-h" | "help" => {
            println!("snas oci: runc-compatible runtime running containers in gVisor inside their SNAS job network (docs/oci.md). Settings: SNAS_OCI_AGENT, SNAS_OCI_RUNSC, SNAS_OCI_PLATFORM, SNAS_OCI_STATE.");
            ExitCode::SUCCESS
        }
        "create" => create(&s, &inv),
        "delete" => delete(&s, &inv),
        "run" | "restore" => fail(
            Some(&inv),
            &format!("`{}` is not supported: use create and start", inv.command),
        ),
        "features" => features(&s, &inv),
        "start" => start(&s, &inv),
        other => {
            // start, state, kill, ps, exec, pause, resume, update, events, list, spec: runsc's.
            let err = runsc(&s, &inv, other, &inv.args).exec();
            fail(Some(&inv), &format!("{}: {err}", s.runsc.display()))
        }
    }
}

fn version(s: &Settings) -> ExitCode {
    println!("snas-oci version {}", env!("CARGO_PKG_VERSION"));
    println!("spec: 1.0.2");
    match Command::new(&s.runsc).arg("--version").output() {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("runsc: {e}"),
    }
    ExitCode::SUCCESS
}

fn features(s: &Settings, inv: &Invocation) -> ExitCode {
    match runsc(s, inv, "features", &[]).output() {
        Ok(o) if o.status.success() => {
            let _ = std::io::stdout().write_all(&o.stdout);
            ExitCode::SUCCESS
        }
        _ => {
            println!(
                "{}",
                serde_json::json!({"ociVersionMin": "1.0.0", "ociVersionMax": "1.0.2"})
            );
            ExitCode::SUCCESS
        }
    }
}

/// The job remembered for a container.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JobRecord {
    job_key: String,
    netns_path: PathBuf,
    agent: PathBuf,
}

fn create(s: &Settings, inv: &Invocation) -> ExitCode {
    let (bundle, id) = match bundle_and_id(&inv.args) {
        Ok(x) => x,
        Err(e) => return fail(Some(inv), &e),
    };
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value = match std::fs::read(&config)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return fail(Some(inv), &format!("{}: {e}", config.display())),
    };
    let token = match admission(&spec) {
        Admission::JoinsPod => return passthrough_create(s, inv, None),
        Admission::Refused => {
            return fail(
                Some(inv),
                &format!(
                    "container {id}: no `{POLICY_ANNOTATION}` annotation (the job's signed policy): refused"
                ),
            )
        }
        Admission::Job(t) => t,
    };
    let client = AgentClient::new(&s.agent);
    let job = match client.create_job(&token) {
        Ok(j) => j,
        Err(e) => {
            return fail(
                Some(inv),
                &format!(
                    "container {id}: the agent at {} refused the job: {e}",
                    s.agent.display()
                ),
            )
        }
    };
    let record = JobRecord {
        job_key: job.job_key.to_string(),
        netns_path: job.netns_path.clone(),
        agent: s.agent.clone(),
    };
    let file = s.job_file(inv.root.as_deref(), &id);
    // From here on, a failure deletes the job again.
    let undo = |msg: String| {
        let _ = client.delete_job(&record.job_key);
        let _ = std::fs::remove_file(&file);
        fail(Some(inv), &msg)
    };
    let saved = std::fs::create_dir_all(&s.state)
        .and_then(|()| {
            let body = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
            std::fs::write(&file, body)
        })
        .map_err(|e| format!("{}: {e}", file.display()));
    if let Err(e) = saved {
        return undo(e);
    }
    if let Err(e) = set_network_namespace(&mut spec, &job.netns_path) {
        return undo(e);
    }
    let written = serde_json::to_vec_pretty(&spec)
        .map_err(std::io::Error::other)
        .and_then(|b| {
            let tmp = bundle.join(".config.json.snas");
            std::fs::write(&tmp, b)?;
            std::fs::rename(&tmp, &config)
        });
    if let Err(e) = written {
        return undo(format!("{}: {e}", config.display()));
    }
    // The namespace as runsc must find it (address and default route).
    let (std::net::IpAddr::V4(addr), std::net::IpAddr::V4(gateway)) =
        (job.sandbox_ip, job.gateway_ip)
    else {
        return undo("the agent answered IPv6 addresses; the sandbox network is IPv4".into());
    };
    let net = NetConfig {
        netns: job.netns_path.clone(),
        iface: job.sandbox_ifname.clone(),
        addr,
        prefix_len: job.prefix_len,
        gateway,
        ipv6: job
            .sandbox_ip6
            .zip(job.gateway_ip6)
            .map(|(addr, gateway)| NetConfig6 { addr, gateway }),
    };
    if let Err(e) = net.ensure() {
        return undo(e.to_string());
    }
    tracing::info!(container = %id, job = %job.job, job_key = %record.job_key, netns = %job.netns_path.display(), "job network for container");
    match passthrough_create(s, inv, Some(&job.netns_path)) {
        c if c == ExitCode::SUCCESS => c,
        c => {
            let _ = client.delete_job(&record.job_key);
            let _ = std::fs::remove_file(&file);
            c
        }
    }
}

/// `runsc create` with the original arguments, hiding the root-namespace marker when the job's
/// namespace shows it (docs/sandbox.md).
fn passthrough_create(s: &Settings, inv: &Invocation, netns: Option<&Path>) -> ExitCode {
    let mut cmd = runsc(s, inv, "create", &inv.args);
    if let Some(ns) = netns {
        match snas_sandbox::process::root_ns_marker_visible(ns) {
            Ok(true) => snas_sandbox::process::hide_root_ns_marker(&mut cmd),
            Ok(false) => {}
            Err(e) => return fail(Some(inv), &format!("entering {}: {e}", ns.display())),
        }
    }
    match cmd.status() {
        Ok(st) => code(st),
        Err(e) => fail(Some(inv), &format!("{}: {e}", s.runsc.display())),
    }
}

/// The last operand of a command (its container id).
fn container_id(args: &[String]) -> String {
    args.iter()
        .rev()
        .find(|a| !a.starts_with('-'))
        .cloned()
        .unwrap_or_default()
}

/// The job remembered for container `id`, if it has one.
fn job_record(s: &Settings, inv: &Invocation, id: &str) -> Option<JobRecord> {
    std::fs::read(s.job_file(inv.root.as_deref(), id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// `runsc start`: the sandbox's network is brought up now, so it too runs where the
/// root-namespace marker is hidden when the job's namespace shows it.
fn start(s: &Settings, inv: &Invocation) -> ExitCode {
    let id = container_id(&inv.args);
    let mut cmd = runsc(s, inv, "start", &inv.args);
    if let Some(rec) = job_record(s, inv, &id) {
        match snas_sandbox::process::root_ns_marker_visible(&rec.netns_path) {
            Ok(true) => snas_sandbox::process::hide_root_ns_marker(&mut cmd),
            Ok(false) => {}
            Err(e) => {
                return fail(
                    Some(inv),
                    &format!("entering {}: {e}", rec.netns_path.display()),
                )
            }
        }
    }
    let err = cmd.exec();
    fail(Some(inv), &format!("{}: {err}", s.runsc.display()))
}

fn delete(s: &Settings, inv: &Invocation) -> ExitCode {
    let id = container_id(&inv.args);
    let status = runsc(s, inv, "delete", &inv.args).status();
    // The job goes only with the container: after a delete that worked, or when runsc no
    // longer knows the container (a delete repeated after a crash). A refused delete (still
    // running, no --force) leaves the container its network.
    let gone = status.as_ref().is_ok_and(|st| st.success())
        || runsc(s, inv, "state", std::slice::from_ref(&id))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|st| !st.success());
    let file = s.job_file(inv.root.as_deref(), &id);
    if let Some(rec) = job_record(s, inv, &id).filter(|_| gone) {
        match AgentClient::new(&rec.agent).delete_job(&rec.job_key) {
            Ok(()) => {}
            Err(e) if e.is_job_not_found() => {}
            Err(e) => {
                return fail(
                    Some(inv),
                    &format!("container {id}: deleting job {}: {e}", rec.job_key),
                )
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    match status {
        Ok(st) => code(st),
        Err(e) => fail(Some(inv), &format!("{}: {e}", s.runsc.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn containerds_command_line_is_split_into_globals_command_and_arguments() {
        let inv = parse(&argv(
            "--root /run/containerd/runc/k8s.io --log /b/log.json --log-format json --systemd-cgroup create --bundle /b --pid-file /b/init.pid c1",
        ))
        .unwrap();
        assert_eq!(inv.command, "create");
        assert_eq!(
            inv.root.as_deref(),
            Some(Path::new("/run/containerd/runc/k8s.io"))
        );
        assert_eq!(inv.log.as_deref(), Some(Path::new("/b/log.json")));
        assert_eq!(
            inv.globals,
            vec![
                "--root=/run/containerd/runc/k8s.io",
                "--log=/b/log.json",
                "--log-format=json",
                "--systemd-cgroup"
            ]
        );
        let (bundle, id) = bundle_and_id(&inv.args).unwrap();
        assert_eq!((bundle, id.as_str()), (PathBuf::from("/b"), "c1"));
        let inv = parse(&argv("-root=/r kill c1 9")).unwrap();
        assert_eq!(
            (inv.command.as_str(), inv.root),
            ("kill", Some(PathBuf::from("/r")))
        );
        assert!(parse(&argv("--root")).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn a_spec_without_a_policy_is_refused_and_pod_containers_join_their_sandbox() {
        let spec = serde_json::json!({"annotations": {POLICY_ANNOTATION: " tok.en.sig "}});
        assert_eq!(admission(&spec), Admission::Job("tok.en.sig".into()));
        assert_eq!(admission(&serde_json::json!({})), Admission::Refused);
        assert_eq!(
            admission(&serde_json::json!({"annotations": {POLICY_ANNOTATION: ""}})),
            Admission::Refused
        );
        let pod = serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "container"}});
        assert_eq!(admission(&pod), Admission::JoinsPod);
        let sandbox = serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "sandbox"}});
        assert_eq!(admission(&sandbox), Admission::Refused);
    }

    #[test]
    fn the_network_namespace_is_replaced_by_the_jobs_and_the_others_kept() {
        let mut spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network"}, {"type": "mount"}
        ]}});
        set_network_namespace(&mut spec, Path::new("/run/netns/snas-1")).unwrap();
        let ns = spec["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 3);
        let net: Vec<_> = ns.iter().filter(|n| n["type"] == "network").collect();
        assert_eq!(net.len(), 1);
        assert_eq!(net[0]["path"], "/run/netns/snas-1");
        let mut bare = serde_json::json!({});
        set_network_namespace(&mut bare, Path::new("/n")).unwrap();
        assert_eq!(bare["linux"]["namespaces"][0]["path"], "/n");
    }
}
