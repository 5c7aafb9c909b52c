//! Privileged end-to-end tests of the launcher without SNAS: a namespace lab of our own,
//! Python inside gVisor, limits, deadline and cleanup. Run as root:
//! `cargo nextest run --release -p snas-sandbox --test privileged_launcher`. Without root or
//! runsc they fail, saying which is missing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{assert_nothing_left, require_privileges, run_captured, Lab};
use snas_sandbox::limits::{Bytes, MilliCpus};
use snas_sandbox::Termination;

const NETWORK_PROBE: &str = r#"
import http.client, os, socket, errno
print("uid", os.getuid(), os.getgid())
print("resolve", socket.gethostbyname("web.lab.example"))
try:
    socket.gethostbyname("nothere.other.example")
    print("unknown-name resolved")
except socket.gaierror as e:
    print("unknown-name fails")
c = http.client.HTTPConnection("web.lab.example", 80, timeout=5)
c.request("GET", "/")
r = c.getresponse()
print("http", r.status, r.read().decode().strip())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"ping-udp", ("203.0.113.10", 7))
print("udp", u.recvfrom(100)[0].decode())
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    print("raw socket allowed")
except OSError as e:
    print("raw socket refused", errno.errorcode.get(e.errno))
try:
    open("/etc/snas-test", "w")
    print("root writable")
except OSError:
    print("root read-only")
open("/tmp/x", "w").write("ok")
print("tmp writable")
"#;

#[test]
fn python_in_gvisor_resolves_fetches_and_is_confined() {
    require_privileges();
    let lab = Lab::new();
    let opts = lab.options(&["/usr/bin/python3", "-c", NETWORK_PROBE]);
    let c = run_captured(&opts);
    assert_eq!(
        c.report.termination,
        Termination::Exited(0),
        "stderr: {}",
        c.stderr
    );
    let out = c.stdout;
    assert!(out.contains("uid 65534 65534"), "{out}");
    assert!(out.contains("resolve 203.0.113.10"), "{out}");
    assert!(out.contains("unknown-name fails"), "{out}");
    assert!(out.contains("http 200 hello from the lab"), "{out}");
    assert!(out.contains("udp ping-udp"), "{out}");
    assert!(out.contains("raw socket refused"), "{out}");
    assert!(out.contains("root read-only"), "{out}");
    assert!(out.contains("tmp writable"), "{out}");
    assert_nothing_left(&lab.state_dir, &c.report.id);
}

#[test]
fn namespace_serves_several_runs_because_the_address_is_put_back() {
    require_privileges();
    let lab = Lab::new();
    let probe = "import socket; s=socket.create_connection(('203.0.113.10',80),timeout=5); print('connected')";
    let opts = lab.options(&["/usr/bin/python3", "-c", probe]);
    let first = run_captured(&opts);
    assert!(first.stdout.contains("connected"), "{}", first.stderr);
    assert!(!first.report.readded_address);
    let second = run_captured(&opts);
    assert!(second.stdout.contains("connected"), "{}", second.stderr);
    assert!(
        second.report.readded_address,
        "runsc should have taken the address"
    );
}

#[test]
fn workload_exit_status_is_passed_on() {
    require_privileges();
    let lab = Lab::new();
    let c = run_captured(&lab.options(&[
        "/usr/bin/python3",
        "-c",
        "import sys; print('bye'); sys.exit(3)",
    ]));
    assert_eq!(c.report.termination, Termination::Exited(3));
    assert_eq!(c.report.termination.exit_code(), 3);
    assert_eq!(c.stdout.trim(), "bye");
    assert_nothing_left(&lab.state_dir, &c.report.id);
}

#[test]
fn memory_limit_kills_the_sandbox_and_is_reported() {
    require_privileges();
    let lab = Lab::new();
    let mut opts = lab.options(&[
        "/usr/bin/python3",
        "-c",
        "b = bytearray(1 << 30); b[::4096] = b'x' * len(b[::4096]); print('allocated')",
    ]);
    opts.bundle.limits.memory = Bytes(128 << 20);
    let c = run_captured(&opts);
    assert_eq!(
        c.report.termination,
        Termination::MemoryLimit(Bytes(128 << 20)),
        "stdout {} stderr {}",
        c.stdout,
        c.stderr
    );
    assert_eq!(c.report.termination.exit_code(), 137);
    assert_eq!(
        c.report.termination.to_string(),
        "killed: memory limit (128M) exceeded"
    );
    assert!(!c.stdout.contains("allocated"));
    assert!(c.report.events.oom_kills > 0);
    assert_nothing_left(&lab.state_dir, &c.report.id);
}

