//! Loading a [`TrustBundle`] from the file system: the crate's one I/O exception, kept here so
//! that the agent, the proxy and the CLI read trust bundles the same way.
//!
//! # Rules
//! - A file: one SPKI PEM public key; its key id is the file stem (`keys/prod-2026.pub` → `prod-2026`).
//! - A directory: every `*.pub` file directly inside it (not recursive, sorted by name); other files
//!   (including `*.key` private keys) are ignored. No `*.pub` file is an error.
//! - Each key file is at most 64 KiB.

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
