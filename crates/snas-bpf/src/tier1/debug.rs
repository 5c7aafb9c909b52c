//! The debug record programs loaded with `NodeConfig::record_debug` keep (tests only): where
//! the last packet was redirected.

use super::maps::{lookup, update};
use super::{Tier1, Tier1Error};
use crate::skel::types;

/// Where a test-run packet was redirected (from the debug map; `NodeConfig::record_debug`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugRecord {
    /// Target ifindex.
    pub ifindex: u32,
    /// 1 = bpf_redirect, 2 = bpf_redirect_neigh, 3 = bpf_redirect_peer.
    pub kind: u32,
    /// Proxy index chosen (encap only).
    pub proxy: u32,
    /// Flow hash (encap only).
    pub flow_hash: u32,
}

impl Tier1 {
    /// The last redirect recorded by a program loaded with `record_debug`.
    pub fn last_redirect(&self) -> Result<Option<DebugRecord>, Tier1Error> {
        let d: Option<types::debug_rec> = lookup(&self.maps.debug, &0u32, "snas_debug")?;
        Ok(d.filter(|d| d.redirect_kind != 0).map(|d| DebugRecord {
            ifindex: d.redirect_ifindex,
            kind: d.redirect_kind,
            proxy: d.proxy,
            flow_hash: d.flow_hash,
        }))
    }

    /// Clears the debug record.
    pub fn clear_debug(&self) -> Result<(), Tier1Error> {
        update(
            &self.maps.debug,
            &0u32,
            &types::debug_rec::default(),
            "snas_debug",
        )
    }
}
