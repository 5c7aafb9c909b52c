//! The paths compared, built side by side on one testbed, and how a client runs on each.
//!
//! Owns the baseline part of the topology that the SNAS testbed does not have: four gateway
//! namespaces hanging off the testbed's internet namespace, each with one client namespace
//! behind it, so that the baselines cross the same number of veth hops and reach the same
//! servers as a SNAS job:
//!
//! ```text
//!  <P>-cd 10.254.1.2 ── <P>-gd (router, no filter)          ── 198.51.100.8/30  ── <P>-inet
//!  <P>-ck 10.254.2.2 ── <P>-gk (nftables allowlist + masq)   ── 198.51.100.12/30 ── <P>-inet
//!  <P>-cs 10.254.3.2 ── <P>-gs (squid :3128, no forwarding)  ── 198.51.100.16/30 ── <P>-inet
//!  <P>-cv 10.254.4.2 ── <P>-gv (router, no filter)          ── 198.51.100.20/30 ── <P>-inet
//! ```
//!
//! `<P>-cv` is gvisor-direct: the same client in a gVisor sandbox started by the same launcher
//! as `snas run` (`snas_sandbox::launch`, same platform, runsc flags and limits, through this
//! program's hidden `sandbox` subcommand), on a plain veth to a router: gVisor's own cost,
//! so that SNAS's cost inside gVisor is the difference to the SNAS (gVisor) path.
//!
//! Each path has its own gateway so that one path's kernel state (conntrack, which nftables'
//! NAT turns on for its whole namespace) cannot tax another's. Baseline clients resolve names
//! with the testbed's authoritative server (203.0.113.53) through a private resolv.conf; SNAS
//! clients use the job's resolver (the agent's stub), and the squid client never resolves (it
//! asks squid for a tunnel by name).
//!
//! Invariants: every namespace is named `<P>-…` with the run's unique prefix and removed by
//! [`Baselines`]' `Drop` (squid is killed first), also after a failed run; nothing is configured
//! in the root namespace; all addresses are documentation or private ranges inside namespaces
//! this program made.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snas_testbed::netns::{self, ip, NetnsError};
use snas_testbed::{JobGuard, Testbed};

use crate::client::{self, ClientResult, Target, Workload};
use crate::sandbox::{GVISOR_CPUS, GVISOR_TIMEOUT};

/// Errors building the paths or running a client on one.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A namespace, link or address operation failed.
    #[error("baseline topology: {0}")]
    Netns(#[from] NetnsError),
    /// A file of the run could not be written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// nftables rejected the ruleset.
    #[error("nft -f {path} in {ns}: {stderr}")]
    Nft {
        path: PathBuf,
        ns: String,
        stderr: String,
    },
    /// squid did not start or did not listen.
    #[error("squid: {0}")]
    Squid(String),
    /// The SNAS job could not be created.
    #[error("SNAS job: {0}")]
    Job(String),
    /// The client could not be started.
    #[error("starting the client on {path}: {source}")]
    Spawn {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The client ran but reported no result.
    #[error("client on {path} exited with {status} without a result; stderr: {stderr}")]
    NoResult {
        path: &'static str,
        status: String,
        stderr: String,
    },
}

/// One of the compared paths.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Client namespace routed to the internet, nothing in between but a router.
    Direct,
    /// nftables allowlist and kernel NAT on the router.
    Nftables,
    /// Debian's squid as HTTP CONNECT proxy with a domain allowlist.
    Squid,
    /// SNAS (tier 1 + GENEVE + proxy) with the client natively in the job's namespace.
    SnasNs,
    /// The client in a gVisor sandbox (the launcher `snas run` uses) on a plain routed veth,
    /// no SNAS: gVisor's own cost.
    GvisorDirect,
    /// SNAS with the client inside a gVisor sandbox (`snas run`).
    SnasGvisor,
}

