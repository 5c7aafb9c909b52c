//! The audit log: one JSON line per new-flow decision (tier 2), per flow end, per DNS refusal
//! and per job ended, appended to the configured file by a background thread.
//!
//! # What it owns
//! The tier-2 lines (of the one audit line type, [`snas_policy::audit::AuditLine`]; fields in
//! `docs/proxy.md`) built from the engine's events, the bounded channel between the data path and the
//! writer thread, and the count of records lost because the channel was full. The data path
//! never blocks on the log: [`AuditSink::send`] is a `try_send`.
//!
//! # Invariants
//! - One line per record, each a complete JSON object, flushed after every batch the writer
//!   drains.
//! - Records are dropped (and counted in [`AuditSink::dropped`]) rather than delaying packets.
//! - The file is created with mode 0600 (lines name tenants, jobs and destinations). After
//!   [`reopen`] (the `snas proxy` binary calls it on SIGHUP: logrotate's `postrotate`), the
//!   writer opens the path again before its next batch, so a rotated file receives nothing more.

use snas_wire::{JobKey, L4Proto};
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use snas_policy::audit::{rfc3339_secs, Action, Kind, Slot, Source};

use crate::tier2::{AuditEvent, AuditRecord, FlowEndRecord, NameMismatchRecord};

/// Bumped by [`reopen`]; the writer reopens its file when it sees a new value.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Asks every audit writer of the process to close its file and open the path again before its
/// next write (after logrotate moved the file away). Safe to call from any thread at any time.
pub fn reopen() {
    REOPEN.fetch_add(1, Ordering::SeqCst);
}

/// Opens `path` for appending (creating it 0600, and its directory).
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Records buffered between the data path and the writer.
pub const AUDIT_QUEUE: usize = 16 * 1024;

pub use snas_policy::audit::AuditLine;

/// A tier-2 line of a job (`tenant`, `job`, `job_key` set; everything optional left out).
fn line(
    unix_secs: u64,
    kind: Kind,
    action: Action,
    job_key: JobKey,
    names: (&str, &str),
) -> AuditLine {
    let mut l = AuditLine::new(rfc3339_secs(unix_secs), 2, Some(kind), action);
    l.tenant = names.0.to_owned();
    l.job = names.1.to_owned();
    l.job_key = Some(job_key);
    l
}

/// The line of an engine event.
pub fn event_line(e: &AuditEvent) -> AuditLine {
    match e {
        AuditEvent::Decision(r) => flow_line(r),
        AuditEvent::FlowEnd(r) => flow_end_line(r),
        AuditEvent::NameMismatch(r) => name_mismatch_line(r),
        AuditEvent::JobEnded(r) => {
            let mut l = job_ended_line(r.job_key, Some((&r.tenant, &r.job)), r.unix_secs);
            l.flows = Some(r.flows);
            l
        }
    }
}

/// The fields naming a flow: protocol, source, destination and the hostname it was allowed by.
fn set_flow(
    l: &mut AuditLine,
    proto: L4Proto,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    hostname: Option<&str>,
) {
    l.proto = proto.name().into();
    l.src = Slot::Value(Source::Socket(SocketAddr::from(src)));
    l.dst = Slot::Value(dst.0);
    l.port = Slot::Value(dst.1);
    l.hostname = Slot::or_absent(hostname.map(str::to_owned));
}

/// The line of the end of a flow.
pub fn flow_end_line(r: &FlowEndRecord) -> AuditLine {
    let c = r.counters;
    let mut l = line(
        r.unix_secs,
        Kind::FlowEnd,
        Action::End,
        r.job_key,
        (&r.tenant, &r.job),
    );
    set_flow(&mut l, r.proto, r.src, r.dst, r.hostname.as_deref());
    l.bytes = c.bytes_out.saturating_add(c.bytes_in);
    l.egress = Some(SocketAddr::from(r.egress));
    l.end = Some(r.end.name().into());
    l.bytes_out = Some(c.bytes_out);
    l.bytes_in = Some(c.bytes_in);
    l.packets_out = Some(c.packets_out);
    l.packets_in = Some(c.packets_in);
    l.duration_ms = Some(u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX));
    l.suppressed = r.suppressed;
    l
}

/// The line of a job its node said ended (`names`: tenant and job, if the policy is held).
pub fn job_ended_line(job_key: JobKey, names: Option<(&str, &str)>, unix_secs: u64) -> AuditLine {
    let mut l = line(
        unix_secs,
        Kind::Job,
        Action::End,
        job_key,
        names.unwrap_or(("", "")),
    );
    l.reason = Some("job_ended".into());
    l
}

/// The line of a tier-2 flow decision.
pub fn flow_line(r: &AuditRecord) -> AuditLine {
    let action = match r.action {
        crate::tier2::Action::Allow => Action::Allow,
        crate::tier2::Action::Deny => Action::Deny,
        crate::tier2::Action::Refuse => Action::Refuse,
        crate::tier2::Action::WouldDeny => Action::WouldDeny,
    };
    let mut l = line(
        r.unix_secs,
        Kind::Flow,
        action,
        r.job_key,
        (&r.tenant, &r.job),
    );
    set_flow(&mut l, r.proto, r.src, r.dst, r.hostname.as_deref());
    l.rule = Slot::or_absent(r.rule);
    l.reason = r.reason.map(|x| x.name().into());
    l.bytes = r.bytes;
    l.egress = r.egress.map(SocketAddr::from);
    l.suppressed = r.suppressed;
    l
}

