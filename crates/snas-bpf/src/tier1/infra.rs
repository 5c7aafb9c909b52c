//! The node-wide infrastructure set: prefixes refused for every job whatever its rules say.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libbpf_rs::MapCore;

use super::maps::{delete_where, update};
use super::{Tier1, Tier1Error};
use crate::pod::from_bytes;
use crate::skel::types;

/// Maximum IPv4 infrastructure prefixes (`MAX_INFRA` in maps.h).
pub const MAX_INFRA: usize = 16384;

/// Maximum IPv6 infrastructure prefixes (`MAX_INFRA6` in maps.h).
pub const MAX_INFRA6: usize = 4096;

impl Tier1 {
    /// Replaces the node-wide infrastructure set: destinations refused for every job whatever
    /// its rules say (`infrastructure_denied`; not even an `allow_private` rule opens them).
    /// The new prefixes are inserted before the old ones that are gone are deleted, so no
    /// prefix in both sets is ever open. The maps are pinned: the set survives an agent
    /// restart until replaced.
    pub fn set_infrastructure(&self, nets: &[IpNet]) -> Result<(), Tier1Error> {
        let mut v4 = HashSet::new();
        let mut v6 = HashSet::new();
        for n in nets {
            match n.trunc() {
                IpNet::V4(n) => {
                    v4.insert((n.prefix_len(), u32::from_ne_bytes(n.network().octets())));
                }
                IpNet::V6(n) => {
                    v6.insert((n.prefix_len(), n.network().octets()));
                }
            }
        }
        if v4.len() > MAX_INFRA {
            return Err(Tier1Error::TooManyInfrastructurePrefixes {
                family: 4,
                count: v4.len(),
                max: MAX_INFRA,
            });
        }
        if v6.len() > MAX_INFRA6 {
            return Err(Tier1Error::TooManyInfrastructurePrefixes {
                family: 6,
                count: v6.len(),
                max: MAX_INFRA6,
            });
        }
        let _w = self.writers();
        for &(len, ip) in &v4 {
            let k = types::infra_key {
                prefixlen: u32::from(len),
                ip,
            };
            update(&self.maps.infra, &k, &1u32, "snas_infra")?;
        }
        for &(len, ip) in &v6 {
            let k = types::infra6_key {
                prefixlen: u32::from(len),
                ip,
            };
            update(&self.maps.infra6, &k, &1u32, "snas_infra6")?;
        }
        delete_where::<types::infra_key>(&self.maps.infra, |k| {
            !v4.contains(&(k.prefixlen as u8, k.ip))
        });
        delete_where::<types::infra6_key>(&self.maps.infra6, |k| {
            !v6.contains(&(k.prefixlen as u8, k.ip))
        });
        Ok(())
    }

    /// The current infrastructure set (as [`Tier1::set_infrastructure`] stored it).
    pub fn infrastructure(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for k in self.maps.infra.keys() {
            if let Some(k) = from_bytes::<types::infra_key>(&k) {
                let ip = Ipv4Addr::from(k.ip.to_ne_bytes());
                if let Ok(n) = Ipv4Net::new(ip, k.prefixlen as u8) {
                    out.push(IpNet::V4(n));
                }
            }
        }
        for k in self.maps.infra6.keys() {
            if let Some(k) = from_bytes::<types::infra6_key>(&k) {
                if let Ok(n) = Ipv6Net::new(Ipv6Addr::from(k.ip), k.prefixlen as u8) {
                    out.push(IpNet::V6(n));
                }
            }
        }
        out.sort();
        out
    }
}
