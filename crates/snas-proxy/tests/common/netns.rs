//! Network-namespace helpers for the privileged tests and the benchmark: the node / proxy /
//! internet topology of `privileged_e2e_netns.rs` (unique names per run, deleted by a guard), and running
//! code inside a namespace.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespaces on drop (veths and the TUN device go with them).
pub struct Netns(pub Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns` (threads it spawns stay there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap();
        // SAFETY: fd is an open netns file; setns changes only this thread's namespace.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
    .join()
    .unwrap()
}

/// Spawns a long-lived thread inside `ns`.
pub fn spawn_in_ns(ns: &str, f: impl FnOnce() + Send + 'static) {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap();
        // SAFETY: as in `in_ns`.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    });
}

pub fn topology(p: &str) -> (Netns, [String; 3]) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "privileged test: needs root (network namespaces, TUN, nftables); run it as root, or \
         run the unprivileged tests only: cargo nextest run --profile unprivileged"
    );
    let names = [
        format!("{p}-node"),
        format!("{p}-proxy"),
        format!("{p}-inet"),
    ];
    let guard = Netns(names.to_vec());
    for n in &names {
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    let [node, proxy, inet] = &names;
    let (a, b) = (format!("{p}a0"), format!("{p}a1"));
    sh(&[
        "ip", "link", "add", &a, "netns", node, "type", "veth", "peer", "name", &b, "netns", proxy,
    ]);
    sh(&["ip", "-n", node, "addr", "add", "192.0.2.11/24", "dev", &a]);
    sh(&["ip", "-n", node, "link", "set", &a, "up"]);
    sh(&["ip", "-n", proxy, "addr", "add", "192.0.2.21/24", "dev", &b]);
    sh(&["ip", "-n", proxy, "link", "set", &b, "up"]);
    let (c, d) = (format!("{p}b0"), format!("{p}b1"));
    sh(&[
        "ip", "link", "add", &c, "netns", proxy, "type", "veth", "peer", "name", &d, "netns", inet,
    ]);
    sh(&[
        "ip",
        "-n",
        proxy,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        &c,
    ]);
    sh(&["ip", "-n", proxy, "link", "set", &c, "up"]);
    sh(&[
        "ip",
        "-n",
        proxy,
        "route",
        "add",
        "default",
        "via",
        "203.0.113.10",
    ]);
    sh(&[
        "ip",
        "-n",
        inet,
        "addr",
        "add",
        "203.0.113.10/24",
        "dev",
        &d,
    ]);
    sh(&[
        "ip",
        "-n",
        inet,
        "addr",
        "add",
        "203.0.113.20/24",
        "dev",
        &d,
    ]);
    sh(&["ip", "-n", inet, "link", "set", &d, "up"]);
    sh(&[
        "ip",
        "-n",
        inet,
        "route",
        "add",
        "198.51.100.64/28",
        "via",
        "203.0.113.1",
    ]);
    (guard, names)
}
