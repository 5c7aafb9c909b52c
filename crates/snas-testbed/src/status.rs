//! What exists of a testbed right now: namespaces, daemons, keys, logs — and the printable
//! report of `snas testbed status` with its exit code (0 complete, 1 partial, 3 absent).

use std::fmt;
use std::path::PathBuf;

use crate::daemons::{self, Daemon};
use crate::dns::{lookup_v4, Zones};
use crate::record::Record;
use crate::setup;
use crate::topology::{zone_records, Topology, ZoneData, NODES, PROXIES};

/// State of one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonState {
    /// Alive in its namespace.
    Running(i32),
    /// A pid file names a process that is gone (or lives elsewhere).
    Dead(i32),
    /// Never started by `up` (not requested, or not available).
    NotStarted(String),
    /// Expected but no pid file.
    Missing,
}

/// A snapshot of a testbed.
#[derive(Debug, Clone)]
pub struct Status {
    /// The topology looked at.
    pub topology: Topology,
    /// Fixed namespaces and whether each exists (mounted).
    pub namespaces: Vec<(String, bool)>,
    /// Job namespaces created by agents.
    pub job_namespaces: Vec<String>,
    /// Each daemon and its state.
    pub daemons: Vec<(Daemon, DaemonState)>,
    /// What `up` recorded.
    pub record: Option<Record>,
    /// Whether the state directory exists.
    pub state_dir_exists: bool,
}

/// Verdict of a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Everything `up` builds exists and runs.
    Complete,
    /// Some of it.
    Partial,
    /// Nothing.
    Absent,
}

impl Completeness {
    /// Exit code of `snas testbed status`.
    pub fn exit_code(self) -> u8 {
        match self {
            Completeness::Complete => 0,
            Completeness::Partial => 1,
            Completeness::Absent => 3,
        }
    }
}

impl Status {
    /// Looks at the system.
    pub fn collect(t: &Topology) -> Status {
        let existing = setup::existing_netns(t);
        let namespaces = t
            .namespaces()
            .into_iter()
            .map(|n| {
                let ok = crate::netns::is_mounted_netns(&crate::netns::netns_path(&n));
                (n, ok)
            })
            .collect();
        let fixed = t.namespaces();
        let job_namespaces = existing
            .into_iter()
            .filter(|n| !fixed.contains(n))
            .collect();
        let record = Record::load(t);
        let daemons = Daemon::all()
            .into_iter()
            .map(|d| {
                let not_started = record.as_ref().and_then(|r| r.not_started_reason(d));
                let state = match (daemons::running_pid(t, d), daemons::recorded_pid(t, d)) {
                    (Some(pid), _) => DaemonState::Running(pid),
                    (None, Some(pid)) => DaemonState::Dead(pid),
                    (None, None) => match not_started {
                        Some(why) => DaemonState::NotStarted(why),
                        None => DaemonState::Missing,
                    },
                };
                (d, state)
            })
            .collect();
        Status {
            topology: t.clone(),
            namespaces,
            job_namespaces,
            daemons,
            record,
            state_dir_exists: t.state_dir().exists(),
        }
    }

    /// Complete, partial or absent.
    pub fn completeness(&self) -> Completeness {
        let any_ns = self.namespaces.iter().any(|(_, e)| *e) || !self.job_namespaces.is_empty();
        let any_daemon = self
            .daemons
            .iter()
            .any(|(_, s)| matches!(s, DaemonState::Running(_) | DaemonState::Dead(_)));
        if !any_ns && !any_daemon && !self.state_dir_exists {
            return Completeness::Absent;
        }
        let all_ns = self.namespaces.iter().all(|(_, e)| *e);
        let all_daemons = self
            .daemons
            .iter()
            .all(|(_, s)| matches!(s, DaemonState::Running(_) | DaemonState::NotStarted(_)));
        if all_ns && all_daemons && self.record.is_some() {
            Completeness::Complete
        } else {
            Completeness::Partial
        }
    }
}

