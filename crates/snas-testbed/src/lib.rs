//! The SNAS local testbed: two nodes, two proxies, an underlay switch and an "internet" built
//! from network namespaces on one machine, with an authoritative DNS server and test servers
//! that the project runs itself. Tests, the demo and benchmarks use it; `snas testbed
//! up|down|status|exec` is a thin CLI over this crate.
//!
//! # Layout
//! - [`topology`]: every name and address (the contract agents and proxies are configured
//!   against), parameterised by a prefix so tests can build their own testbed.
//! - [`setup`]: builds namespaces, veths, the bridge, addresses and routes idempotently.
//! - [`netns`]: namespace plumbing (enter, spawn inside, find and stop processes).
//! - [`capture`]: a packet recorder for one namespace (adversarial tests).
//!   `unsafe` lives in these two.
//! - [`daemons`]: generated configs, pid files, logs, start/stop/readiness of the internet
//!   services, agents and proxies.
//! - [`internet`] and [`dns`]: the internet services (tokio) and the pure DNS answer logic.
//! - [`exec`]: create a job through an agent (its typed API client), run a command in it,
//!   delete it.
//! - [`status`] / [`record`]: what exists, and what `up` decided.
//!
//! # Guard
//! [`Testbed`] is a guard: dropping it runs the same cleanup as [`Testbed::down`] unless it
//! was [`Testbed::persist`]ed (the CLI does that), so a failing test leaves nothing behind.
//! `down` works from nothing but the prefix, so it also cleans after a crash.
//!
//! Everything here needs root (namespaces, mounts).

pub mod capture;
pub mod daemons;
pub mod dns;
pub mod exec;
pub mod internet;
pub mod netns;
pub mod record;
pub mod setup;
pub mod status;
pub mod tls;
pub mod topology;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use snas_agent::api::blocking::AgentClient;
use snas_policy::PolicyKey;

pub use daemons::Daemon;
pub use exec::JobGuard;
pub use status::{Completeness, Status};
pub use topology::{Topology, DEFAULT_PREFIX};

use record::{Record, TrustSource};

/// Errors of testbed operations.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Bad prefix.
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    /// Namespace plumbing failed.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// A daemon did not start.
    #[error(transparent)]
    Daemon(#[from] daemons::DaemonError),
    /// Job creation, the command or deletion failed.
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    /// A file in the state directory or the trust directory.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Keys: none to trust, unreadable key, signing failure.
    #[error("trust: {0}")]
    Trust(String),
    /// The policy given to `sign_policy` is not valid.
    #[error("policy: {0}")]
    Policy(String),
    /// The internet services could not bind their sockets.
    #[error(transparent)]
    Internet(#[from] internet::InternetError),
    /// The internet's TLS material (CA, host certificates) could not be made or read.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Parts of the testbed could not be removed.
    #[error("down left things behind: {0}")]
    Leftovers(String),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> TestbedError + '_ {
    move |source| TestbedError::File {
        path: path.to_owned(),
        source,
    }
}

/// How to build a testbed.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Name prefix (see [`Topology::new`]).
    pub prefix: String,
    /// Trust the `*.pub` keys in this directory instead of generating a key pair.
    pub trust_dir: Option<PathBuf>,
    /// The `snas` binary (runs `agent`, `proxy`, `testbed serve-internet`).
    pub binary: PathBuf,
    /// Start one agent per node.
    pub start_agents: bool,
    /// Start one proxy per proxy namespace (only if `snas proxy --help` succeeds).
    pub start_proxies: bool,
}

impl TestbedOptions {
    /// Defaults: generated keys, agents and proxies started.
    pub fn new(prefix: &str, binary: impl Into<PathBuf>) -> TestbedOptions {
        TestbedOptions {
            prefix: prefix.to_owned(),
            trust_dir: None,
            binary: binary.into(),
            start_agents: true,
            start_proxies: true,
        }
    }
}

/// What `down` removed.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    /// Processes stopped.
    pub killed: Vec<(i32, String)>,
    /// Namespaces removed.
    pub namespaces: Vec<String>,
    /// Directories removed.
    pub dirs: Vec<PathBuf>,
}

