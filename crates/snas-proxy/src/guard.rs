//! The guard in the proxy's network namespace: defence in depth behind tier 2's infrastructure
//! check (issue 11). Even if the matcher had a bug, a job's packet written into the TUN device
//! must never be delivered to the proxy's own namespace nor forwarded to infrastructure (the
//! underlay, the nodes, the peers, the control planes).
//!
//! # What it owns
//! One nftables table, `inet snas_proxy_<tun_name>`, installed at start-up with the `nft`
//! binary (as the TUN set-up uses `ip`) and deleted when the [`Guard`] is dropped:
//! - chain `prerouting` (hook prerouting, priority raw: before routing, so also before the
//!   kernel's own martian drop of loopback destinations, and before conntrack): every packet
//!   that arrived on the TUN device for a local address of the namespace (`fib daddr type
//!   local`, loopback included) is counted (`local_drops`) and dropped;
//! - chain `input` (hook input): whatever else from the TUN device is about to be delivered
//!   locally (broadcast, multicast) is counted (`local_drops`) and dropped;
//! - chain `forward` (hook forward): every packet that arrived on the TUN device and is headed for
//!   the infrastructure set (sets `infra4`, `infra6`) is counted (`infra_drops`) and dropped.
//!
//! The table is replaced atomically at install (`table; delete table; table { … }` in one `nft -f`
//! transaction), so a table left behind by a proxy that crashed never blocks a restart. The guard
//! keeps a handle on the network namespace it was installed in and runs every later `nft`
//! (counters, removal) there, whichever thread asks.
//!
//! # Invariants
//! - A drop in any base chain is final in nftables, so other tables (firewalls, kube-proxy)
//!   cannot undo it; the guard accepts everything else and so changes nothing for them.
//! - Nothing but the proxy's own table is touched.
//!
//! # Limits
//! Needs the `nft` binary and CAP_NET_ADMIN in the namespace (Debian package `nftables`); the
//! TUN name must be a valid nftables identifier tail (`[A-Za-z0-9_.-]`, checked by the config).

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::infra::InfraSet;

/// Counter names in the table.
pub const LOCAL_COUNTER: &str = "local_drops";
/// Counter names in the table.
pub const INFRA_COUNTER: &str = "infra_drops";

/// The guard could not be installed or read.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// `nft` could not be run
    #[error(
        "nftables guard (table inet {table}): cannot run `nft` ({source}); the proxy needs the \
         nft binary (Debian package nftables) and CAP_NET_ADMIN"
    )]
    Spawn {
        /// The table.
        table: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `nft` refused the ruleset or the command
    #[error("nftables guard (table inet {table}): `nft {command}` failed: {stderr}")]
    Nft {
        /// The table.
        table: String,
        /// The subcommand.
        command: String,
        /// What nft said.
        stderr: String,
    },
    /// `nft -j` printed something that is not the expected JSON
    #[error("nftables guard (table inet {table}): unexpected `nft -j` output: {detail}")]
    Output {
        /// The table.
        table: String,
        /// What was wrong.
        detail: String,
    },
}

/// Packets the guard dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardCounters {
    /// From the TUN device to a local address of the namespace.
    pub local: u64,
    /// From the TUN device toward infrastructure.
    pub infrastructure: u64,
}

/// The table name for TUN device `tun`.
pub fn table_name(tun: &str) -> String {
    format!("snas_proxy_{tun}")
}

