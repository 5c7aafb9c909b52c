//! Names of a job's kernel objects.
//!
//! Owns the mapping from a job key to the names of its network namespace and host-side veth.
//!
//! # Invariants
//! - Names are a pure function of (agent namespace prefix, job key): a restarted agent finds a
//!   job's objects again from its record alone, and two agents with different prefixes on one
//!   host (tests) never collide.
//! - The host veth name is `host_veth_prefix` + 8 lowercase hex digits and fits IFNAMSIZ (15).
//! - The sandbox side is created directly as `eth0` inside the namespace (no rename step).
//!
//! # Limits
//! The short id has 32 bits; two jobs of one agent whose short ids collide are refused at
//! creation (the kernel reports the name as taken), never merged.

use sha2::{Digest, Sha256};
use snas_wire::JobKey;

/// Hex digits in a job's short id.
pub const SHORT_ID_HEX: usize = 8;
/// Longest host veth prefix that keeps `prefix + short id` within 15 bytes.
pub const MAX_HOST_VETH_PREFIX: usize = 15 - SHORT_ID_HEX;
/// Name of the sandbox-side interface inside the job's namespace.
pub const SANDBOX_IFNAME: &str = "eth0";

/// The names of one job's kernel objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNames {
    /// 8 hex digits identifying the job on this agent.
    pub short_id: String,
    /// Network namespace name (file under the netns directory).
    pub netns: String,
    /// Host-side veth name.
    pub host_veth: String,
}

impl JobNames {
    /// Derives the names for `job_key` under the agent's prefixes.
    pub fn derive(netns_prefix: &str, host_veth_prefix: &str, job_key: JobKey) -> JobNames {
        let mut h = Sha256::new();
        h.update(b"snas-agent-short-id-v1\0");
        h.update(netns_prefix.as_bytes());
        h.update(b"\0");
        h.update(job_key.get().to_be_bytes());
        let digest = h.finalize();
        let short_id: String = digest[..SHORT_ID_HEX / 2]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        JobNames {
            netns: format!("{netns_prefix}{short_id}"),
            host_veth: format!("{host_veth_prefix}{short_id}"),
            short_id,
        }
    }
}

/// Formats a job key the way the API and the policy endpoint spell it: 16 lowercase hex digits
/// ([`JobKey`]'s `Display`).
pub fn job_key_hex(job_key: impl Into<JobKey>) -> String {
    job_key.into().to_string()
}

/// Parses 16 hex digits as a job key. Either case: the API has always taken a key typed in
/// upper case; what the agent writes is [`JobKey`]'s lower-case form.
pub fn parse_job_key_hex(s: &str) -> Option<JobKey> {
    s.to_ascii_lowercase().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_fit_ifnamsiz() {
        let a = JobNames::derive("snas-", "sh", JobKey(0x0123_4567_89ab_cdef));
        let b = JobNames::derive("snas-", "sh", JobKey(0x0123_4567_89ab_cdef));
        assert_eq!(a, b);
        assert_eq!(a.short_id.len(), SHORT_ID_HEX);
        assert!(a.netns.starts_with("snas-") && a.netns.ends_with(&a.short_id));
        assert!(a.host_veth.starts_with("sh") && a.host_veth.len() <= 15);
        let long = JobNames::derive("snas-", "abcdefg", JobKey(1));
        assert_eq!(long.host_veth.len(), 15);
    }

    #[test]
    fn different_agent_prefixes_give_different_names_for_one_job() {
        let a = JobNames::derive("snas-", "sh", JobKey(42));
        let b = JobNames::derive("snt1234-", "sh", JobKey(42));
        assert_ne!(a.host_veth, b.host_veth);
    }

    #[test]
    fn different_jobs_give_different_names() {
        let a = JobNames::derive("snas-", "sh", JobKey(1));
        let b = JobNames::derive("snas-", "sh", JobKey(2));
        assert_ne!(a.short_id, b.short_id);
    }

    #[test]
    fn job_key_hex_round_trips() {
        for k in [0u64, 1, 0xdead_beef_0000_0001, u64::MAX] {
            assert_eq!(parse_job_key_hex(&job_key_hex(k)), Some(JobKey(k)));
        }
        assert_eq!(
            parse_job_key_hex("DEADBEEF00000001"),
            Some(JobKey(0xdead_beef_0000_0001))
        );
        assert_eq!(parse_job_key_hex("123"), None);
        assert_eq!(parse_job_key_hex("+123456789abcdef"), None);
        assert_eq!(parse_job_key_hex("zzzzzzzzzzzzzzzz"), None);
    }
}