/// A running testbed; dropping it tears it down unless persisted.
#[derive(Debug)]
pub struct Testbed {
    topology: Topology,
    binary: PathBuf,
    record: Record,
    armed: bool,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n.div_ceil(2)];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        .chars()
        .take(n)
        .collect()
}

/// A fresh prefix for a test: `snastb` + 4 random hex digits.
pub fn unique_prefix() -> String {
    format!("snastb{}", random_hex(4))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TestbedError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(file_err(path))
}

/// The public keys the testbed should trust (file name → PEM) and where they come from: the
/// `*.pub` files of `from`, or the testbed's own key pair (generated on first use).
fn wanted_trust(
    t: &Topology,
    from: Option<&Path>,
) -> Result<(BTreeMap<std::ffi::OsString, Vec<u8>>, TrustSource), TestbedError> {
    let mut keys = BTreeMap::new();
    if let Some(dir) = from {
        let rd = std::fs::read_dir(dir).map_err(file_err(dir))?;
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            if let (true, Some(name)) = (p.extension().is_some_and(|e| e == "pub"), p.file_name()) {
                keys.insert(name.to_owned(), std::fs::read(&p).map_err(file_err(&p))?);
            }
        }
        if keys.is_empty() {
            return Err(TestbedError::Trust(format!(
                "{} holds no *.pub public keys (write them with `snas policy keygen --out DIR`)",
                dir.display()
            )));
        }
        return Ok((
            keys,
            TrustSource::Dir {
                dir: dir.to_owned(),
            },
        ));
    }
    let kid = format!("testbed-{}", t.prefix());
    let key_dir = t.key_dir();
    let key_path = key_dir.join(format!("{kid}.key"));
    if !key_path.exists() {
        std::fs::create_dir_all(&key_dir).map_err(file_err(&key_dir))?;
        set_mode(&key_dir, 0o700)?;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key =
            PolicyKey::from_seed(&kid, seed).map_err(|e| TestbedError::Trust(e.to_string()))?;
        seed.fill(0);
        let pem = key
            .private_pem()
            .map_err(|e| TestbedError::Trust(e.to_string()))?;
        write_private(&key_path, pem.as_bytes())?;
    }
    let key = load_key(&key_path)?;
    let public = key
        .public_pem()
        .map_err(|e| TestbedError::Trust(e.to_string()))?;
    keys.insert(format!("{kid}.pub").into(), public.into_bytes());
    Ok((keys, TrustSource::Generated { key: key_path }))
}

/// The `*.pub` files of the trust directory now (file name → contents).
fn current_trust(dir: &Path) -> BTreeMap<std::ffi::OsString, Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pub"))
        .filter_map(|p| Some((p.file_name()?.to_owned(), std::fs::read(&p).ok()?)))
        .collect()
}