/// The whole `nft -f` input that (re)installs the guard of TUN device `tun`.
pub fn ruleset(tun: &str, infra: &InfraSet) -> String {
    let t = table_name(tun);
    let list = |v: Vec<String>| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", v.join(", "))
        }
    };
    let v4 = list(infra.v4_nets().map(|n| n.to_string()).collect());
    let v6 = list(infra.v6_nets().map(|n| n.to_string()).collect());
    format!(
        "table inet {t}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
         \tset infra4 {{ type ipv4_addr; flags interval; auto-merge;{v4} }}\n\
         \tset infra6 {{ type ipv6_addr; flags interval; auto-merge;{v6} }}\n\
         \tcounter {LOCAL_COUNTER} {{ }}\n\
         \tcounter {INFRA_COUNTER} {{ }}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{tun}\" fib daddr type local counter name \"{LOCAL_COUNTER}\" drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{tun}\" counter name \"{LOCAL_COUNTER}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{tun}\" ip daddr @infra4 counter name \"{INFRA_COUNTER}\" drop\n\
         \t\tiifname \"{tun}\" ip6 daddr @infra6 counter name \"{INFRA_COUNTER}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(
    netns: BorrowedFd<'_>,
    table: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, GuardError> {
    let spawn = |source| GuardError::Spawn {
        table: table.to_owned(),
        source,
    };
    let ns = netns.as_raw_fd();
    let mut cmd = Command::new("nft");
    // SAFETY: runs in the forked child before exec; it only makes the setns system call
    // (async-signal-safe) on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(GuardError::Nft {
            table: table.to_owned(),
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads the guard counters from `nft -j list table` output.
pub fn parse_counters(table: &str, json: &str) -> Result<GuardCounters, GuardError> {
    let bad = |detail: &str| GuardError::Output {
        table: table.to_owned(),
        detail: detail.to_owned(),
    };
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or_else(|| bad("no `nftables` array"))?;
    let mut out = GuardCounters::default();
    let mut seen = (false, false);
    for c in items.iter().filter_map(|i| i.get("counter")) {
        let packets = c.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
        match c.get("name").and_then(|n| n.as_str()) {
            Some(LOCAL_COUNTER) => (out.local, seen.0) = (packets, true),
            Some(INFRA_COUNTER) => (out.infrastructure, seen.1) = (packets, true),
            _ => {}
        }
    }
    if seen != (true, true) {
        return Err(bad("the guard's counters are missing"));
    }
    Ok(out)
}

/// The installed guard; [`Guard::remove`] (or dropping it) deletes the table.
#[derive(Debug)]
pub struct Guard {
    table: String,
    netns: OwnedFd,
    removed: AtomicBool,
}

impl Guard {
    /// Installs (or replaces) the guard of TUN device `tun` in the calling thread's namespace.
    pub fn install(tun: &str, infra: &InfraSet) -> Result<Guard, GuardError> {
        let table = table_name(tun);
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|source| GuardError::Spawn {
                table: table.clone(),
                source,
            })?
            .into();
        let guard = Guard {
            table,
            netns,
            removed: AtomicBool::new(true),
        };
        nft(
            std::os::fd::AsFd::as_fd(&guard.netns),
            &guard.table,
            &["-f", "-"],
            Some(&ruleset(tun, infra)),
        )?;
        guard.removed.store(false, Ordering::SeqCst);
        Ok(guard)
    }

    /// The table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The drop counters (runs `nft`; not for the data path).
    pub fn counters(&self) -> Result<GuardCounters, GuardError> {
        let t = &self.table;
        let json = nft(
            std::os::fd::AsFd::as_fd(&self.netns),
            t,
            &["-j", "list", "table", "inet", t],
            None,
        )?;
        parse_counters(t, &json)
    }

    /// Deletes the table (once; later calls do nothing).
    pub fn remove(&self) -> Result<(), GuardError> {
        if self.removed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let t = &self.table;
        nft(
            std::os::fd::AsFd::as_fd(&self.netns),
            t,
            &["delete", "table", "inet", t],
            None,
        )
        .map(drop)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "could not remove the nftables guard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    #[test]
    fn the_ruleset_names_the_device_and_lists_the_aggregated_set() {
        let nets: Vec<IpNet> = ["192.0.2.21/32", "192.0.2.0/24", "fd00:ec2::254/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let r = ruleset("snastun0", &InfraSet::new(&nets));
        assert!(r.starts_with(
            "table inet snas_proxy_snastun0\ndelete table inet snas_proxy_snastun0\n"
        ));
        assert!(r.contains("elements = { 192.0.2.0/24 };"), "{r}");
        assert!(r.contains("elements = { fd00:ec2::254/128 };"), "{r}");
        assert!(r.contains("iifname \"snastun0\" counter name \"local_drops\" drop"));
        assert!(
            r.contains("iifname \"snastun0\" ip daddr @infra4 counter name \"infra_drops\" drop")
        );
    }

    #[test]
    fn an_empty_family_has_no_elements_clause() {
        let nets: Vec<IpNet> = vec!["192.0.2.21/32".parse().unwrap()];
        let r = ruleset("t0", &InfraSet::new(&nets));
        assert!(
            r.contains("set infra6 { type ipv6_addr; flags interval; auto-merge; }"),
            "{r}"
        );
    }

    #[test]
    fn counters_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "snas_proxy_t0", "handle": 1}},
            {"counter": {"family": "inet", "name": "local_drops", "table": "snas_proxy_t0", "handle": 3, "packets": 2, "bytes": 120}},
            {"counter": {"family": "inet", "name": "infra_drops", "table": "snas_proxy_t0", "handle": 4, "packets": 5, "bytes": 300}}]}"#;
        assert_eq!(
            parse_counters("snas_proxy_t0", json).unwrap(),
            GuardCounters {
                local: 2,
                infrastructure: 5
            }
        );
        assert!(parse_counters("t", r#"{"nftables": []}"#).is_err());
        assert!(parse_counters("t", "not json").is_err());
    }
}
