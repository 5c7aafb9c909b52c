//! The proxy set and the Maglev table tier 1 picks a flow's proxy from.

use std::collections::HashSet;

use libbpf_rs::MapCore;

use super::maps::{lookup, update};
use super::{Tier1, Tier1Error};
use crate::config::ProxyEntry;
use crate::maglev::{self, Backend};
use crate::pod::from_bytes;
use crate::skel::types;

/// Maximum proxies (`MAX_PROXIES` in maps.h).
pub const MAX_PROXIES: usize = 64;

impl Tier1 {
    /// Replaces the proxy set and rebuilds the Maglev table from the alive proxies that are
    /// not draining. Index = position in `proxies`. Flows pinned to a proxy that is still
    /// alive (draining or not) stay on it.
    pub fn set_proxies(&self, proxies: &[ProxyEntry]) -> Result<(), Tier1Error> {
        if proxies.len() > MAX_PROXIES {
            return Err(Tier1Error::TooManyProxies(proxies.len()));
        }
        let mut backends = Vec::new();
        let mut ips = HashSet::new();
        for i in 0..MAX_PROXIES {
            let idx = i as u32;
            let val = match proxies.get(i) {
                Some(p) => {
                    let ip = u32::from_ne_bytes(p.ip.octets());
                    ips.insert(ip);
                    update(&self.maps.proxy_by_ip, &ip, &idx, "snas_proxy_by_ip")?;
                    if p.alive && !p.draining {
                        backends.push(Backend {
                            index: i as u16,
                            id: u64::from(u32::from(p.ip)),
                        });
                    }
                    types::proxy {
                        ip,
                        flags: u32::from(p.alive),
                    }
                }
                None => types::proxy::default(),
            };
            update(&self.maps.proxies, &idx, &val, "snas_proxies")?;
        }
        for key in self.maps.proxy_by_ip.keys() {
            if let Some(ip) = from_bytes::<u32>(&key) {
                if !ips.contains(&ip) {
                    let _ = self.maps.proxy_by_ip.delete(&key);
                }
            }
        }
        let slots = maglev::build(&backends);
        let old: Option<types::maglev_table> = lookup(&self.maps.maglev, &0u32, "snas_maglev")?;
        let mut table = types::maglev_table {
            generation: old.map_or(1, |t| t.generation.wrapping_add(1)),
            ..Default::default()
        };
        table.slot.copy_from_slice(&slots);
        update(&self.maps.maglev, &0u32, &table, "snas_maglev")
    }
}
