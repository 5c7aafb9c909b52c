//! A directory of revocation files, read by the agent and the proxy alike (`revocations_dir`):
//! which files are new or changed since the last scan, and reading one file with a size bound.
//!
//! # Invariants
//! - A file is reported again only when its modification time or length changed; a file that
//!   disappears is forgotten, so the same content written again is reported again.
//! - Names starting with `.` (editors' and `rename`-into-place temporaries) are ignored.
//! - No file is read beyond [`crate::revocation::MAX_REVOCATION_TOKEN`] bytes.
//!
//! # Interval
//! Agents and proxies scan their `revocations_dir` (and reload their trust bundle) every
//! [`SCAN_INTERVAL`], 500 ms: a revocation must cut its job off within 1 s of being written,
//! and a scan that may start up to one interval late, then reads, verifies and applies a few
//! files, leaves half a second of margin. A poll, not inotify: these directories are often
//! projected volumes (a `..data` symlink swap), network file systems or rewritten by
//! configuration management, where file events are unreliable; listing a directory of a few
//! small files twice a second costs nothing measurable.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Time between two scans of a revocations directory (and two trust bundle reloads) by the
/// agent and the proxy. See the module documentation.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// New or changed files of a directory since the previous call (by modification time and
/// length); names starting with `.` are ignored.
#[derive(Debug, Default)]
pub struct DirScan {
    seen: HashMap<PathBuf, (Option<SystemTime>, u64)>,
}

impl DirScan {
    /// Files of `dir` that are new or changed since the previous call, sorted.
    pub fn changed(&mut self, dir: &Path) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut present = BTreeSet::new();
        let mut out = Vec::new();
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = e.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let stamp = (meta.modified().ok(), meta.len());
            present.insert(path.clone());
            if self.seen.get(&path) != Some(&stamp) {
                self.seen.insert(path.clone(), stamp);
                out.push(path);
            }
        }
        self.seen.retain(|p, _| present.contains(p));
        out.sort();
        out
    }
}

/// Reads one revocation file (at most [`crate::revocation::MAX_REVOCATION_TOKEN`] bytes).
pub fn read_revocation(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let max = crate::revocation::MAX_REVOCATION_TOKEN;
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "not UTF-8".to_owned())
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_scan_reports_new_and_changed_files_once() {
        let d = tempfile::tempdir().expect("tmp");
        let mut s = DirScan::default();
        assert!(s.changed(d.path()).is_empty());
        std::fs::write(d.path().join("a.jws"), "one").expect("write");
        std::fs::write(d.path().join(".hidden"), "x").expect("write");
        assert_eq!(s.changed(d.path()), [d.path().join("a.jws")]);
        assert!(s.changed(d.path()).is_empty());
        std::fs::write(d.path().join("a.jws"), "longer").expect("write");
        assert_eq!(s.changed(d.path()), [d.path().join("a.jws")]);
        std::fs::remove_file(d.path().join("a.jws")).expect("rm");
        assert!(s.changed(d.path()).is_empty());
        std::fs::write(d.path().join("a.jws"), "longer").expect("write");
        assert_eq!(s.changed(d.path()), [d.path().join("a.jws")]);
    }
}
