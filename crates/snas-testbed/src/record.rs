//! `testbed.json` in the state directory: what `up` decided (trust source, which daemons it
//! was asked to start and why some were not), so `status` can tell "not started on purpose"
//! from "died".

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::daemons::Daemon;
use crate::topology::Topology;

/// Where the trusted keys came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrustSource {
    /// The testbed generated a key pair; this is the private key.
    Generated {
        /// Private key file (PKCS#8 PEM, 0600).
        key: PathBuf,
    },
    /// Public keys copied from `--trust DIR`.
    Dir {
        /// The directory given.
        dir: PathBuf,
    },
}

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Trust source.
    pub trust: TrustSource,
    /// Agents requested.
    pub agents: bool,
    /// Proxies requested.
    pub proxies: bool,
    /// `snas proxy --help` succeeded at `up`.
    pub proxy_available: bool,
}

impl Record {
    /// The record file.
    pub fn path(t: &Topology) -> PathBuf {
        t.state_dir().join("testbed.json")
    }

    /// Reads the record, if any.
    pub fn load(t: &Topology) -> Option<Record> {
        let text = std::fs::read(Record::path(t)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes the record.
    pub fn save(&self, t: &Topology) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(Record::path(t), text)
    }

    /// Why `up` did not start `d`, if it did not on purpose.
    pub fn not_started_reason(&self, d: Daemon) -> Option<String> {
        match d {
            Daemon::Internet => None,
            Daemon::Agent(_) if !self.agents => Some("agents not requested".into()),
            Daemon::Proxy(_) if !self.proxies => Some("proxies not requested".into()),
            Daemon::Proxy(_) if !self.proxy_available => Some(
                "`snas proxy --help` failed: this snas binary has no proxy yet (config written)"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Whether `up` starts `d`.
    pub fn starts(&self, d: Daemon) -> bool {
        self.not_started_reason(d).is_none()
    }
}
