//! The `fq` qdisc, which EDT pacing needs on the uplink: detection and installation.
//!
//! Detection tries `tc qdisc add dev lo root fq` inside a throwaway network namespace created by
//! `unshare(CLONE_NEWNET)` on a short-lived thread (namespaces are per thread), so nothing on
//! the host changes and nothing is left behind when the thread ends. Needs root and `tc`.
//!
//! Installation ([`install_fq`], called by the agent for its uplink) follows what EDT users do
//! on multi-queue NICs: `mq` at the root with one `fq` per transmit queue, so that the queues
//! stay lock-free; a single-queue device gets `fq` at the root. `replace` makes it idempotent.

use std::io;
use std::process::{Command, Stdio};

/// Whether this kernel can create an `fq` qdisc.
pub fn fq_available() -> io::Result<bool> {
    let t = std::thread::spawn(|| -> io::Result<bool> {
        // SAFETY: unshare only changes this thread's namespaces; no memory is involved.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let status = Command::new("tc")
            .args(["qdisc", "add", "dev", "lo", "root", "fq"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        Ok(status.success())
    });
    t.join()
        .map_err(|_| io::Error::other("fq probe thread panicked"))?
}

/// The `tc` invocations that put `fq` on `dev` with `tx_queues` transmit queues.
pub fn fq_commands(dev: &str, tx_queues: usize) -> Vec<Vec<String>> {
    let base = |rest: &[&str]| -> Vec<String> {
        ["qdisc", "replace", "dev", dev]
            .iter()
            .chain(rest)
            .map(|s| (*s).to_owned())
            .collect()
    };
    if tx_queues <= 1 {
        return vec![base(&["root", "fq"])];
    }
    let mut v = vec![base(&["root", "handle", "1:", "mq"])];
    for q in 1..=tx_queues {
        let parent = format!("1:{q:x}");
        v.push(base(&["parent", &parent, "fq"]));
    }
    v
}

/// Transmit queues of `dev` (its `/sys/class/net/<dev>/queues/tx-*` entries; 1 if unknown).
pub fn tx_queues(dev: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{dev}/queues"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tx-"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// Installs `fq` on `dev` (in the caller's network namespace): `mq` + one `fq` per transmit
/// queue, or `fq` at the root of a single-queue device.
pub fn install_fq(dev: &str) -> io::Result<()> {
    for args in fq_commands(dev, tx_queues(dev)) {
        let out = Command::new("tc")
            .args(&args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "`tc {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiqueue_device_gets_mq_with_one_fq_per_queue() {
        let c = fq_commands("eth0", 12);
        assert_eq!(c.len(), 13);
        assert_eq!(c[0].join(" "), "qdisc replace dev eth0 root handle 1: mq");
        assert_eq!(c[1].join(" "), "qdisc replace dev eth0 parent 1:1 fq");
        assert_eq!(c[10].join(" "), "qdisc replace dev eth0 parent 1:a fq");
        assert_eq!(c[12].join(" "), "qdisc replace dev eth0 parent 1:c fq");
    }

    #[test]
    fn a_single_queue_device_gets_fq_at_the_root() {
        assert_eq!(
            fq_commands("ul0", 1),
            vec![vec!["qdisc", "replace", "dev", "ul0", "root", "fq"]]
        );
        assert_eq!(fq_commands("ul0", 0).len(), 1);
    }
}