impl PathKind {
    /// Every path, in the order tables show them.
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::Nftables,
        PathKind::Squid,
        PathKind::SnasNs,
        PathKind::GvisorDirect,
        PathKind::SnasGvisor,
    ];

    /// Short label for tables and charts.
    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Nftables => "nftables+NAT",
            PathKind::Squid => "squid",
            PathKind::SnasNs => "SNAS (netns)",
            PathKind::GvisorDirect => "gVisor direct",
            PathKind::SnasGvisor => "SNAS (gVisor)",
        }
    }

    /// Name on the command line (`--paths`).
    pub fn id(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Nftables => "nftables",
            PathKind::Squid => "squid",
            PathKind::SnasNs => "snas",
            PathKind::GvisorDirect => "gvisor-direct",
            PathKind::SnasGvisor => "gvisor",
        }
    }

    /// Parses [`PathKind::id`].
    pub fn from_id(s: &str) -> Option<PathKind> {
        PathKind::ALL.into_iter().find(|p| p.id() == s)
    }

    /// Whether the path is one of SNAS's (needs a signed policy).
    pub fn is_snas(self) -> bool {
        matches!(self, PathKind::SnasNs | PathKind::SnasGvisor)
    }

    /// Whether the client runs in a gVisor sandbox.
    pub fn is_gvisor(self) -> bool {
        matches!(self, PathKind::GvisorDirect | PathKind::SnasGvisor)
    }
}

/// The allowlist every path enforces: (host, address, protocol, port).
pub const ALLOWED: [(&str, &str, &str, u16); 4] = [
    ("api.example.com", "203.0.113.10", "tcp", 7),
    ("api.example.com", "203.0.113.10", "tcp", 80),
    ("api.example.com", "203.0.113.10", "udp", 7),
    ("bulk.example.com", "203.0.113.40", "tcp", 5201),
];

/// The testbed's authoritative DNS server, which baseline clients use directly.
const DNS_SERVER: &str = "203.0.113.53";
/// squid's port on its gateway.
const SQUID_PORT: u16 = 3128;

struct BaselineNet {
    path: PathKind,
    tag: char,
    index: u8,
}

const BASELINES: [BaselineNet; 4] = [
    BaselineNet {
        path: PathKind::Direct,
        tag: 'd',
        index: 1,
    },
    BaselineNet {
        path: PathKind::Nftables,
        tag: 'k',
        index: 2,
    },
    BaselineNet {
        path: PathKind::Squid,
        tag: 's',
        index: 3,
    },
    BaselineNet {
        path: PathKind::GvisorDirect,
        tag: 'v',
        index: 4,
    },
];

impl BaselineNet {
    fn gateway_ns(&self, prefix: &str) -> String {
        format!("{prefix}-g{}", self.tag)
    }
    fn client_ns(&self, prefix: &str) -> String {
        format!("{prefix}-c{}", self.tag)
    }
    /// Transit /30: internet side `.8n+1`, gateway side `.8n+2` of 198.51.100.(4 + 4·index).
    fn transit(&self) -> (String, String) {
        let base = 4 + 4 * u32::from(self.index);
        (
            format!("198.51.100.{}", base + 1),
            format!("198.51.100.{}", base + 2),
        )
    }
    fn client_net(&self) -> (String, String, String) {
        (
            format!("10.254.{}.0/30", self.index),
            format!("10.254.{}.1", self.index),
            format!("10.254.{}.2", self.index),
        )
    }
}

/// The baseline namespaces and squid; removed on drop.
#[derive(Debug)]
pub struct Baselines {
    prefix: String,
    dir: PathBuf,
    squid: Option<Child>,
    namespaces: Vec<String>,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> PathError + '_ {
    move |source| PathError::File {
        path: path.to_owned(),
        source,
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), PathError> {
    std::fs::write(path, text).map_err(file_err(path))
}

/// Writes a sysctl of the namespace `ns` (net sysctls resolve against the opener's namespace).
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), PathError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let p = path.clone();
    let v = value.to_owned();
    netns::in_netns(ns, move || std::fs::write(&p, v))?.map_err(file_err(&path))
}

