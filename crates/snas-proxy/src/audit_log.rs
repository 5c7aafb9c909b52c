//! The audit log: one JSON line per new-flow decision (tier 2) and per DNS refusal, appended to
//! the configured file by a background thread.
//!
//! # What it owns
//! The record format (`docs/proxy.md`), the bounded channel between the data path and the
//! writer thread, and the count of records lost because the channel was full. The data path
//! never blocks on the log: [`AuditSink::send`] is a `try_send`.
//!
//! # Invariants
//! - One line per record, each a complete JSON object, flushed after every batch the writer
//!   drains.
//! - Records are dropped (and counted in [`AuditSink::dropped`]) rather than delaying packets.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::tier2::AuditRecord;

/// Records buffered between the data path and the writer.
pub const AUDIT_QUEUE: usize = 16 * 1024;

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditLine {
    /// RFC 3339 time (seconds).
    pub time: String,
    /// Enforcement tier (2 here).
    pub tier: u8,
    /// `flow` or `dns`.
    pub kind: &'static str,
    /// `allow`, `deny` or `refuse`.
    pub action: &'static str,
    /// Tenant name.
    pub tenant: String,
    /// Job name.
    pub job: String,
    /// Job key, 16 hex digits.
    pub job_key: String,
    /// `tcp`, `udp`, `icmp`, `dns`.
    pub proto: String,
    /// Sandbox address and port (flows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Destination address (flows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    /// Destination port (flows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The hostname the destination was bound from, or the queried name (DNS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Index of the matching rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Reason name for deny/refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Bytes of the inner packet the decision was made on (0 for DNS).
    pub bytes: u64,
    /// NAT source (allowed flows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
}

fn rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs))
        .to_string()
}

fn proto_name(p: snas_wire::L4Proto) -> &'static str {
    match p {
        snas_wire::L4Proto::Tcp => "tcp",
        snas_wire::L4Proto::Udp => "udp",
        snas_wire::L4Proto::Icmp => "icmp",
        snas_wire::L4Proto::Icmpv6 => "icmpv6",
    }
}

impl AuditLine {
    /// The line of a tier-2 flow decision.
    pub fn from_flow(r: &AuditRecord) -> AuditLine {
        AuditLine {
            time: rfc3339(r.unix_secs),
            tier: 2,
            kind: "flow",
            action: r.action.name(),
            tenant: r.tenant.to_string(),
            job: r.job.to_string(),
            job_key: format!("{:016x}", r.job_key),
            proto: proto_name(r.proto).into(),
            src: Some(std::net::SocketAddr::from(r.src).to_string()),
            dst: Some(r.dst.0),
            port: Some(r.dst.1),
            hostname: r.hostname.as_ref().map(|h| h.to_string()),
            rule: r.rule,
            reason: r.reason.map(|x| x.name()),
            bytes: 0,
            egress: r.egress.map(|e| std::net::SocketAddr::from(e).to_string()),
        }
    }
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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let (tx, rx) = sync_channel(AUDIT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&written);
    let d = Arc::clone(&dropped);
    let handle = std::thread::Builder::new()
        .name("snas-audit".into())
        .spawn(move || writer(rx, BufWriter::new(file), &w, &d))
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
    mut out: BufWriter<std::fs::File>,
    written: &AtomicU64,
    dropped: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
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
