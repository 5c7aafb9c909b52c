//! The agent's job records on disk.
//!
//! Owns `<state_dir>/jobs/<job_key hex>.json`: one record per running job, holding everything a
//! restarted agent needs to adopt the job (names, addresses, identity, the signed token that
//! proxies fetch). The kernel objects themselves (namespace, veth, pinned maps) are the other
//! half of the state; [`crate::Agent::start`] reconciles the two.
//!
//! # Invariants
//! - A record is written (atomically: temp file + rename, mode 0600) only after the job's network
//!   exists, and removed only after it is gone, so a record never names less than exists — except
//!   after a crash mid-teardown, which start-up detects and finishes.

use snas_wire::JobKey;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::jobnet::JobNetInfo;
use crate::naming::{job_key_hex, parse_job_key_hex};
use crate::seams::VerifiedPolicy;

/// Record format version.
pub const RECORD_VERSION: u32 = 1;

/// Errors from the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or listing failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("{path}: corrupt job record: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// One running job as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The verified identity of the job.
    pub policy: VerifiedPolicy,
    /// The signed policy token as received.
    pub token: String,
    /// The job's network.
    pub net: JobNetInfo,
    /// When the job was created, seconds since the Unix epoch.
    pub created_at_unix: u64,
}

/// The job record directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating, mode 0700) `<state_dir>/jobs`.
    pub fn open(state_dir: &Path) -> Result<StateStore, StateError> {
        let dir = state_dir.join("jobs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(StateStore { dir })
    }

    fn path(&self, job_key: JobKey) -> PathBuf {
        self.dir.join(format!("{}.json", job_key_hex(job_key)))
    }

    /// Writes a record atomically.
    pub fn save(&self, record: &JobRecord) -> Result<(), StateError> {
        let path = self.path(record.policy.job_key);
        let tmp = path.with_extension("json.tmp");
        let io_err = |source| StateError::Io {
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        f.write_all(&json).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })
    }

    /// Removes a record; a missing one is fine.
    pub fn remove(&self, job_key: JobKey) -> Result<(), StateError> {
        let path = self.path(job_key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Every record, plus the errors of files that could not be read (left in place).
    pub fn load_all(&self) -> Result<(Vec<JobRecord>, Vec<StateError>), StateError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        let mut bad = Vec::new();
        for entry in rd.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(key) = parse_job_key_hex(stem) else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|source| StateError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|bytes| {
                    serde_json::from_slice::<JobRecord>(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })
                });
            match parsed {
                Ok(r) if r.policy.job_key == key && r.version == RECORD_VERSION => records.push(r),
                Ok(r) => bad.push(StateError::Corrupt {
                    path,
                    detail: format!(
                        "record names job {} version {}",
                        r.policy.job_key, r.version
                    ),
                }),
                Err(e) => bad.push(e),
            }
        }
        records.sort_by_key(|r| r.policy.job_key);
        Ok((records, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn record(key: u64) -> JobRecord {
        let key = JobKey(key);
        JobRecord {
            version: RECORD_VERSION,
            policy: VerifiedPolicy {
                jti: "p-1".into(),
                tenant: "acme".into(),
                job: "build-7".into(),
                serial: snas_wire::PolicySerial(3),
                node: None,
                expires_at_unix: 2_000_000_000,
                job_key: key,
                tenant_id: snas_wire::TenantId(0x0102_0304),
                claims: None,
            },
            token: "a.b.c".into(),
            net: JobNetInfo {
                netns: "snas-00000000".into(),
                netns_path: "/run/netns/snas-00000000".into(),
                host_veth: "sh00000000".into(),
                sandbox_ifname: "eth0".into(),
                slot: 4,
                gateway: Ipv4Addr::new(10, 255, 0, 17),
                sandbox: Ipv4Addr::new(10, 255, 0, 18),
                prefix_len: 30,
                mtu: 1444,
                gso_max_size: 65536,
                host_ifindex: 7,
                host_mac: [2, 0, 0, 0, 0, 1],
                sandbox_mac: [2, 0, 0, 0, 0, 2],
                sandbox6: None,
            },
            created_at_unix: 1_900_000_000,
        }
    }

    #[test]
    fn records_round_trip_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.save(&record(1)).unwrap();
        store.save(&record(0xffff_0000_0000_0002)).unwrap();
        let (all, bad) = store.load_all().unwrap();
        assert!(bad.is_empty());
        assert_eq!(all, vec![record(1), record(0xffff_0000_0000_0002)]);
        store.remove(JobKey(1)).unwrap();
        store.remove(JobKey(1)).unwrap();
        assert_eq!(store.load_all().unwrap().0.len(), 1);
    }

    #[test]
    fn corrupt_record_is_reported_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("jobs/0000000000000009.json"), b"{not json").unwrap();
        let mut r = record(5);
        r.policy.job_key = JobKey(6); // file name and content disagree
        std::fs::write(
            dir.path().join("jobs/0000000000000005.json"),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
        let (all, bad) = store.load_all().unwrap();
        assert!(all.is_empty());
        assert_eq!(bad.len(), 2);
    }
}
