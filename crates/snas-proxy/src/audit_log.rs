//! The audit log: one JSON line per new-flow decision (tier 2), per flow end, per DNS refusal
//! and per job ended, appended to the configured file by a background thread.
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

use crate::nat::IpProto;
use crate::tier2::{AuditEvent, AuditRecord, FlowEndRecord};

/// Records buffered between the data path and the writer.
pub const AUDIT_QUEUE: usize = 16 * 1024;

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditLine {
    /// RFC 3339 time (seconds).
    pub time: String,
    /// Enforcement tier (2 here).
    pub tier: u8,
    /// `flow` (new-flow decision), `flow_end`, `dns` or `job`.
    pub kind: &'static str,
    /// `allow`, `deny`, `refuse` (decisions, DNS), `end` (flow_end, job).
    pub action: &'static str,
    /// Tenant name.
    pub tenant: String,
    /// Job name.
    pub job: String,
    /// Job key, 16 hex digits.
    pub job_key: String,
    /// `tcp`, `udp`, `icmp`, `dns` (absent on job lines).
    #[serde(skip_serializing_if = "String::is_empty")]
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
    /// Bytes of the inner packet the decision was made on (0 for DNS and jobs); for
    /// `flow_end`, the flow's bytes both ways.
    pub bytes: u64,
    /// NAT source (allowed flows, flow ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    /// Why the flow ended (`idle`, `closed`, `policy_expired`, `job_ended`, `policy_gone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<&'static str>,
    /// Flow ends: bytes sandbox → internet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Flow ends: bytes internet → sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Flow ends: packets sandbox → internet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_out: Option<u32>,
    /// Flow ends: packets internet → sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_in: Option<u32>,
    /// Flow ends: first to last packet, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Job ended: flows removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
    /// Lines of this job left out (over its per-job budget) since its previous line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
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

/// The lower-case name of a conntrack protocol.
pub fn ip_proto_name(p: IpProto) -> &'static str {
    match p {
        IpProto::Tcp => "tcp",
        IpProto::Udp => "udp",
        IpProto::Icmp => "icmp",
        IpProto::Icmpv6 => "icmpv6",
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

impl AuditLine {
    /// The line of an engine event.
    pub fn from_event(e: &AuditEvent) -> AuditLine {
        match e {
            AuditEvent::Decision(r) => AuditLine::from_flow(r),
            AuditEvent::FlowEnd(r) => AuditLine::from_flow_end(r),
            AuditEvent::JobEnded(r) => {
                let mut line =
                    AuditLine::job_ended(r.job_key, Some((&r.tenant, &r.job)), r.unix_secs);
                line.flows = Some(r.flows);
                line
            }
        }
    }

    /// The line of the end of a flow.
    pub fn from_flow_end(r: &FlowEndRecord) -> AuditLine {
        let c = r.counters;
        AuditLine {
            time: rfc3339(r.unix_secs),
            tier: 2,
            kind: "flow_end",
            action: "end",
            tenant: r.tenant.to_string(),
            job: r.job.to_string(),
            job_key: format!("{:016x}", r.job_key),
            proto: ip_proto_name(r.proto).into(),
            src: Some(std::net::SocketAddr::from(r.src).to_string()),
            dst: Some(r.dst.0),
            port: Some(r.dst.1),
            hostname: r.hostname.as_ref().map(|h| h.to_string()),
            rule: None,
            reason: None,
            bytes: c.bytes_out.saturating_add(c.bytes_in),
            egress: Some(std::net::SocketAddr::from(r.egress).to_string()),
            end: Some(r.end.name()),
            bytes_out: Some(c.bytes_out),
            bytes_in: Some(c.bytes_in),
            packets_out: Some(c.packets_out),
            packets_in: Some(c.packets_in),
            duration_ms: Some(u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX)),
            flows: None,
            suppressed: nonzero(r.suppressed),
        }
    }

    /// The line of a job its node said ended (`names`: tenant and job, if the policy is held).
    pub fn job_ended(job_key: u64, names: Option<(&str, &str)>, unix_secs: u64) -> AuditLine {
        let (tenant, job) = names.unwrap_or(("", ""));
        AuditLine {
            time: rfc3339(unix_secs),
            tier: 2,
            kind: "job",
            action: "end",
            tenant: tenant.to_owned(),
            job: job.to_owned(),
            job_key: format!("{job_key:016x}"),
            proto: String::new(),
            src: None,
            dst: None,
            port: None,
            hostname: None,
            rule: None,
            reason: Some("job_ended"),
            bytes: 0,
            egress: None,
            end: None,
            bytes_out: None,
            bytes_in: None,
            packets_out: None,
            packets_in: None,
            duration_ms: None,
            flows: None,
            suppressed: None,
        }
    }

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
            bytes: r.bytes,
            egress: r.egress.map(|e| std::net::SocketAddr::from(e).to_string()),
            end: None,
            bytes_out: None,
            bytes_in: None,
            packets_out: None,
            packets_in: None,
            duration_ms: None,
            flows: None,
            suppressed: nonzero(r.suppressed),
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
