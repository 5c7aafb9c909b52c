//! Shared helpers of the privileged launcher tests: a two-namespace lab (sandbox namespace
//! ↔ server namespace over a veth, all in documentation ranges) with HTTP, UDP echo and DNS
//! servers, output capture, and checks that a run left nothing behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use snas_sandbox::bundle::BundleSpec;
use snas_sandbox::launch::{self, Progress, RunOptions, RunReport, Stdio3};
use snas_sandbox::netcfg::NetConfig;

/// Sandbox address (its /30 with the gateway).
pub const SANDBOX_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Gateway (server namespace side of the veth).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The lab's server address (on the server namespace's `lo`).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Fails the test, saying what is missing, unless it runs as root with runsc on `PATH`: a
/// privileged test that cannot run must never pass (`cargo nextest run --profile unprivileged`
/// leaves these `privileged_*` binaries out and lists them as skipped).
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "privileged test: needs root (namespaces, cgroups, runsc); run it as root, or run the \
         unprivileged tests only: cargo nextest run --profile unprivileged"
    );
    let runsc = Command::new("runsc")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        runsc,
        "privileged test: needs runsc on PATH (scripts/setup.sh installs it)"
    );
}

fn unique(tag: &str) -> String {
    format!(
        "snsb{tag}{:x}{:04x}",
        std::process::id() & 0xffff,
        rand_u16()
    )
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() ^ (t.as_secs() as u32)) as u16
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sandbox namespace + server namespace with servers; removed on drop.
pub struct Lab {
    pub sb: String,
    pub srv: String,
    pub state_dir: PathBuf,
    server: Option<Child>,
}

impl Lab {
    pub fn new() -> Lab {
        let sb = unique("s");
        let srv = unique("v");
        let state_dir = PathBuf::from(format!("/run/{}", unique("st")));
        ip(&["netns", "add", &sb]);
        let mut lab = Lab {
            sb,
            srv,
            state_dir,
            server: None,
        };
        ip(&["netns", "add", &lab.srv]);
        let (sb, srv) = (lab.sb.clone(), lab.srv.clone());
        ip(&[
            "-n", &srv, "link", "add", "gw0", "type", "veth", "peer", "name", "eth0", "netns", &sb,
        ]);
        ip(&["-n", &srv, "addr", "add", "192.0.2.1/30", "dev", "gw0"]);
        ip(&["-n", &srv, "addr", "add", "203.0.113.10/32", "dev", "lo"]);
        ip(&["-n", &srv, "link", "set", "gw0", "up"]);
        ip(&["-n", &srv, "link", "set", "lo", "up"]);
        ip(&["-n", &sb, "addr", "add", "192.0.2.2/30", "dev", "eth0"]);
        ip(&["-n", &sb, "link", "set", "eth0", "up"]);
        ip(&["-n", &sb, "link", "set", "lo", "up"]);
        ip(&["-n", &sb, "route", "add", "default", "via", "192.0.2.1"]);
        // Offloads off, as the agent does for job veths.
        let _ = Command::new("ip")
            .args(["netns", "exec", &sb, "ethtool", "-K", "eth0", "tx", "off"])
            .output();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/lab_server.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &srv, "/usr/bin/python3", "-u"])
            .arg(script)
            .arg(SERVER_IP.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "lab server did not start");
        lab.server = Some(child);
        lab
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.sb)
    }

    pub fn net(&self) -> NetConfig {
        NetConfig {
            netns: self.netns_path(),
            iface: "eth0".into(),
            addr: SANDBOX_IP,
            prefix_len: 30,
            gateway: GATEWAY_IP,
            ipv6: None,
        }
    }

    /// Options for running `args` in the lab's sandbox namespace, resolver = the server.
    pub fn options(&self, args: &[&str]) -> RunOptions {
        let mut spec = BundleSpec::new(
            args.iter().map(|s| s.to_string()).collect(),
            self.netns_path(),
            String::new(),
        );
        spec.nameservers = vec![SERVER_IP];
        let mut o = RunOptions::new(spec);
        o.state_dir = self.state_dir.clone();
        o.net = Some(self.net());
        o
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.sb]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.srv])
            .status();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// What a captured run printed.
pub struct Captured {
    pub report: RunReport,
    pub stdout: String,
    pub stderr: String,
    pub progress: Vec<Progress>,
}

/// Runs with stdout/stderr captured through pipes (not files: gVisor writes regular files at
/// its own offset).
pub fn run_captured(opts: &RunOptions) -> Captured {
    let (mut out_r, out_w) = snas_sandbox::process::pipe().unwrap();
    let (mut err_r, err_w) = snas_sandbox::process::pipe().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        out_r.read_to_string(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err_r.read_to_string(&mut s).unwrap();
        s
    });
    let mut progress = Vec::new();
    let report = launch::run(
        opts,
        Stdio3 {
            stdin: Stdio::null(),
            stdout: out_w.into(),
            stderr: err_w.into(),
        },
        &mut |p| progress.push(p),
    )
    .unwrap();
    Captured {
        report,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        progress,
    }
}

/// Asserts that the run `id` left no processes, cgroup directories or state behind.
pub fn assert_nothing_left(state_dir: &Path, id: &str) {
    let run_dir = state_dir.join(id);
    assert!(!run_dir.exists(), "{} still exists", run_dir.display());
    let root_arg = run_dir.join("root").display().to_string();
    assert_eq!(
        snas_sandbox::process::pids_with_arg(&root_arg),
        Vec::<i32>::new(),
        "runsc processes of {id} remain"
    );
    let name = format!("snas-{id}");
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let d = h.unwrap().path().join(&name);
        assert!(!d.exists(), "cgroup {} remains", d.display());
    }
}
