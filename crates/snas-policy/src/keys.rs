//! Ed25519 signing keys and their file format.
//!
//! # Format
//! - Private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), file `ID.key`, mode 0600.
//! - Public key: SPKI PEM (`-----BEGIN PUBLIC KEY-----`), file `ID.pub`.
//! - The key id (`kid` in the JWS header) is the file stem `ID`: `[A-Za-z0-9._-]{1,64}`, not
//!   starting with `.`.
//!
//! Key generation takes the 32-byte seed from the caller (the CLI reads it from the OS RNG), so
//! this module does no I/O. Private key material is never printed by `Debug`.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use std::fmt;

/// Why a key or key id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Bad key id.
    #[error("key id `{0}` must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'")]
    Kid(String),
    /// Not a PKCS#8 PEM Ed25519 private key.
    #[error("not an Ed25519 private key in PKCS#8 PEM form (-----BEGIN PRIVATE KEY-----): {0}")]
    Private(String),
    /// Not an SPKI PEM Ed25519 public key.
    #[error("not an Ed25519 public key in SPKI PEM form (-----BEGIN PUBLIC KEY-----): {0}")]
    Public(String),
    /// Encoding failed (should not happen for valid keys).
    #[error("encoding the key failed: {0}")]
    Encode(String),
}

/// Checks a key id (see module docs).
pub fn check_kid(kid: &str) -> Result<(), KeyError> {
    let ok = !kid.is_empty()
        && kid.len() <= 64
        && !kid.starts_with('.')
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Kid(kid.to_owned()))
    }
}

/// A signing key with its id.
#[derive(Clone)]
pub struct PolicyKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl PolicyKey {
    /// A key from a 32-byte secret seed (use a CSPRNG).
    pub fn from_seed(kid: &str, seed: [u8; 32]) -> Result<PolicyKey, KeyError> {
        check_kid(kid)?;
        Ok(PolicyKey {
            kid: kid.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// A key from a PKCS#8 PEM file's contents.
    pub fn from_pem(kid: &str, pem: &[u8]) -> Result<PolicyKey, KeyError> {
        check_kid(kid)?;
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Private("not UTF-8".into()))?;
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(text.trim())
            .map_err(|e| KeyError::Private(e.to_string()))?;
        Ok(PolicyKey {
            kid: kid.to_owned(),
            key,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// PKCS#8 PEM of the private key.
    pub fn private_pem(&self) -> Result<String, KeyError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// SPKI PEM of the public key.
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// The raw 32-byte public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub(crate) fn pkcs8_der(&self) -> Result<Vec<u8>, KeyError> {
        self.key
            .to_pkcs8_der()
            .map(|d| d.as_bytes().to_vec())
            .map_err(|e| KeyError::Encode(e.to_string()))
    }
}

/// Parses an SPKI PEM Ed25519 public key into its 32 raw bytes.
pub fn public_key_from_pem(pem: &[u8]) -> Result<[u8; 32], KeyError> {
    let text = std::str::from_utf8(pem).map_err(|_| KeyError::Public("not UTF-8".into()))?;
    let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(text.trim())
        .map_err(|e| KeyError::Public(e.to_string()))?;
    Ok(vk.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let k = PolicyKey::from_seed("k1", [7; 32]).expect("key");
        let private = k.private_pem().expect("pem");
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = PolicyKey::from_pem("k1", private.as_bytes()).expect("parse");
        assert_eq!(back.public_bytes(), k.public_bytes());
        let public = k.public_pem().expect("pem");
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(
            public_key_from_pem(public.as_bytes()).expect("pub"),
            k.public_bytes()
        );
        assert!(!format!("{k:?}").contains("key:"));
    }

    #[test]
    fn wrong_pem_kinds_are_rejected() {
        let k = PolicyKey::from_seed("k1", [7; 32]).expect("key");
        let public = k.public_pem().expect("pem");
        assert!(matches!(
            PolicyKey::from_pem("k1", public.as_bytes()),
            Err(KeyError::Private(_))
        ));
        assert!(matches!(
            public_key_from_pem(k.private_pem().expect("pem").as_bytes()),
            Err(KeyError::Public(_))
        ));
        assert!(matches!(
            public_key_from_pem(b"garbage"),
            Err(KeyError::Public(_))
        ));
    }

    #[test]
    fn kid_grammar() {
        assert!(check_kid("snas-20261123-ab12").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_kid(bad).is_err(), "{bad}");
        }
    }
}