const FORK_BOMB: &str = r#"
import os, errno, time
kids = []
try:
    while len(kids) < 1000:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    print("no limit hit")
except OSError as e:
    print("fork failed", errno.errorcode.get(e.errno), "after", len(kids))
for k in kids:
    os.kill(k, 9)
"#;

#[test]
fn pids_limit_stops_a_fork_bomb_and_is_reported() {
    require_privileges();
    let lab = Lab::new();
    let mut opts = lab.options(&["/usr/bin/python3", "-c", FORK_BOMB]);
    opts.bundle.limits.pids = 96;
    opts.timeout = Some(Duration::from_secs(60));
    let c = run_captured(&opts);
    assert!(!c.stdout.contains("no limit hit"), "{}", c.stdout);
    assert!(
        c.report.events.pids_max_hits > 0,
        "stdout {} stderr {}",
        c.stdout,
        c.stderr
    );
    // Either the workload saw EAGAIN and went on (a note says so), or the sandbox died
    // because the sentry could not make a task (the termination says so, with its own exit
    // status). On systrap (20240729) the sentry panics: `unable to activate mm:
    // createSysmsgThread: failed to get clone`.
    let said = format!("{} {}", c.report.termination, c.report.notes().join(" "));
    assert!(said.contains("pids limit (96) reached"), "{said}");
    match c.report.termination {
        Termination::PidsLimit { limit, .. } => {
            assert_eq!(limit, 96);
            assert_eq!(c.report.termination.exit_code(), 123);
        }
        Termination::Exited(0) => assert!(c.stdout.contains("fork failed"), "{}", c.stdout),
        other => panic!("unexpected termination {other:?}: {}", c.stderr),
    }
    assert_nothing_left(&lab.state_dir, &c.report.id);
}

#[test]
fn timeout_kills_the_workload_exits_124_and_leaves_nothing() {
    require_privileges();
    let lab = Lab::new();
    let mut opts = lab.options(&["/usr/bin/sleep", "30"]);
    opts.timeout = Some(Duration::from_secs(2));
    opts.bundle.limits.cpus = MilliCpus(500);
    let c = run_captured(&opts);
    assert_eq!(
        c.report.termination,
        Termination::TimedOut(Duration::from_secs(2))
    );
    assert_eq!(c.report.termination.exit_code(), 124);
    assert_eq!(c.report.termination.to_string(), "timed out after 2s");
    assert!(c.report.leftovers.is_empty(), "{:?}", c.report.leftovers);
    assert_nothing_left(&lab.state_dir, &c.report.id);
    // Nothing of the run is left; only the skeleton all runs share stays.
    let left: Vec<String> = std::fs::read_dir(&lab.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec![snas_sandbox::bundle::HOST_USR_SKELETON.to_owned()]
    );
}

#[test]
fn custom_rootfs_is_used_read_only_with_the_generated_etc_files() {
    require_privileges();
    let lab = Lab::new();
    // The host's own root as the image: it has everything, and must stay untouched.
    let mut opts = lab.options(&[
        "/bin/sh",
        "-c",
        "cat /etc/resolv.conf; touch /snas-rootfs-probe 2>/dev/null && echo wrote || echo read-only",
    ]);
    opts.bundle.rootfs = snas_sandbox::bundle::Rootfs::Dir("/".into());
    // uid 0 owns `/`, so only the read-only mount can refuse the write (no capabilities are
    // needed for an owner's write).
    opts.bundle.uid = 0;
    opts.bundle.gid = 0;
    let c = run_captured(&opts);
    assert_eq!(c.report.termination, Termination::Exited(0), "{}", c.stderr);
    assert!(c.stdout.contains("nameserver 203.0.113.10"), "{}", c.stdout);
    assert!(c.stdout.contains("read-only"), "{}", c.stdout);
    assert!(!std::path::Path::new("/snas-rootfs-probe").exists());
    assert_nothing_left(&lab.state_dir, &c.report.id);
}