/// The line of a flow cut off by the name check: `hostname` is the name on the wire (the names
/// DNS bound to the address are in the record; the line format has no field for them yet).
pub fn name_mismatch_line(r: &NameMismatchRecord) -> AuditLine {
    let mut l = line(
        r.unix_secs,
        Kind::Flow,
        Action::Deny,
        r.job_key,
        (&r.tenant, &r.job),
    );
    set_flow(&mut l, r.proto, r.src, r.dst, Some(&r.wire_name));
    l.rule = Slot::or_absent(r.rule);
    l.reason = Some(r.reason.name().into());
    l.bound = r.bound.iter().map(|b| b.to_string()).collect();
    l.suppressed = r.suppressed;
    l
}

/// The data path's end of the audit channel.
#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: SyncSender<AuditLine>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl AuditSink {
    /// Queues a line; drops and counts it if the writer is behind.
    pub fn send(&self, line: AuditLine) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Opening the audit log failed.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

/// Opens (appends to) `path` and starts the writer thread. The thread ends when every sink is
/// dropped.
pub fn start(path: &Path) -> Result<(AuditSink, JoinHandle<()>), AuditError> {
    let err = |source| AuditError {
        path: path.to_owned(),
        source,
    };
    let generation = REOPEN.load(Ordering::SeqCst);
    let file = open_log(path).map_err(err)?;
    let (tx, rx) = sync_channel(AUDIT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&written);
    let d = Arc::clone(&dropped);
    let handle = std::thread::Builder::new()
        .name("snas-audit".into())
        .spawn({
            let path = path.to_owned();
            move || writer(rx, (BufWriter::new(file), generation, &path), &w, &d)
        })
        .map_err(err)?;
    Ok((
        AuditSink {
            tx,
            dropped,
            written,
        },
        handle,
    ))
}

fn writer(
    rx: Receiver<AuditLine>,
    (mut out, mut generation, path): (BufWriter<std::fs::File>, u64, &Path),
    written: &AtomicU64,
    dropped: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let now = REOPEN.load(Ordering::SeqCst);
        if now != generation {
            generation = now;
            // Keep the old file if the path cannot be opened: lines in a rotated file are
            // better than lines lost.
            match open_log(path) {
                Ok(f) => {
                    let _ = out.flush();
                    out = BufWriter::new(f);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "audit log not reopened");
                }
            }
        }
        let mut line = Some(first);
        while let Some(l) = line.take() {
            match serde_json::to_vec(&l) {
                Ok(mut v) => {
                    v.push(b'\n');
                    if out.write_all(&v).is_ok() {
                        written.fetch_add(1, Ordering::Relaxed);
                    } else {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            line = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use snas_wire::Reason;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> AuditLine {
        job_ended_line(JobKey(0xab), Some(("acme", "build")), 1_700_000_000)
    }

    fn wait_for_lines(path: &Path, n: usize) -> usize {
        let mut count = 0;
        for _ in 0..500 {
            count = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .count();
            if count >= n {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        count
    }

    #[test]
    fn a_name_mismatch_line_carries_the_wire_name_and_the_names_bound_to_the_address() {
        let r = NameMismatchRecord {
            unix_secs: 1_700_000_000,
            reason: Reason::HostMismatch,
            tenant: "acme".into(),
            job: "build".into(),
            job_key: JobKey(0xab),
            proto: L4Proto::Tcp,
            src: ("10.255.0.2".parse().unwrap(), 40_000),
            dst: ("203.0.113.10".parse().unwrap(), 80),
            wire_name: "blocked.example.com".into(),
            bound: vec!["api.example.com".into(), "www.example.com".into()],
            rule: Some(0),
            suppressed: 0,
        };
        let json = serde_json::to_value(name_mismatch_line(&r)).unwrap();
        assert_eq!(json["reason"], "host_mismatch");
        assert_eq!(json["hostname"], "blocked.example.com");
        assert_eq!(
            json["bound"],
            serde_json::json!(["api.example.com", "www.example.com"])
        );
        let none = NameMismatchRecord { bound: vec![], ..r };
        let json = serde_json::to_value(name_mismatch_line(&none)).unwrap();
        assert!(json.get("bound").is_none(), "{json}");
    }

    #[test]
    fn the_log_is_created_0600_and_reopened_at_its_path_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let (sink, handle) = start(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        sink.send(sample());
        assert_eq!(wait_for_lines(&path, 1), 1);
        // What logrotate does: move the file away, then signal (`snas proxy` calls reopen on
        // SIGHUP).
        std::fs::rename(&path, &rotated).unwrap();
        reopen();
        for _ in 0..3 {
            sink.send(sample());
        }
        drop(sink);
        handle.join().unwrap();
        assert_eq!(wait_for_lines(&path, 3), 3);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(wait_for_lines(&rotated, 1), 1);
    }
}