impl Baselines {
    /// Builds the four baseline paths next to the testbed `tb`, writing configuration and logs
    /// under `dir`.
    pub fn build(tb: &Testbed, dir: &Path) -> Result<Baselines, PathError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let prefix = tb.prefix().to_owned();
        let mut b = Baselines {
            prefix: prefix.clone(),
            dir: dir.to_owned(),
            squid: None,
            namespaces: Vec::new(),
        };
        let inet = tb.topology().inet_ns();
        // The servers close first (HTTP `Connection: close`), so every TCP_CRR connection
        // leaves a TIME_WAIT socket in the internet namespace for 60 s. A client that runs
        // through its ephemeral ports within that time meets them again: Linux's own clients
        // and SNAS's NAT pass (the server accepts a SYN to a TIME_WAIT socket whose sequence
        // number or timestamp is newer), but gVisor's netstack, reaching the server with its
        // own ports on gVisor direct, is refused and retries each SYN after 1 s — measured
        // 2–6 connections/s in the repetitions after the first. Servers on the internet see
        // many clients, not one client's every port within a minute; so the benchmark's
        // server namespace keeps no TIME_WAIT sockets, the same for every path.
        sysctl(&inet, "net.ipv4.tcp_max_tw_buckets", "0")?;
        for net in &BASELINES {
            let (gw, cl) = (net.gateway_ns(&prefix), net.client_ns(&prefix));
            for ns in [&gw, &cl] {
                netns::add_netns(ns)?;
                b.namespaces.push(ns.clone());
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            let (inet_addr, gw_addr) = net.transit();
            let inet_if = format!("g{}", net.tag);
            ip(&[
                "-n", &gw, "link", "add", "up0", "type", "veth", "peer", "name", &inet_if, "netns",
                &inet,
            ])?;
            ip(&[
                "-n",
                &gw,
                "addr",
                "add",
                &format!("{gw_addr}/30"),
                "dev",
                "up0",
            ])?;
            ip(&["-n", &gw, "link", "set", "up0", "up"])?;
            ip(&[
                "-n",
                &inet,
                "addr",
                "add",
                &format!("{inet_addr}/30"),
                "dev",
                &inet_if,
            ])?;
            ip(&["-n", &inet, "link", "set", &inet_if, "up"])?;
            ip(&[
                "-n",
                &gw,
                "route",
                "add",
                "203.0.113.0/24",
                "via",
                &inet_addr,
            ])?;

            let (client_net, client_gw, client_addr) = net.client_net();
            ip(&[
                "-n", &cl, "link", "add", "eth0", "type", "veth", "peer", "name", "c0", "netns",
                &gw,
            ])?;
            ip(&[
                "-n",
                &cl,
                "addr",
                "add",
                &format!("{client_addr}/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &cl, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &gw,
                "addr",
                "add",
                &format!("{client_gw}/30"),
                "dev",
                "c0",
            ])?;
            ip(&["-n", &gw, "link", "set", "c0", "up"])?;
            match net.path {
                PathKind::Squid => {}
                // runsc copies the namespace's routes into its netstack; the launcher checks
                // for (and puts back) a default route, as a job namespace has one.
                PathKind::GvisorDirect => {
                    ip(&["-n", &cl, "route", "add", "default", "via", &client_gw])?;
                    sysctl(&gw, "net.ipv4.ip_forward", "1")?;
                }
                _ => {
                    ip(&[
                        "-n",
                        &cl,
                        "route",
                        "add",
                        "203.0.113.0/24",
                        "via",
                        &client_gw,
                    ])?;
                    sysctl(&gw, "net.ipv4.ip_forward", "1")?;
                }
            }
            if matches!(net.path, PathKind::Direct | PathKind::GvisorDirect) {
                // Routed straight: the internet answers the client's own address.
                ip(&["-n", &inet, "route", "add", &client_net, "via", &gw_addr])?;
            }
            write_file(
                &dir.join(format!("resolv-{}.conf", net.tag)),
                &format!("nameserver {DNS_SERVER}\n"),
            )?;
        }
        b.load_nftables()?;
        b.start_squid()?;
        Ok(b)
    }

    fn net(&self, path: PathKind) -> Option<&'static BaselineNet> {
        BASELINES.iter().find(|n| n.path == path)
    }

