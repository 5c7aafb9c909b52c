//! The agent's audit log: one JSON object per line in the configured file.
//!
//! Owns the agent's records ([`AuditRecord`]: tier-1 events and DNS decisions, as the DNS stub
//! and the tier-1 reader produce them) and the writer: producers hand records to an
//! [`AuditSink`] that never blocks (a bounded queue; what does not fit is counted as dropped),
//! and one background thread appends each as a line of the audit line type both tiers share
//! ([`snas_policy::audit::AuditLine`], [`AuditRecord::line`]; fields in `docs/dns.md`).
//!
//! # Invariants
//! - Emitting never blocks and never fails: the DNS path and the API are never slowed by disk.
//! - Every line is one complete JSON object (written with one `write_all` of the line).
//!
//! # Limits
//! - At most [`QUEUE`] records wait for the writer; the rest are dropped and counted
//!   ([`AuditSink::dropped`], exported as a metric).
//! - The file is opened in append mode, created with mode 0600 (audit lines name tenants, jobs
//!   and destinations), and never rotated by the agent. After [`reopen`] (the `snas agent`
//!   binary calls it on SIGHUP: logrotate's `postrotate`), the writer closes the file and opens
//!   the path again before it writes its next batch, so a rotated file receives nothing more.
//!   Until that next batch the old file stays open (harmless: nothing is written to it).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bumped by [`reopen`]; each writer reopens its file when it sees a new value.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Asks every audit writer of the process to close its file and open the path again before its
/// next write (after logrotate moved the file away). Safe to call from any thread at any time.
pub fn reopen() {
    REOPEN.fetch_add(1, Ordering::SeqCst);
}
use std::time::SystemTime;

use snas_policy::audit::{AuditLine, Kind, Slot, Source};
use snas_wire::{JobKey, L4Proto};
use tokio::sync::mpsc;

pub use snas_policy::audit::Action;

/// Records that may wait for the writer.
pub const QUEUE: usize = 8192;

/// One record of the agent (written as one [`AuditLine`], see [`AuditRecord::line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// RFC 3339 time (UTC, milliseconds).
    pub time: String,
    /// Enforcement tier (the agent writes tier 1).
    pub tier: u8,
    /// `Kind::Dns` for DNS decisions; none for packet events.
    pub kind: Option<Kind>,
    /// Decision.
    pub action: Action,
    /// Tenant name (empty when the job is unknown).
    pub tenant: String,
    /// Job name (empty when the job is unknown).
    pub job: String,
    /// The job's key (tier-1 events and DNS queries always carry one).
    pub job_key: JobKey,
    /// `"tcp"`, `"udp"`, `"icmp"` or the protocol number.
    pub proto: String,
    /// Source address (the sandbox).
    pub src: Option<IpAddr>,
    /// Destination address (for DNS: the stub the query reached).
    pub dst: Option<IpAddr>,
    /// Destination port.
    pub port: u16,
    /// The host name (DNS: the queried name).
    pub hostname: Option<String>,
    /// The matching rule's index in the policy, if one matched.
    pub rule: Option<usize>,
    /// Why (`snas_wire::Reason` name, or `allowed`).
    pub reason: String,
    /// Bytes of the packet or DNS message.
    pub bytes: u64,
    /// DNS only: the query type.
    pub qtype: Option<String>,
    /// DNS only: the addresses installed into tier 1.
    pub addrs: Vec<IpAddr>,
    /// DNS refusals of this job left out of the log (per-job audit limit) since its previous
    /// refusal line.
    pub suppressed: u64,
}