/// Makes the trust directory hold exactly the wanted keys; returns where they came from.
///
/// Agents and proxies reload their trust bundle every 500 ms and on SIGHUP, so a change
/// applies to running daemons too: keys added or replaced are written first (each under a
/// temporary name, then renamed, so a reload never reads half a key), then the keys no longer
/// wanted are removed — a reload in between sees more keys, never fewer than wanted — and the
/// running agents and proxies in `running` are sent SIGHUP to reload at once. Jobs signed by a
/// removed key are then torn down by their agent and cut off by the proxies (`key_untrusted`);
/// `up` says so on stderr with the keys trusted now.
fn prepare_trust(
    t: &Topology,
    from: Option<&Path>,
    running: &[(Daemon, i32)],
) -> Result<TrustSource, TestbedError> {
    let trust = t.trust_dir();
    std::fs::create_dir_all(&trust).map_err(file_err(&trust))?;
    let (wanted, source) = wanted_trust(t, from)?;
    let current = current_trust(&trust);
    if current == wanted {
        return Ok(source);
    }
    for (name, pem) in &wanted {
        if current.get(name) == Some(pem) {
            continue;
        }
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let (tmp, dst) = (trust.join(tmp_name), trust.join(name));
        std::fs::write(&tmp, pem).map_err(file_err(&tmp))?;
        std::fs::rename(&tmp, &dst).map_err(file_err(&dst))?;
    }
    for e in std::fs::read_dir(&trust)
        .map_err(file_err(&trust))?
        .flatten()
    {
        if !wanted.contains_key(&e.file_name()) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(file_err(&p))?;
        }
    }
    if running.is_empty() || current.is_empty() {
        return Ok(source);
    }
    let mut told = Vec::new();
    for (d, pid) in running {
        // SAFETY: kill(2) with a pid `daemons::running_pid` just checked is the testbed's
        // daemon in its own namespace; no memory is involved.
        if unsafe { libc::kill(*pid, libc::SIGHUP) } == 0 {
            told.push(d.name());
        }
    }
    let names = |m: &BTreeMap<std::ffi::OsString, Vec<u8>>,
                 pick: &dyn Fn(&std::ffi::OsString, &Vec<u8>) -> bool| {
        m.iter()
            .filter(|(k, v)| pick(k, v))
            .map(|(k, _)| kid_of(k))
            .collect::<Vec<_>>()
    };
    let now = names(&wanted, &|_, _| true);
    let removed = names(&current, &|k, v| wanted.get(k) != Some(v));
    eprintln!(
        "testbed {p}: trust changed on running daemons; trusted now: {now}. {told} reloaded it \
         (SIGHUP; they also poll it every 500 ms).{gone}",
        p = t.prefix(),
        now = now.join(", "),
        told = if told.is_empty() {
            "no daemon".to_owned()
        } else {
            told.join(", ")
        },
        gone = if removed.is_empty() {
            String::new()
        } else {
            format!(
                " Removed or replaced: {}; running jobs signed by them are torn down by their \
                 agent and cut off by the proxies (audit `key_untrusted`).",
                removed.join(", ")
            )
        },
    );
    Ok(source)
}

/// The key id of a trust file name (`prod-2026.pub` → `prod-2026`).
fn kid_of(name: &std::ffi::OsStr) -> String {
    Path::new(name)
        .file_stem()
        .unwrap_or(name)
        .to_string_lossy()
        .into_owned()
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TestbedError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    f.write_all(data).map_err(file_err(path))
}

fn load_key(path: &Path) -> Result<PolicyKey, TestbedError> {
    let kid = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| TestbedError::Trust(format!("{}: no key id in name", path.display())))?;
    let pem = std::fs::read(path).map_err(file_err(path))?;
    PolicyKey::from_pem(kid, &pem)
        .map_err(|e| TestbedError::Trust(format!("{}: {e}", path.display())))
}

/// Builds (or completes) the testbed named by `opts.prefix` and starts its daemons. Does not
/// clean up on error: see [`Testbed::up`] for the guarded variant.
pub fn up_unguarded(opts: &TestbedOptions) -> Result<Record, TestbedError> {
    let t = Topology::new(&opts.prefix)?;
    let state = t.state_dir();
    std::fs::create_dir_all(&state).map_err(file_err(&state))?;
    set_mode(&state, 0o700)?;
    let running: Vec<(Daemon, i32)> = Daemon::all()
        .into_iter()
        .filter(|d| !matches!(d, Daemon::Internet))
        .filter_map(|d| Some((d, daemons::running_pid(&t, d)?)))
        .collect();
    let trust = prepare_trust(&t, opts.trust_dir.as_deref(), &running)?;
    tls::ensure(&tls::dir(&t), &internet::InternetOptions::default().hosts)?;
    setup::build(&t)?;
    let record = Record {
        trust,
        agents: opts.start_agents,
        proxies: opts.start_proxies,
        proxy_available: opts.start_proxies && daemons::proxy_available(&opts.binary),
    };
    record.save(&t).map_err(file_err(&Record::path(&t)))?;
    for d in Daemon::all() {
        if record.starts(d) {
            daemons::start(&t, d, &opts.binary)?;
        } else if let (Daemon::Proxy(n), Some(p)) = (d, d.config_file(&t)) {
            // Written anyway so the proxy's author can start it by hand.
            std::fs::create_dir_all(d.dir(&t)).map_err(file_err(&d.dir(&t)))?;
            std::fs::write(&p, daemons::proxy_config(&t, n)).map_err(file_err(&p))?;
        }
    }
    Ok(record)
}

