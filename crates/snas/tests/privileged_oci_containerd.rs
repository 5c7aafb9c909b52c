//! PRIVILEGED (root, runsc, containerd, busybox-static; scripts/setup.sh installs them):
//! `snas oci` as containerd's runc binary. The test starts a containerd of its own (its own
//! socket, root and state directories, CRI off) and a testbed of its own (agents, proxies,
//! internet), and runs busybox from a directory rootfs (Debian's static busybox; no image is
//! pulled) with `ctr run --runtime io.containerd.runc.v2 --runc-binary <snas-oci> --rootfs
//! <dir>` and the
//! job's signed policy in the `snas.dev/policy` annotation: the container reaches the allowed
//! destination and is refused the forbidden one, the job exists while it runs and is gone after
//! `--rm`; a container without the annotation does not start at all.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use snas_testbed::{Testbed, TestbedOptions};

fn snas_bin() -> PathBuf {
    std::env::var_os("SNAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/snas"))
}

fn require(tools: &[&str]) {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap();
    assert_eq!(uid, "0", "privileged test: run as root");
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{t} is missing: run scripts/setup.sh (containerd, busybox-static, runsc)"
        );
    }
    assert!(snas_bin().exists(), "build snas first and set SNAS_BIN");
}

/// containerd of the test: killed (with its shims) on drop.
struct Containerd {
    child: Child,
    address: PathBuf,
    /// The containerd namespace of the test, also the parent cgroup of its containers.
    namespace: String,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let addr = self.address.display().to_string();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims of this containerd name its socket in their command line.
        for pid in snas_sandbox::process::pids_with_arg(&addr) {
            snas_sandbox::process::kill(pid, 9);
        }
        // runsc removes the containers' cgroups, not the namespace's parent (v1: one per
        // controller).
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for ctl in rd.flatten() {
                let _ = std::fs::remove_dir(ctl.path().join(&self.namespace));
            }
        }
    }
}

fn start_containerd(dir: &Path, namespace: &str) -> Containerd {
    let address = dir.join("containerd.sock");
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{addr}\"\n[ttrpc]\n  address = \"{addr}.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            addr = address.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Containerd {
        child,
        address,
        namespace: namespace.to_owned(),
    };
    let began = Instant::now();
    while !ctr(&c, &["version"]).status.success() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "containerd did not start:\n{}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c
}

fn ctr(c: &Containerd, args: &[&str]) -> Output {
    Command::new("ctr")
        .arg("--address")
        .arg(&c.address)
        .args(["--namespace", &c.namespace])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A directory rootfs with Debian's static busybox as /bin/busybox, sh and wget.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget", "echo", "timeout"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    root
}

/// The wrapper containerd runs as its runc: `snas oci` with this testbed's agent and a state
/// directory of the test.
fn wrapper(dir: &Path, agent: &Path) -> PathBuf {
    let w = dir.join("snas-oci");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nSNAS_OCI_AGENT={agent} SNAS_OCI_STATE={state} exec {bin} oci \"$@\"\n",
            agent = agent.display(),
            state = dir.join("oci-state").display(),
            bin = snas_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w
}

/// (busybox wget's own `-T` crashes under gVisor here, so `timeout` bounds the refused one.)
const SCRIPT: &str = "wget -q -O - http://203.0.113.10/; r=$?; echo; echo allowed_rc=$r; \
    timeout 5 wget -q -O - http://203.0.113.20/; echo forbidden_rc=$?";

#[test]
fn privileged_a_containerd_container_runs_in_its_job_network_through_snas_oci() {
    require(&["containerd", "ctr", "containerd-shim-runc-v2", "runsc"]);
    let tb = Testbed::up(TestbedOptions::new(
        &snas_testbed::unique_prefix(),
        snas_bin(),
    ))
    .unwrap();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-oci", tb.prefix()))
        .tempdir_in("/run")
        .unwrap();
    let d = dir.path();
    let c = start_containerd(d, tb.prefix());
    let rootfs = busybox_rootfs(d);
    let agent = tb.topology().agent_socket(1);
    let runc = wrapper(d, &agent);
    let token = tb
        .sign_policy(
            "tenant = \"acme\"\njob = \"oci-e2e\"\nttl = \"10m\"\n[[egress]]\ncidr = \"203.0.113.10/32\"\nports = \"80\"\n",
        )
        .unwrap();
    let id = format!("{}-c1", tb.prefix());
    let annotation = format!("snas.dev/policy={token}");
    let base = [
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        "--runc-binary",
        runc.to_str().unwrap(),
        // ctr 1.6: `--rootfs` is a switch; the first operand is then the rootfs directory.
        "--rootfs",
    ];
    let mut args: Vec<&str> = base.to_vec();
    let rootfs = rootfs.to_str().unwrap();
    args.extend([
        "--annotation",
        &annotation,
        rootfs,
        &id,
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    let out = ctr(&c, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ctx = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
        )
    };
    assert!(out.status.success(), "{}", ctx());
    assert!(
        stdout.contains("hello from api.example.com (203.0.113.10)")
            && stdout.contains("allowed_rc=0"),
        "{}",
        ctx()
    );
    let forbidden = stdout
        .lines()
        .find_map(|l| l.strip_prefix("forbidden_rc="))
        .unwrap_or_else(|| panic!("{}", ctx()));
    assert_ne!(forbidden, "0", "{}", ctx());
    // The job was the agent's while the container ran; --rm deleted the container and the job.
    let audit = std::fs::read_to_string(tb.topology().node_dir(1).join("state/audit.log"))
        .unwrap_or_default();
    assert!(
        audit.contains("oci-e2e") && audit.contains("203.0.113.20"),
        "{audit}"
    );
    let jobs = tb.agent(1).list_jobs().unwrap();
    assert!(jobs.iter().all(|j| j.job != "oci-e2e"), "{jobs:?}");
    let left: Vec<_> = std::fs::read_dir(d.join("oci-state"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "job records left: {left:?}");

    // Without the annotation: refused before anything runs, no job made.
    let id2 = format!("{}-c2", tb.prefix());
    let mut args: Vec<&str> = base.to_vec();
    args.extend([rootfs, &id2, "/bin/sh", "-c", "echo ran"]);
    let out = ctr(&c, &args);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snas.dev/policy"), "{err}");
    let _ = ctr(&c, &["container", "delete", &id2]);
    assert!(tb.agent(1).list_jobs().unwrap().is_empty());
    drop(c);
}
