//! Loading a [`TrustBundle`] from the file system: the crate's one I/O exception, kept here so
//! that the agent, the proxy and the CLI read trust bundles the same way.
//!
//! # Rules
//! - A file: one SPKI PEM public key; its key id is the file stem (`keys/prod-2026.pub` → `prod-2026`).
//! - A directory: every `*.pub` file directly inside it (not recursive, sorted by name); other files
//!   (including `*.key` private keys) are ignored. No `*.pub` file is an error.
//! - Each key file is at most 64 KiB.
//! - Reloading ([`reload_trust_bundle`], for verifiers that watch their trust directory): a
//!   file that cannot be read or holds no valid key is reported (path, reason) and left out;
//!   the good keys are kept. A reload that finds no good key at all fails and the caller keeps
//!   its previous bundle (an emptied or half-copied directory never leaves a verifier without
//!   keys).

use crate::bundle::{BundleError, TrustBundle};
use std::io::Read;
use std::path::{Path, PathBuf};

const MAX_KEY_FILE: u64 = 64 * 1024;

/// Why a trust bundle could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BundleFsError {
    /// I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A key file above 64 KiB.
    #[error("{0}: key file larger than 64 KiB")]
    TooLarge(PathBuf),
    /// A file name that gives no key id.
    #[error("{0}: cannot derive a key id from the file name")]
    NoKid(PathBuf),
    /// A directory without `*.pub` files.
    #[error("{0}: no *.pub files in directory")]
    NoKeys(PathBuf),
    /// The keys themselves.
    #[error("{path}: {source}")]
    Bundle {
        /// The path given.
        path: PathBuf,
        /// The error.
        source: BundleError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleFsError + '_ {
    move |source| BundleFsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_key(path: &Path) -> Result<(String, Vec<u8>), BundleFsError> {
    let kid = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| BundleFsError::NoKid(path.to_owned()))?
        .to_owned();
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut buf = Vec::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io(path))?;
    if buf.len() as u64 > MAX_KEY_FILE {
        return Err(BundleFsError::TooLarge(path.to_owned()));
    }
    Ok((kid, buf))
}

/// Loads a trust bundle from a key file or a directory of key files.
pub fn load_trust_bundle(path: &Path) -> Result<TrustBundle, BundleFsError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mut keys = Vec::new();
    if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io(path))? {
            let p = entry.map_err(io(path))?.path();
            if p.extension().is_some_and(|e| e == "pub") && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(BundleFsError::NoKeys(path.to_owned()));
        }
        for f in &files {
            keys.push(read_key(f)?);
        }
    } else {
        keys.push(read_key(path)?);
    }
    TrustBundle::from_keys(keys).map_err(|source| BundleFsError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// A reload of a trust directory: the keys that loaded and the files that did not.
#[derive(Debug)]
pub struct Reload {
    /// The good keys (`None` when there were none).
    pub bundle: Option<TrustBundle>,
    /// Each bad file and why.
    pub problems: Vec<(PathBuf, String)>,
}

/// Loads a trust bundle like [`load_trust_bundle`], but leaves bad key files out (reported in
/// [`Reload::problems`]) instead of failing on the first. For a single file, a bad file is the
/// only problem and there is no bundle.
pub fn reload_trust_bundle(path: &Path) -> Reload {
    let mut problems = Vec::new();
    let files = match std::fs::metadata(path) {
        Err(e) => {
            problems.push((path.to_owned(), e.to_string()));
            Vec::new()
        }
        Ok(m) if m.is_dir() => match std::fs::read_dir(path) {
            Err(e) => {
                problems.push((path.to_owned(), e.to_string()));
                Vec::new()
            }
            Ok(rd) => {
                let mut files: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "pub") && p.is_file())
                    .collect();
                files.sort();
                if files.is_empty() {
                    problems.push((path.to_owned(), "no *.pub files in directory".into()));
                }
                files
            }
        },
        Ok(_) => vec![path.to_owned()],
    };
    let mut good: Vec<(String, Vec<u8>)> = Vec::new();
    for f in files {
        let one = read_key(&f).and_then(|(kid, pem)| {
            TrustBundle::from_keys([(kid.clone(), &pem)])
                .map(|_| (kid, pem))
                .map_err(|source| BundleFsError::Bundle {
                    path: f.clone(),
                    source,
                })
        });
        match one {
            Ok(k) => good.push(k),
            Err(e) => problems.push((f, error_reason(&e))),
        }
    }
    let bundle = if good.is_empty() {
        None
    } else {
        // Each key is valid and kids are file stems in one directory, so they are unique.
        TrustBundle::from_keys(good).ok()
    };
    Reload { bundle, problems }
}

/// The reason of an error without its path (the caller names the file).
fn error_reason(e: &BundleFsError) -> String {
    match e {
        BundleFsError::Io { source, .. } => source.to_string(),
        BundleFsError::TooLarge(_) => "key file larger than 64 KiB".into(),
        BundleFsError::NoKid(_) => "cannot derive a key id from the file name".into(),
        BundleFsError::NoKeys(_) => "no *.pub files in directory".into(),
        BundleFsError::Bundle { source, .. } => source.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PolicyKey;

    fn write_pub(dir: &Path, kid: &str, seed: u8) {
        let pem = PolicyKey::from_seed(kid, [seed; 32])
            .and_then(|k| k.public_pem())
            .expect("pem");
        std::fs::write(dir.join(format!("{kid}.pub")), pem).expect("write");
    }

    #[test]
    fn a_bad_file_is_reported_and_the_good_keys_stay() {
        let d = tempfile::tempdir().expect("tmp");
        write_pub(d.path(), "good-1", 1);
        write_pub(d.path(), "good-2", 2);
        std::fs::write(d.path().join("broken.pub"), "not a key").expect("write");
        std::fs::write(d.path().join("signer.key"), "ignored").expect("write");
        let r = reload_trust_bundle(d.path());
        let b = r.bundle.expect("good keys");
        assert_eq!(b.kids().collect::<Vec<_>>(), ["good-1", "good-2"]);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].0, d.path().join("broken.pub"));
        assert!(load_trust_bundle(d.path()).is_err());
    }

    #[test]
    fn an_emptied_directory_gives_no_bundle_and_says_so() {
        let d = tempfile::tempdir().expect("tmp");
        let r = reload_trust_bundle(d.path());
        assert!(r.bundle.is_none());
        assert!(r.problems[0].1.contains("no *.pub"), "{:?}", r.problems);
        let r = reload_trust_bundle(&d.path().join("gone"));
        assert!(r.bundle.is_none() && r.problems.len() == 1);
    }
}