impl AuditRecord {
    /// The line written for the record: `src`, `dst`, `hostname` and `rule` always present
    /// (`null` when empty), `port` always, `kind`, `qtype`, `addrs` and `suppressed` only when
    /// set.
    pub fn line(&self) -> AuditLine {
        let mut l = AuditLine::new(self.time.clone(), self.tier, self.kind, self.action);
        l.tenant = self.tenant.clone();
        l.job = self.job.clone();
        l.job_key = Some(self.job_key);
        l.proto = self.proto.clone();
        l.src = Slot::or_null(self.src.map(Source::Addr));
        l.dst = Slot::or_null(self.dst);
        l.port = Slot::Value(self.port);
        l.hostname = Slot::or_null(self.hostname.clone());
        l.rule = Slot::or_null(self.rule);
        l.reason = Some(self.reason.clone().into());
        l.bytes = self.bytes;
        l.qtype = self.qtype.clone();
        l.addrs = self.addrs.clone();
        l.suppressed = self.suppressed;
        l
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    snas_policy::audit::rfc3339_millis(t)
}

/// Protocol number → audit name: [`L4Proto::name`], or the number for any other protocol.
pub fn proto_name(proto: u8) -> String {
    L4Proto::from_number(proto).map_or_else(|| proto.to_string(), |p| p.name().to_owned())
}

/// The audit record of a tier-1 ring-buffer event. `policy` names the job (None: a job the
/// agent no longer knows); `hostname` is the name the job's DNS answers bound to the
/// destination, if any ([`crate::Agent::bound_name`]); `wall_now`/`mono_now` convert the
/// event's monotonic time.
pub fn tier1_record(
    ev: &snas_bpf::AuditEvent,
    policy: Option<&crate::seams::VerifiedPolicy>,
    hostname: Option<String>,
    wall_now: SystemTime,
    mono_now: std::time::Duration,
) -> AuditRecord {
    let at = wall_now
        .checked_sub(mono_now.saturating_sub(ev.at_mono))
        .unwrap_or(wall_now);
    let (action, reason) = match ev.kind {
        snas_bpf::AuditKind::Deny(r) => (Action::Deny, r.name().to_owned()),
        snas_bpf::AuditKind::NewFlow => (Action::Allow, "new_flow".to_owned()),
        snas_bpf::AuditKind::WouldDeny(r) => (Action::WouldDeny, r.name().to_owned()),
    };
    AuditRecord {
        time: rfc3339(at),
        tier: 1,
        kind: None,
        action,
        tenant: policy.map(|p| p.tenant.clone()).unwrap_or_default(),
        job: policy.map(|p| p.job.clone()).unwrap_or_default(),
        job_key: ev.job_key,
        proto: proto_name(ev.proto),
        src: Some(ev.src.ip()),
        dst: Some(ev.dst.ip()),
        port: ev.dst.port(),
        hostname,
        rule: None,
        reason,
        bytes: 0,
        qtype: None,
        addrs: Vec::new(),
        suppressed: 0,
    }
}

/// Where records go. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: Option<mpsc::Sender<AuditRecord>>,
    emitted: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl AuditSink {
    /// A sink that discards everything (counts them as dropped).
    pub fn discard() -> AuditSink {
        AuditSink {
            tx: None,
            emitted: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// A sink and the receiving end (for [`spawn_writer`] or a test).
    pub fn channel() -> (AuditSink, mpsc::Receiver<AuditRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            AuditSink {
                tx: Some(tx),
                emitted: Arc::default(),
                dropped: Arc::default(),
            },
            rx,
        )
    }

    /// Queues a record; never blocks.
    pub fn emit(&self, rec: AuditRecord) {
        let ok = self.tx.as_ref().is_some_and(|tx| tx.try_send(rec).is_ok());
        let c = if ok { &self.emitted } else { &self.dropped };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records queued so far.
    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full or the writer gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file (or its directory) could not be opened.
    #[error("audit_log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Opens `path` for appending and starts the writer thread; it ends when every sink is dropped.
pub fn spawn_writer(path: &Path) -> Result<AuditSink, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let generation = REOPEN.load(Ordering::SeqCst);
    let file = open_log(path).map_err(open_err)?;
    let (sink, rx) = AuditSink::channel();
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("snas-audit".into())
        .spawn({
            let path = path.to_owned();
            move || write_loop(file, generation, rx, &path, &shown)
        })
        .map_err(open_err)?;
    Ok(sink)
}

/// Opens `path` for appending (creating it 0600, and its directory).
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn write_loop(
    file: std::fs::File,
    mut generation: u64,
    mut rx: mpsc::Receiver<AuditRecord>,
    file_path: &Path,
    path: &str,
) {
    let mut out = std::io::BufWriter::new(file);
    let mut warned = false;
    while let Some(first) = rx.blocking_recv() {
        let now = REOPEN.load(Ordering::SeqCst);
        if now != generation {
            generation = now;
            // Keep writing to the old file if the path cannot be opened: lines in a rotated
            // file are better than lines lost.
            match open_log(file_path) {
                Ok(f) => {
                    let _ = out.flush();
                    out = std::io::BufWriter::new(f);
                    warned = false;
                }
                Err(e) => tracing::warn!(path, error = %e, "audit log not reopened"),
            }
        }
        let mut next = Some(first);
        while let Some(rec) = next {
            match serde_json::to_vec(&rec.line()) {
                Ok(mut line) => {
                    line.push(b'\n');
                    if let Err(e) = out.write_all(&line) {
                        if !warned {
                            tracing::warn!(path, error = %e, "audit log write failed");
                            warned = true;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "audit record not serialisable"),
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            if !warned {
                tracing::warn!(path, error = %e, "audit log flush failed");
                warned = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            time: rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1500)),
            tier: 1,
            kind: Some(Kind::Dns),
            action: Action::Refuse,
            tenant: "acme".into(),
            job: "build".into(),
            job_key: JobKey(0xff),
            proto: proto_name(17),
            src: Some("10.255.0.2".parse().unwrap()),
            dst: Some("10.255.0.1".parse().unwrap()),
            port: 53,
            hostname: Some("evil.example.net".into()),
            rule: None,
            reason: "dns_refused".into(),
            bytes: 40,
            qtype: Some("A".into()),
            addrs: vec![],
            suppressed: 0,
        }
    }

    #[test]
    fn writer_appends_one_json_object_per_line_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        let sink = spawn_writer(&path).unwrap();
        sink.emit(record());
        let mut allow = record();
        allow.action = Action::Allow;
        allow.addrs = vec!["203.0.113.10".parse().unwrap()];
        allow.rule = Some(2);
        sink.emit(allow);
        drop(sink);
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for l in &lines {
            for f in [
                "time", "tier", "action", "tenant", "job", "job_key", "proto", "src", "dst",
                "port", "hostname", "rule", "reason", "bytes", "kind",
            ] {
                assert!(l.get(f).is_some(), "missing {f} in {l}");
            }
        }
        assert_eq!(lines[0]["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(lines[0]["action"], "refuse");
        assert_eq!(lines[0]["rule"], serde_json::Value::Null);
        assert_eq!(lines[1]["action"], "allow");
        assert_eq!(lines[1]["addrs"][0], "203.0.113.10");
        assert_eq!(lines[1]["rule"], 2);
    }

    #[test]
    fn tier1_events_become_deny_records_at_wall_time() {
        let ev = snas_bpf::AuditEvent {
            at_mono: std::time::Duration::from_secs(100),
            job_key: JobKey(0xab),
            kind: snas_bpf::AuditKind::Deny(snas_wire::Reason::PortDenied),
            proto: 6,
            src: "10.255.0.2:40000".parse().unwrap(),
            dst: "203.0.113.10:25".parse().unwrap(),
        };
        let wall = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        let r = tier1_record(&ev, None, None, wall, std::time::Duration::from_secs(103));
        assert_eq!(r.time, "1970-01-01T00:16:37.000Z");
        assert_eq!(r.action, Action::Deny);
        assert_eq!(r.reason, "port_denied");
        assert_eq!(r.proto, "tcp");
        assert_eq!(r.port, 25);
        assert_eq!(r.dst, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(r.line().job_key, Some(JobKey(0xab)));
        assert_eq!(r.kind, None);
    }

    #[test]
    fn a_tier1_would_deny_line_names_the_host_bound_to_its_destination() {
        let ev = snas_bpf::AuditEvent {
            at_mono: std::time::Duration::from_secs(100),
            job_key: JobKey(0xab),
            kind: snas_bpf::AuditKind::WouldDeny(snas_wire::Reason::DestinationDenied),
            proto: 6,
            src: "10.255.0.2:40000".parse().unwrap(),
            dst: "203.0.113.10:443".parse().unwrap(),
        };
        let wall = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        let mono = std::time::Duration::from_secs(100);
        let r = tier1_record(&ev, None, Some("api.example.com".into()), wall, mono);
        assert_eq!(r.action, Action::WouldDeny);
        assert_eq!(r.reason, "destination_denied");
        let line = serde_json::to_value(r.line()).unwrap();
        assert_eq!(line["hostname"], "api.example.com");
        assert_eq!(line["action"], "would_deny");
        // No name bound: the field is there, null.
        let r = tier1_record(&ev, None, None, wall, mono);
        assert_eq!(
            serde_json::to_value(r.line()).unwrap()["hostname"],
            serde_json::Value::Null
        );
    }

    fn wait_for_lines(path: &Path, n: usize) -> String {
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= n {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        text
    }

    #[test]
    fn the_log_is_created_0600_and_reopened_at_its_path_after_rotation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        let sink = spawn_writer(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        sink.emit(record());
        assert_eq!(wait_for_lines(&path, 1).lines().count(), 1);
        // What logrotate does: move the file away, then signal (`snas agent` calls reopen on
        // SIGHUP).
        std::fs::rename(&path, &rotated).unwrap();
        reopen();
        for _ in 0..3 {
            sink.emit(record());
        }
        assert_eq!(wait_for_lines(&path, 3).lines().count(), 3);
        assert_eq!(mode(&path), 0o600);
        drop(sink);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
    }

    #[test]
    fn full_queue_drops_and_counts_instead_of_blocking() {
        let (sink, _rx) = AuditSink::channel();
        for _ in 0..QUEUE + 5 {
            sink.emit(record());
        }
        assert_eq!(sink.emitted(), QUEUE as u64);
        assert_eq!(sink.dropped(), 5);
    }
}
