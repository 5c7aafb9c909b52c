//! Trust bundles: the public keys a verifier accepts, by key id.
//!
//! # Invariants
//! - Never empty; key ids unique and valid (see [`crate::keys`]).
//! - Several keys may be valid at once; that is how keys are rotated (add the new public key to
//!   every verifier, switch the signer, remove the old key after the longest policy TTL).
//!
//! Reading keys from the file system lives in [`crate::bundle_fs`]; this module takes bytes.

use crate::keys::{check_kid, public_key_from_pem, KeyError};
use std::collections::BTreeMap;

/// Why a trust bundle could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// No keys.
    #[error("trust bundle has no keys")]
    Empty,
    /// Same kid twice.
    #[error("key id `{0}` appears twice in the trust bundle")]
    DuplicateKid(String),
    /// One key is bad.
    #[error("key `{kid}`: {source}")]
    Key {
        /// The key id.
        kid: String,
        /// What is wrong.
        source: KeyError,
    },
}

/// Public keys by key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    keys: BTreeMap<String, [u8; 32]>,
}

impl TrustBundle {
    /// Builds a bundle from `(kid, SPKI PEM bytes)` pairs.
    pub fn from_keys<I, K, B>(keys: I) -> Result<TrustBundle, BundleError>
    where
        I: IntoIterator<Item = (K, B)>,
        K: Into<String>,
        B: AsRef<[u8]>,
    {
        let mut map = BTreeMap::new();
        for (kid, pem) in keys {
            let kid = kid.into();
            check_kid(&kid).map_err(|source| BundleError::Key {
                kid: kid.clone(),
                source,
            })?;
            let key = public_key_from_pem(pem.as_ref()).map_err(|source| BundleError::Key {
                kid: kid.clone(),
                source,
            })?;
            if map.insert(kid.clone(), key).is_some() {
                return Err(BundleError::DuplicateKid(kid));
            }
        }
        if map.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(TrustBundle { keys: map })
    }

    /// The raw public key for `kid`.
    pub fn get(&self, kid: &str) -> Option<&[u8; 32]> {
        self.keys.get(kid)
    }

    /// Key ids, sorted.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false (bundles are never empty); here for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// What changed from `self` to `next` (a reload).
    pub fn diff(&self, next: &TrustBundle) -> BundleDiff {
        let mut d = BundleDiff::default();
        for (kid, key) in &next.keys {
            match self.keys.get(kid) {
                None => d.added.push(kid.clone()),
                Some(old) if old != key => d.replaced.push(kid.clone()),
                Some(_) => {}
            }
        }
        d.removed = self
            .keys
            .keys()
            .filter(|k| !next.keys.contains_key(*k))
            .cloned()
            .collect();
        d
    }
}

/// The change between two generations of a trust bundle, by key id (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleDiff {
    /// Key ids only the new bundle has.
    pub added: Vec<String>,
    /// Key ids only the old bundle had: tokens signed with them are no longer trusted.
    pub removed: Vec<String>,
    /// Key ids whose public key changed: tokens signed with the old key no longer verify, so
    /// verifiers treat them like removed keys.
    pub replaced: Vec<String>,
}

impl BundleDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }

    /// Whether tokens signed with `kid` under the old bundle are no longer trusted.
    pub fn untrusts(&self, kid: &str) -> bool {
        self.removed.iter().chain(&self.replaced).any(|k| k == kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PolicyKey;

    fn pem(seed: u8) -> String {
        PolicyKey::from_seed("x", [seed; 32])
            .and_then(|k| k.public_pem())
            .expect("pem")
    }

    #[test]
    fn bundle_holds_several_keys_for_rotation() {
        let b = TrustBundle::from_keys([("old", pem(1)), ("new", pem(2))]).expect("bundle");
        assert_eq!(b.kids().collect::<Vec<_>>(), ["new", "old"]);
        assert!(b.get("old").is_some() && b.get("gone").is_none());
    }

    #[test]
    fn diff_names_added_removed_and_replaced_keys() {
        let old =
            TrustBundle::from_keys([("a", pem(1)), ("b", pem(2)), ("c", pem(3))]).expect("old");
        let new =
            TrustBundle::from_keys([("a", pem(1)), ("c", pem(9)), ("d", pem(4))]).expect("new");
        let d = old.diff(&new);
        assert_eq!(d.added, ["d"]);
        assert_eq!(d.removed, ["b"]);
        assert_eq!(d.replaced, ["c"]);
        assert!(d.untrusts("b") && d.untrusts("c") && !d.untrusts("a") && !d.untrusts("d"));
        assert!(old.diff(&old).is_empty());
    }

    #[test]
    fn empty_duplicate_and_bad_keys_are_rejected() {
        assert_eq!(
            TrustBundle::from_keys(Vec::<(String, String)>::new()),
            Err(BundleError::Empty)
        );
        assert_eq!(
            TrustBundle::from_keys([("a", pem(1)), ("a", pem(2))]),
            Err(BundleError::DuplicateKid("a".into()))
        );
        assert!(matches!(
            TrustBundle::from_keys([("a", "nope")]),
            Err(BundleError::Key { .. })
        ));
        assert!(matches!(
            TrustBundle::from_keys([("a/b", pem(1))]),
            Err(BundleError::Key { .. })
        ));
    }
}