fn path(p: PathBuf) -> String {
    p.display().to_string()
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.topology;
        let verdict = match self.completeness() {
            Completeness::Complete => "complete",
            Completeness::Partial => {
                "PARTIAL (run `snas testbed up` to complete or `down` to clean)"
            }
            Completeness::Absent => "absent",
        };
        writeln!(f, "testbed {}: {verdict}", t.prefix())?;
        writeln!(f, "\nnamespaces:")?;
        for (n, ok) in &self.namespaces {
            writeln!(f, "  {n:<20} {}", if *ok { "present" } else { "MISSING" })?;
        }
        for n in &self.job_namespaces {
            writeln!(f, "  {n:<20} job namespace")?;
        }
        writeln!(f, "\naddresses:")?;
        writeln!(
            f,
            "  underlay 192.0.2.0/24 (bridge br0 in {}):",
            t.underlay_ns()
        )?;
        for n in 1..=NODES {
            let (pool, len) = t.job_pool(n);
            writeln!(
                f,
                "    node-{n}  {:<14} ns {:<16} jobs {pool}/{len}, agent policy {}:7070",
                t.node_addr(n).to_string(),
                t.node_ns(n),
                t.node_addr(n)
            )?;
        }
        for n in 1..=PROXIES {
            let (i, p) = t.transit(n);
            let (pool, len) = t.egress_pool(n);
            writeln!(
                f,
                "    proxy-{n} {:<14} ns {:<16} transit {p}/30 ↔ inet {i}, egress pool {pool}/{len}, resolver {}, service {}, management {} (inside)",
                t.proxy_addr(n).to_string(),
                t.proxy_ns(n),
                t.proxy_resolver(n),
                t.proxy_service(n),
                t.proxy_control(n)
            )?;
        }
        writeln!(
            f,
            "  internet ({}): hosts 203.0.113.10 .20 .30 .40 and 2001:db8::10 (HTTP 80, echo tcp+udp 7, bulk 5201), DNS {}",
            t.inet_ns(),
            t.dns_server()
        )?;
        writeln!(f, "\nprocesses:")?;
        for (d, s) in &self.daemons {
            let state = match s {
                DaemonState::Running(pid) => format!("running  pid {pid}"),
                DaemonState::Dead(pid) => format!("DEAD     pid {pid}"),
                DaemonState::NotStarted(why) => format!("not started: {why}"),
                DaemonState::Missing => "MISSING".to_owned(),
            };
            writeln!(f, "  {:<8} {state}", d.name())?;
            writeln!(f, "           log {}", path(d.log_file(t)))?;
            if let Some(c) = d.config_file(t) {
                writeln!(f, "           config {}", path(c))?;
            }
        }
        for n in 1..=NODES {
            writeln!(f, "  agent-{n} API socket {}", path(t.agent_socket(n)))?;
        }
        writeln!(f, "\ntrust:")?;
        writeln!(
            f,
            "  trusted public keys (agents, proxies): {}",
            path(t.trust_dir())
        )?;
        writeln!(
            f,
            "  revocations (proxies): {}",
            path(t.proxy_revocations_dir())
        )?;
        writeln!(
            f,
            "  revocations (agents):  {}",
            path(t.agent_revocations_dir())
        )?;
        writeln!(
            f,
            "  revoke with: snas policy revoke --key KEY TOKEN > DIR/NAME.tmp && mv DIR/NAME.tmp DIR/NAME.jws (both directories: the job is cut off at proxies and agents)"
        )?;
        match self.record.as_ref().map(|r| &r.trust) {
            Some(crate::record::TrustSource::Generated { key }) => {
                writeln!(f, "  signing key (generated): {}", key.display())?;
                writeln!(
                    f,
                    "  sign with: snas policy sign --key {} POLICY.toml",
                    key.display()
                )?;
            }
            Some(crate::record::TrustSource::Dir { dir }) => {
                writeln!(f, "  keys copied from --trust {}", dir.display())?;
            }
            None => writeln!(f, "  (no record: testbed not built by `up`)")?,
        }
        let ca = crate::tls::ca_path(&crate::tls::dir(t));
        writeln!(
            f,
            "  HTTPS (443) CA certificate: {}{}",
            ca.display(),
            if ca.exists() { "" } else { " (missing)" }
        )?;
        writeln!(
            f,
            "  e.g. curl --cacert {} https://api.example.com/",
            ca.display()
        )?;
        writeln!(f, "\nDNS names (authoritative at {}):", t.dns_server())?;
        let zones = Zones::default();
        let mut seen: Vec<&str> = Vec::new();
        let records = zone_records();
        for r in &records {
            if seen.contains(&r.name.as_str()) {
                continue;
            }
            seen.push(&r.name);
            let same: Vec<_> = records.iter().filter(|x| x.name == r.name).collect();
            let data: Vec<String> = same
                .iter()
                .map(|x| match &x.data {
                    ZoneData::A(a) => a.to_string(),
                    ZoneData::Aaaa(a) => format!("AAAA {a}"),
                    ZoneData::Cname(c) => {
                        let target = lookup_v4(&zones, c);
                        format!(
                            "CNAME {c} → {}",
                            target
                                .iter()
                                .map(|a| a.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                })
                .collect();
            let shown = if data.len() > 3 {
                format!(
                    "{} A records ({} … {}; truncated over UDP)",
                    data.len(),
                    data[0],
                    data[data.len() - 1]
                )
            } else {
                data.join(", ")
            };
            writeln!(f, "  {:<24} {shown}  (ttl {})", r.name, r.ttl)?;
        }
        Ok(())
    }
}
