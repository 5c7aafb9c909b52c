//! Identity derivations shared by every SNAS component (the overlay option carries their output).
//!
//! # Invariants
//! - `tenant_id(t)` = first 4 bytes (big-endian) of SHA-256(`"snas-tenant-id-v1\0"` ‖ t).
//! - `job_key(jti)` = first 8 bytes (big-endian) of SHA-256(`"snas-job-key-v1\0"` ‖ jti).
//! - These are wire contracts: changing them breaks every running node and proxy. The domain
//!   separation prefixes (with their NUL) keep the two derivations apart.

use sha2::{Digest, Sha256};
use snas_wire::{JobKey, TenantId};

const TENANT_DOMAIN: &[u8] = b"snas-tenant-id-v1\0";
const JOB_DOMAIN: &[u8] = b"snas-job-key-v1\0";

fn digest(domain: &[u8], value: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(value.as_bytes());
    h.finalize().into()
}

/// The 32-bit tenant id carried in the GENEVE option.
pub fn tenant_id(tenant: &str) -> TenantId {
    let d = digest(TENANT_DOMAIN, tenant);
    TenantId(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
}

/// The 64-bit job key carried in the GENEVE option, derived from the policy id (`jti`).
pub fn job_key(jti: &str) -> JobKey {
    let d = digest(JOB_DOMAIN, jti);
    JobKey(u64::from_be_bytes([
        d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_is_prefix_of_domain_separated_sha256() {
        // Known answer from `printf 'snas-tenant-id-v1\0acme' | sha256sum` (11208e19...).
        assert_eq!(tenant_id("acme"), TenantId(0x1120_8e19));
        assert_ne!(tenant_id("acme"), tenant_id("acme2"));
    }

    #[test]
    fn job_key_and_tenant_id_use_different_domains() {
        // Known answer from `printf 'snas-job-key-v1\0abc' | sha256sum` (767edb80 4b43cab8...).
        assert_eq!(job_key("abc"), JobKey(0x767e_db80_4b43_cab8));
        let t = Sha256::digest(b"snas-tenant-id-v1\0abc");
        assert_ne!(job_key("abc").get().to_be_bytes()[..4], t[..4]);
    }
}