fn owned_by_cmdline(t: &Topology, pid: i32) -> bool {
    let cmd = netns::pid_cmdline(pid);
    let state = format!("{}/", t.state_dir().display());
    let inet = format!("testbed serve-internet --prefix {}", t.prefix());
    cmd.contains(&state) || cmd.ends_with(&inet) || cmd.contains(&format!("{inet} "))
}

impl Testbed {
    /// Builds the testbed and starts its daemons. On error everything built so far is removed.
    pub fn up(opts: TestbedOptions) -> Result<Testbed, TestbedError> {
        let topology = Topology::new(&opts.prefix)?;
        match up_unguarded(&opts) {
            Ok(record) => Ok(Testbed {
                topology,
                binary: opts.binary,
                record,
                armed: true,
            }),
            Err(e) => {
                let _ = Testbed::down(&opts.prefix);
                Err(e)
            }
        }
    }

    /// Removes every trace of the testbed `prefix`: its processes (pid files, and any process
    /// living in one of its namespaces or running from its state directory), its namespaces
    /// (also agents' job namespaces), its bpffs pins and its state directory. Works on
    /// half-built or crashed testbeds; removing an absent testbed succeeds.
    pub fn down(prefix: &str) -> Result<DownReport, TestbedError> {
        let t = Topology::new(prefix)?;
        let mut report = DownReport::default();
        let names = setup::existing_netns(&t);
        let ids: Vec<(u64, u64)> = names.iter().filter_map(|n| netns::named_ns_id(n)).collect();
        let mut pids: Vec<i32> = Daemon::all()
            .into_iter()
            .filter_map(|d| daemons::recorded_pid(&t, d))
            .filter(|&p| {
                netns::pid_alive(p)
                    && (netns::pid_ns(p).is_some_and(|id| ids.contains(&id))
                        || owned_by_cmdline(&t, p))
            })
            .collect();
        pids.extend(netns::pids_in(&ids));
        if let Ok(rd) = std::fs::read_dir("/proc") {
            let me = std::process::id() as i32;
            pids.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|&p| p != me && netns::pid_alive(p) && owned_by_cmdline(&t, p)),
            );
        }
        pids.sort_unstable();
        pids.dedup();
        report.killed = pids.iter().map(|&p| (p, netns::pid_cmdline(p))).collect();
        netns::stop_pids(&pids, Duration::from_secs(3));

        // Job namespaces first (their veth peers live in the node namespaces).
        let fixed = t.namespaces();
        let mut order: Vec<String> = names
            .iter()
            .filter(|n| !fixed.contains(n))
            .cloned()
            .collect();
        order.extend(fixed.into_iter().rev());
        for n in order {
            if netns::netns_path(&n).exists() {
                netns::del_netns(&n)?;
                report.namespaces.push(n);
            }
        }
        let mut left = Vec::new();
        for dir in (1..=topology::NODES)
            .map(|n| t.bpf_pin_dir(n))
            .chain([t.state_dir()])
        {
            if dir.exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => report.dirs.push(dir),
                    Err(e) => left.push(format!("{}: {e}", dir.display())),
                }
            }
        }
        // The parent is shared by all testbeds: remove it only when this was the last one.
        if let Some(parent) = t.state_dir().parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let still: Vec<String> = setup::existing_netns(&t);
        if !still.is_empty() {
            left.push(format!("namespaces {}", still.join(", ")));
        }
        if left.is_empty() {
            Ok(report)
        } else {
            Err(TestbedError::Leftovers(left.join("; ")))
        }
    }

    /// Snapshot of the testbed `prefix`.
    pub fn status_of(prefix: &str) -> Result<Status, TestbedError> {
        Ok(Status::collect(&Topology::new(prefix)?))
    }

    /// Snapshot of this testbed.
    pub fn status(&self) -> Status {
        Status::collect(&self.topology)
    }

    /// Keeps the testbed running after this value is dropped (the CLI's `up`).
    pub fn persist(mut self) {
        self.armed = false;
    }

    /// Names and addresses.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        self.topology.prefix()
    }

    /// What `up` decided.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Runs `f` on a thread inside the testbed namespace `ns` (e.g. `topology().inet_ns()`).
    pub fn in_netns<T, F>(&self, ns: &str, f: F) -> Result<T, TestbedError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        Ok(netns::in_netns(ns, f)?)
    }

    /// The generated signing key (`None` when the testbed trusts `--trust` keys).
    pub fn signing_key(&self) -> Result<Option<PolicyKey>, TestbedError> {
        match &self.record.trust {
            TrustSource::Generated { key } => load_key(key).map(Some),
            TrustSource::Dir { .. } => Ok(None),
        }
    }

    /// Signs a policy (authoring TOML) with the generated key: random `jti`, serial 1, now.
    pub fn sign_policy(&self, policy_toml: &str) -> Result<String, TestbedError> {
        let key = self.signing_key()?.ok_or_else(|| {
            TestbedError::Trust("this testbed trusts --trust keys; sign with their key".into())
        })?;
        let draft = snas_policy::parse_policy(policy_toml)
            .map_err(|e| TestbedError::Policy(e.to_string()))?;
        let claims = draft.to_claims(
            &random_hex(32),
            snas_wire::PolicySerial(1),
            SystemTime::now(),
        );
        snas_policy::sign(&claims, &key).map_err(|e| TestbedError::Policy(e.to_string()))
    }

    /// A client for node `n`'s agent API.
    pub fn agent(&self, n: u8) -> AgentClient {
        AgentClient::new(self.topology.agent_socket(n))
    }

    /// Creates a job on node `n` from `token`, runs `cmd` inside it (output captured), deletes
    /// the job.
    pub fn exec_in_job(
        &self,
        n: u8,
        token: &str,
        mut cmd: Command,
    ) -> Result<Output, TestbedError> {
        let job = JobGuard::create(
            self.agent(n),
            token,
            &self.topology.state_dir().join("exec"),
        )?;
        job.prepare(&mut cmd)?;
        let out = cmd.output().map_err(|source| TestbedError::File {
            path: PathBuf::from(cmd.get_program()),
            source,
        })?;
        job.delete()?;
        Ok(out)
    }

    /// Stops proxy `n` (failover tests).
    pub fn stop_proxy(&self, n: u8) {
        daemons::stop(&self.topology, Daemon::Proxy(n));
    }

    /// Starts proxy `n` again.
    pub fn start_proxy(&self, n: u8) -> Result<(), TestbedError> {
        daemons::start(&self.topology, Daemon::Proxy(n), &self.binary)?;
        Ok(())
    }

    /// Stops node `n`'s agent.
    pub fn stop_agent(&self, n: u8) {
        daemons::stop(&self.topology, Daemon::Agent(n));
    }

    /// Starts node `n`'s agent again.
    pub fn start_agent(&self, n: u8) -> Result<(), TestbedError> {
        daemons::start(&self.topology, Daemon::Agent(n), &self.binary)?;
        Ok(())
    }

    /// Replaces node `n`'s agent by a new process that takes its sockets over (no gap in DNS);
    /// returns the new pid.
    pub fn restart_agent(&self, n: u8) -> Result<i32, TestbedError> {
        Ok(daemons::restart_agent(&self.topology, n, &self.binary)?)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = Testbed::down(self.topology.prefix()) {
                eprintln!("snas-testbed: cleanup of {}: {e}", self.topology.prefix());
            }
        }
    }
}

/// Entry of `snas testbed serve-internet`: enters `<prefix>-inet` (unless already there) and
/// serves the internet services until SIGTERM or SIGINT.
pub fn serve_internet_daemon(prefix: &str) -> Result<(), TestbedError> {
    let t = Topology::new(prefix)?;
    let ns = t.inet_ns();
    if !netns::current_is(&ns) {
        netns::enter_netns(&ns)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| TestbedError::File {
            path: PathBuf::from("tokio runtime"),
            source,
        })?;
    rt.block_on(async {
        let opts = internet::InternetOptions {
            tls_dir: Some(tls::dir(&t)),
            ..internet::InternetOptions::default()
        };
        let inet = internet::Internet::bind(&opts).await?;
        eprintln!(
            "snas testbed internet {prefix}: serving DNS on {} and 4 hosts",
            t.dns_server()
        );
        inet.run(async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        })
        .await;
        Ok(())
    })
}
