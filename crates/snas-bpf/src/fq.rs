//! Detection of the `fq` qdisc, which EDT pacing needs on the uplink.
//!
//! Tries `tc qdisc add dev lo root fq` inside a throwaway network namespace created by
//! `unshare(CLONE_NEWNET)` on a short-lived thread (namespaces are per thread), so nothing on
//! the host changes and nothing is left behind when the thread ends. Needs root and `tc`.
//! Installing fq on the uplink is the agent's job.

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