    /// The nftables baseline: default-deny forwarding from the client except the allowlist
    /// (and DNS to the testbed's server), replies by conntrack, masquerade to the transit
    /// address — what an operator would build with stock Linux.
    fn load_nftables(&self) -> Result<(), PathError> {
        let mut elements: Vec<String> = ALLOWED
            .iter()
            .map(|(_, a, proto, port)| format!("{a} . {proto} . {port}"))
            .collect();
        elements.push(format!("{DNS_SERVER} . udp . 53"));
        elements.push(format!("{DNS_SERVER} . tcp . 53"));
        let ruleset = format!(
            "table inet snas_bench {{
  set allow4 {{
    type ipv4_addr . inet_proto . inet_service
    elements = {{ {} }}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"c0\" ip daddr . meta l4proto . th dport @allow4 accept
    counter comment \"denied\"
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"up0\" ip saddr 10.254.2.0/30 masquerade
  }}
}}
",
            elements.join(", ")
        );
        let path = self.dir.join("nftables.conf");
        write_file(&path, &ruleset)?;
        let ns = format!("{}-gk", self.prefix);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .map_err(file_err(Path::new("nft")))?;
        if !out.status.success() {
            return Err(PathError::Nft {
                path,
                ns,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// squid as an explicit HTTP CONNECT proxy: only the allowlisted names and ports, no cache,
    /// its own DNS client against the testbed's server, access log on (as in production).
    fn start_squid(&mut self) -> Result<(), PathError> {
        let dir = self.dir.join("squid");
        std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
        // squid drops privileges to `proxy`; it must write its logs and pid file here.
        open_to_squid_user(&dir);
        let hosts: Vec<&str> = {
            let mut h: Vec<&str> = ALLOWED.iter().map(|a| a.0).collect();
            h.dedup();
            h
        };
        let ports: Vec<String> = {
            let mut p: Vec<String> = ALLOWED
                .iter()
                .filter(|a| a.2 == "tcp")
                .map(|a| a.3.to_string())
                .collect();
            p.sort();
            p.dedup();
            p
        };
        let d = dir.display();
        let conf = format!(
            "http_port 10.254.3.1:{SQUID_PORT}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{d}/access.log
coredump_dir {d}
cache deny all
cache_mem 8 MB
dns_nameservers {DNS_SERVER}
acl allowed_hosts dstdomain {hosts}
acl allowed_ports port {ports}
acl CONNECT method CONNECT
http_access allow CONNECT allowed_hosts allowed_ports
http_access deny all
shutdown_lifetime 0 seconds
netdb_filename none
logfile_rotate 0
max_filedescriptors 8192
",
            hosts = hosts.join(" "),
            ports = ports.join(" "),
        );
        let conf_path = dir.join("squid.conf");
        write_file(&conf_path, &conf)?;
        let gw = format!("{}-gs", self.prefix);
        let mut cmd = Command::new("squid");
        // Its own service name: squid names its shared-memory segments after it
        // (/dev/shm/<name>-cf__*.shm), and two runs with the default name would share them.
        cmd.arg("-N")
            .arg("-n")
            .arg(&self.prefix)
            .arg("-f")
            .arg(&conf_path);
        let child = netns::spawn_in_netns(&mut cmd, &gw, &dir.join("squid.out")).map_err(|e| {
            PathError::Squid(format!(
                "{e} (is the `squid` package installed? scripts/setup.sh installs it)"
            ))
        })?;
        self.squid = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = SocketAddr::from(([10, 254, 3, 1], SQUID_PORT));
        loop {
            let ready = netns::in_netns(&gw, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if ready {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.squid.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
                return Err(PathError::Squid(format!(
                    "exited with {status}; cache.log: {}",
                    tail(&log, 10)
                )));
            }
            if Instant::now() > deadline {
                return Err(PathError::Squid(format!(
                    "not listening on {addr} after 20 s; see {}",
                    dir.join("cache.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// squid's process id, for CPU accounting.
    pub fn squid_pid(&self) -> Option<u32> {
        self.squid.as_ref().map(Child::id)
    }

    /// The target of `host:port` as the client on `path` addresses it.
    pub fn target(&self, path: PathKind, host: &str, port: u16) -> Target {
        Target {
            host: host.to_owned(),
            port,
            proxy: (path == PathKind::Squid)
                .then(|| SocketAddr::from(([10, 254, 3, 1], SQUID_PORT))),
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn open_to_squid_user(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // World-writable is enough for squid's user (`proxy`) and avoids looking the user up. The
    // directory holds only squid's logs and pid file; it lives in this run's root-owned scratch
    // directory under /run, which squid's user must be able to traverse (so it is not 0700),
    // and is removed with it.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
}

impl Drop for Baselines {
    fn drop(&mut self) {
        if let Some(mut c) = self.squid.take() {
            // SAFETY: plain kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // squid's helpers and anything else still in our namespaces.
        let ids: Vec<_> = self
            .namespaces
            .iter()
            .filter_map(|n| netns::named_ns_id(n))
            .collect();
        netns::stop_pids(&netns::pids_in(&ids), Duration::from_secs(2));
        for ns in self.namespaces.iter().rev() {
            let _ = netns::del_netns(ns);
        }
        // The shared-memory segments a killed squid leaves behind (named after `-n`).
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            let ours = format!("{}-cf__", self.prefix);
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&ours) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// What a client needs to run on a SNAS path: the signed policy.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub token: String,
}

/// A client process running on some path.
#[derive(Debug)]
pub struct RunningClient {
    path: PathKind,
    child: Child,
    /// Deletes the job when dropped (SNAS netns path).
    _job: Option<JobGuard>,
}

impl RunningClient {
    /// Waits for the client and parses its result line.
    pub fn wait(self) -> Result<ClientResult, PathError> {
        let path = self.path;
        let out = self
            .child
            .wait_with_output()
            .map_err(|source| PathError::Spawn {
                path: path.label(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        client::parse_output(&stdout).ok_or_else(|| PathError::NoResult {
            path: path.label(),
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 8),
        })
    }
}

/// Everything needed to start clients on every path.
#[derive(Debug)]
pub struct Paths {
    pub tb: Testbed,
    pub baselines: Baselines,
    /// The `snas` binary (for `snas run`).
    pub snas_bin: PathBuf,
    /// Folder bound at /app in sandboxes, holding a copy of this program.
    app_dir: PathBuf,
    scratch: PathBuf,
    /// This program (the client is its hidden `client` subcommand).
    self_exe: PathBuf,
}

impl Paths {
    /// Wraps a testbed and its baselines; copies this program where sandboxes can run it.
    pub fn new(
        tb: Testbed,
        baselines: Baselines,
        snas_bin: PathBuf,
        scratch: &Path,
    ) -> Result<Paths, PathError> {
        let self_exe = std::env::current_exe().map_err(file_err(Path::new("/proc/self/exe")))?;
        let app_dir = scratch.join("app");
        std::fs::create_dir_all(&app_dir).map_err(file_err(&app_dir))?;
        let copy = app_dir.join("snas-bench");
        std::fs::copy(&self_exe, &copy).map_err(file_err(&copy))?;
        Ok(Paths {
            tb,
            baselines,
            snas_bin,
            app_dir,
            scratch: scratch.to_owned(),
            self_exe,
        })
    }

    /// Signs a policy for a benchmark job (authoring TOML).
    pub fn sign(&self, toml: &str) -> Result<JobSpec, PathError> {
        self.tb
            .sign_policy(toml)
            .map(|token| JobSpec { token })
            .map_err(|e| PathError::Job(e.to_string()))
    }

    fn client_args(w: &Workload, t: &Target) -> Vec<String> {
        vec![
            "client".into(),
            "--workload".into(),
            serde_json::to_string(w).unwrap_or_default(),
            "--target".into(),
            serde_json::to_string(t).unwrap_or_default(),
        ]
    }

    /// Starts the client for workload `w` against `host:port` on `path`; SNAS paths use `job`.
    pub fn spawn(
        &self,
        path: PathKind,
        job: Option<&JobSpec>,
        w: &Workload,
        host: &str,
        port: u16,
    ) -> Result<RunningClient, PathError> {
        self.spawn_on_cpu(path, job, w, host, port, None)
    }

    /// As [`Paths::spawn`], with the client (all its threads) held to CPU `cpu` when given:
    /// the share of the machine a sandbox limited to one CPU would get (the job's own sends —
    /// system calls, tier 1, the kernel's forwarding in their context — run on that CPU too).
    pub fn spawn_on_cpu(
        &self,
        path: PathKind,
        job: Option<&JobSpec>,
        w: &Workload,
        host: &str,
        port: u16,
        cpu: Option<usize>,
    ) -> Result<RunningClient, PathError> {
        let t = self.baselines.target(path, host, port);
        let args = Self::client_args(w, &t);
        let spawn_err = |source| PathError::Spawn {
            path: path.label(),
            source,
        };
        let need_job =
            || job.ok_or_else(|| PathError::Job(format!("{} needs a signed policy", path.label())));
        let mut guard = None;
        let mut cmd = match path {
            PathKind::GvisorDirect => {
                let net = self
                    .baselines
                    .net(path)
                    .ok_or_else(|| PathError::Job(format!("no namespace for {}", path.label())))?;
                let (_, gw, addr) = net.client_net();
                let mut c = Command::new(&self.self_exe);
                c.arg("sandbox")
                    .arg("--netns")
                    .arg(netns::netns_path(&net.client_ns(&self.baselines.prefix)))
                    .arg("--addr")
                    .arg(format!("{addr}/30"))
                    .arg("--gateway")
                    .arg(gw)
                    .arg("--nameserver")
                    .arg(DNS_SERVER)
                    .arg("--app")
                    .arg(&self.app_dir)
                    .arg("--state-dir")
                    .arg(self.scratch.join("gvisor-direct"))
                    .args(["--", "/app/snas-bench"])
                    .args(&args);
                c
            }
            PathKind::SnasGvisor => {
                let token_file = self
                    .scratch
                    .join(format!("token-{}.jwt", rand::random::<u32>()));
                write_file(&token_file, &need_job()?.token)?;
                let mut c = Command::new(&self.snas_bin);
                c.args([
                    "run",
                    "--prefix",
                    self.tb.prefix(),
                    "--node",
                    "1",
                    "--cpus",
                    GVISOR_CPUS,
                ])
                .arg("--policy")
                .arg(format!("@{}", token_file.display()))
                .arg("--app")
                .arg(&self.app_dir)
                .args(["--no-summary", "--timeout", GVISOR_TIMEOUT])
                .args(["--", "/app/snas-bench"])
                .args(&args);
                c
            }
            PathKind::SnasNs => {
                let g = JobGuard::create(
                    self.tb.agent(1),
                    &need_job()?.token,
                    &self.scratch.join("exec"),
                )
                .map_err(|e| PathError::Job(e.to_string()))?;
                let mut c = Command::new(&self.self_exe);
                c.args(&args);
                g.prepare(&mut c)
                    .map_err(|e| PathError::Job(e.to_string()))?;
                guard = Some(g);
                c
            }
            baseline => {
                let net = self.baselines.net(baseline).ok_or_else(|| {
                    PathError::Job(format!("no namespace for {}", baseline.label()))
                })?;
                let ns = net.client_ns(&self.baselines.prefix);
                let nsfile = File::open(netns::netns_path(&ns))
                    .map_err(file_err(&netns::netns_path(&ns)))?;
                let mut c = Command::new(&self.self_exe);
                c.args(&args);
                netns::prepare_job_command(
                    &mut c,
                    nsfile,
                    &self.baselines.dir.join(format!("resolv-{}.conf", net.tag)),
                )?;
                c
            }
        };
        if let Some(cpu) = cpu {
            pin_to_cpu(&mut cmd, cpu);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        Ok(RunningClient {
            path,
            child,
            _job: guard,
        })
    }

    /// Runs one client to completion.
    pub fn run(
        &self,
        path: PathKind,
        job: Option<&JobSpec>,
        w: &Workload,
        host: &str,
        port: u16,
    ) -> Result<ClientResult, PathError> {
        self.spawn(path, job, w, host, port)?.wait()
    }

    /// Process ids of the running proxies.
    pub fn proxy_pids(&self) -> Vec<u32> {
        (1..=2u8)
            .filter_map(|n| {
                let f = self.tb.topology().proxy_dir(n).join("proxy.pid");
                std::fs::read_to_string(f).ok()?.trim().parse().ok()
            })
            .collect()
    }

    /// Sum of the proxies' `snas_proxy_packets_total` for the given directions.
    pub fn proxy_packets(&self, directions: &[&str]) -> Result<u64, PathError> {
        self.proxy_metric("snas_proxy_packets_total", "direction", directions)
    }

    /// Sum over both proxies of the samples of `metric` whose label `label` is one of
    /// `values`.
    pub fn proxy_metric(
        &self,
        metric: &str,
        label: &str,
        values: &[&str],
    ) -> Result<u64, PathError> {
        let mut total = 0;
        for n in 1..=2u8 {
            let addr = self.tb.topology().proxy_control(n);
            let text = self
                .tb
                .in_netns(&self.tb.topology().proxy_ns(n), move || {
                    http_get(addr, "/metrics")
                })
                .map_err(|e| PathError::Job(e.to_string()))?
                .map_err(|source| PathError::File {
                    path: PathBuf::from(format!("http://{addr}/metrics")),
                    source,
                })?;
            total += sum_metric(&text, metric, label, values);
        }
        Ok(total)
    }

    /// Kernel-side losses in front of both proxies, summed: datagrams the kernel dropped at
    /// the proxies' GENEVE sockets (`/proc/net/udp` `drops`, socket queue full) and packets
    /// it dropped on the way from the internet into their TUN devices (`tx_drop` of the
    /// device in `/proc/net/dev`). A packet lost there never reached a worker, so no
    /// scheduler could have served it.
    pub fn proxy_kernel_drops(&self) -> Result<KernelDrops, PathError> {
        let mut total = KernelDrops::default();
        for n in 1..=2u8 {
            let ns = self.tb.topology().proxy_ns(n);
            let (udp, dev) = self
                .tb
                .in_netns(&ns, || {
                    // thread-self: /proc/net follows the main thread's namespace.
                    (
                        std::fs::read_to_string("/proc/thread-self/net/udp"),
                        std::fs::read_to_string("/proc/thread-self/net/dev"),
                    )
                })
                .map_err(|e| PathError::Job(e.to_string()))?;
            let file = |what: &str| {
                let path = PathBuf::from(format!("{ns}:/proc/net/{what}"));
                move |source| PathError::File { path, source }
            };
            let (udp, dev) = (udp.map_err(file("udp"))?, dev.map_err(file("dev"))?);
            total.socket += udp_drops(&udp, snas_wire::geneve::GENEVE_PORT);
            total.tun += dev_tx_drops(&dev, snas_testbed::topology::PROXY_TUN);
        }
        Ok(total)
    }
}

/// Packets the kernel dropped before a proxy worker saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelDrops {
    /// At the GENEVE sockets (receive queue full).
    pub socket: u64,
    /// On the way into the TUN devices (device queue full).
    pub tun: u64,
}

impl KernelDrops {
    /// What grew from `earlier` to `self`.
    pub fn since(self, earlier: KernelDrops) -> KernelDrops {
        KernelDrops {
            socket: self.socket.saturating_sub(earlier.socket),
            tun: self.tun.saturating_sub(earlier.tun),
        }
    }
}

/// The `drops` column of the sockets bound to local `port` in `/proc/net/udp` text.
fn udp_drops(text: &str, port: u16) -> u64 {
    let want = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            (f.get(1)?.ends_with(&want)).then(|| f.get(12)?.parse::<u64>().ok())?
        })
        .sum()
}

/// The transmit `drop` counter of device `dev` in `/proc/net/dev` text.
fn dev_tx_drops(text: &str, dev: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == dev).then_some(rest)
        })
        // receive: bytes packets errs drop fifo frame compressed multicast (8), then
        // transmit: bytes packets errs drop ...
        .filter_map(|rest| rest.split_whitespace().nth(11)?.parse::<u64>().ok())
        .sum()
}

/// Makes `cmd` run on CPU `cpu` only (`sched_setaffinity` before exec; the threads it starts
/// inherit it).
fn pin_to_cpu(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system
    // call on a cpu_set_t that lives on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// CPU time (user + system) of a process and all its threads, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / hz.max(1) as f64)
}

/// CPU seconds the whole machine spent in interrupt and softirq context so far (the `irq` and
/// `softirq` columns of `/proc/stat`'s `cpu` line). Forwarding done by tc/XDP programs and
/// veth hops runs there and is charged to no process. This kernel samples them at the
/// scheduler tick (no `CONFIG_IRQ_TIME_ACCOUNTING`), reported in `USER_HZ` units: the error
/// is about one tick per CPU per reading.
pub fn irq_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    irq_seconds_of(&stat)
}

fn irq_seconds_of(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq ...
    let ticks = f.get(5)? + f.get(6)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / hz.max(1) as f64)
}

/// Nanoseconds the BPF programs that processes `pids` hold open have run so far (the
/// `run_time_ns` of their program descriptors' fdinfo), or none when a process is gone. The
/// kernel counts it only while `kernel.bpf_stats_enabled` is 1 ([`BpfStats`]).
pub fn bpf_run_ns(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
            let is_prog = std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog");
            if !is_prog {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            total += fdinfo_field(&info, "run_time_ns").unwrap_or(0);
        }
    }
    Some(total)
}

fn fdinfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Turns the kernel's BPF run-time statistics on while it lives and restores the previous
/// setting on drop (they cost two clock reads per program run, machine-wide).
#[derive(Debug)]
pub struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> BpfStats {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        if before.as_deref().map(str::trim) != Some("1") {
            let _ = std::fs::write(BPF_STATS, "1");
        }
        BpfStats { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(b) = &self.before {
            let _ = std::fs::write(BPF_STATS, b.trim());
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Sums the samples of `metric` whose label `label` is one of `values`.
fn sum_metric(text: &str, metric: &str, label: &str, values: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter(|l| {
            values
                .iter()
                .any(|v| l.contains(&format!("{label}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn metric_sum_picks_only_the_asked_labels() {
        let text = "# HELP x\nsnas_proxy_packets_total{direction=\"node_rx\"} 10\n\
                    snas_proxy_packets_total{direction=\"internet_rx\"} 5\n\
                    snas_proxy_packets_total{direction=\"node_tx\"} 100\n\
                    snas_proxy_bytes_total{direction=\"node_rx\"} 999\n";
        assert_eq!(
            sum_metric(
                text,
                "snas_proxy_packets_total",
                "direction",
                &["node_rx", "internet_rx"]
            ),
            15
        );
    }

    #[test]
    fn kernel_drop_counters_are_read_from_the_right_columns() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  12: 1500000A:17C1 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1234 2 0000000000000000 17\n\
  13: 1500000A:17C1 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1235 2 0000000000000000 3\n\
  14: 0100007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1236 2 0000000000000000 99\n";
        assert_eq!(udp_drops(udp, 6081), 20);
        let dev = "Inter-|   Receive                                                |  Transmit\n\
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n\
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
snastun0: 1000 10 0 5 0 0 0 0 2000 20 0 42 0 0 0 0\n";
        assert_eq!(dev_tx_drops(dev, "snastun0"), 42);
        assert_eq!(dev_tx_drops(dev, "eth0"), 0);
    }

    #[test]
    fn a_programs_run_time_is_read_from_its_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t3\nrun_time_ns:\t123456\nrun_cnt:\t42\n";
        assert_eq!(fdinfo_field(info, "run_time_ns"), Some(123_456));
        assert_eq!(fdinfo_field(info, "run_cnt"), Some(42));
        assert_eq!(fdinfo_field("prog_type:\t3\n", "run_time_ns"), None);
    }

    #[test]
    fn irq_time_is_the_irq_and_softirq_columns_of_the_cpu_line() {
        let stat = "cpu  100 5 200 9000 7 30 70 0 0 0\ncpu0 50 2 100 4500 3 15 35 0 0 0\n";
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(irq_seconds_of(stat), Some(100.0 / hz));
        assert_eq!(irq_seconds_of("intr 1 2 3\n"), None);
        assert_eq!(irq_seconds_of("cpu  1 x 3\n"), None);
    }

    #[test]
    fn cpu_seconds_of_this_process_grow_with_work() {
        let me = std::process::id();
        let a = cpu_seconds(me).unwrap();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = cpu_seconds(me).unwrap();
        assert!(b > a, "{a} → {b}");
    }

    #[test]
    fn path_ids_round_trip() {
        for p in PathKind::ALL {
            assert_eq!(PathKind::from_id(p.id()), Some(p));
        }
        assert_eq!(PathKind::from_id("nope"), None);
    }

    #[test]
    fn baseline_transits_do_not_overlap_the_testbed() {
        // The testbed uses 198.51.100.0/30 and .4/30 and the pools .64/28, .80/28.
        let mut seen = Vec::new();
        for n in &BASELINES {
            let (a, b) = n.transit();
            for x in [&a, &b] {
                let last: u32 = x.rsplit('.').next().unwrap().parse().unwrap();
                assert!((8..64).contains(&last), "{x}");
                assert!(!seen.contains(x));
                seen.push(x.clone());
            }
        }
    }
}
