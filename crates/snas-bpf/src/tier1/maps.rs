//! The pinned maps by name, their layout check, and the typed read/write helpers every other
//! part of [`super::Tier1`] goes through.
//!
//! Keys and values are the BTF-generated types of [`crate::skel::types`], converted with
//! [`crate::pod`]; [`Tier1::check_layouts`] refuses a kernel map whose sizes differ from them.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::{bpf_err, Tier1, Tier1Error};
use crate::pod::{bytes_of, from_bytes, Pod};
use crate::skel::types;

/// Entries read per `bpf_map_lookup_batch` call of [`for_each_entry`].
const BATCH: u32 = 4096;

#[derive(Debug)]
pub(super) struct Maps {
    pub(super) jobs: MapHandle,
    pub(super) job_state: MapHandle,
    pub(super) job_conns: MapHandle,
    pub(super) job_conns_bias: MapHandle,
    pub(super) job_by_key: MapHandle,
    pub(super) infra: MapHandle,
    pub(super) infra6: MapHandle,
    pub(super) dst_exact: MapHandle,
    pub(super) dst_cidr: MapHandle,
    pub(super) dst6_exact: MapHandle,
    pub(super) dst6_cidr: MapHandle,
    pub(super) deny_cidr: MapHandle,
    pub(super) deny6_cidr: MapHandle,
    pub(super) proxies: MapHandle,
    pub(super) proxy_by_ip: MapHandle,
    pub(super) maglev: MapHandle,
    pub(super) flows: MapHandle,
    pub(super) flows6: MapHandle,
    pub(super) dns_nat: MapHandle,
    pub(super) counters: MapHandle,
    pub(super) audit: MapHandle,
    pub(super) debug: MapHandle,
    pub(super) node: MapHandle,
}

impl Maps {
    pub(super) fn open(dir: &Path) -> Result<Maps, Tier1Error> {
        let m = |name: &str| {
            MapHandle::from_pinned_path(dir.join(name))
                .map_err(bpf_err(format!("open pinned map {name}")))
        };
        Ok(Maps {
            jobs: m("snas_jobs")?,
            job_state: m("snas_job_state")?,
            job_conns: m("snas_job_conns")?,
            job_conns_bias: m("snas_job_conns_bias")?,
            job_by_key: m("snas_job_by_key")?,
            infra: m("snas_infra")?,
            infra6: m("snas_infra6")?,
            dst_exact: m("snas_dst_exact")?,
            dst_cidr: m("snas_dst_cidr")?,
            dst6_exact: m("snas_dst6_exact")?,
            dst6_cidr: m("snas_dst6_cidr")?,
            deny_cidr: m("snas_deny_cidr")?,
            deny6_cidr: m("snas_deny6_cidr")?,
            proxies: m("snas_proxies")?,
            proxy_by_ip: m("snas_proxy_by_ip")?,
            maglev: m("snas_maglev")?,
            flows: m("snas_flows")?,
            flows6: m("snas_flows6")?,
            dns_nat: m("snas_dns_nat")?,
            counters: m("snas_counters")?,
            audit: m("snas_audit")?,
            debug: m("snas_debug")?,
            node: m("snas_node")?,
        })
    }
}

impl Tier1 {
    /// Checks that every map's key and value sizes (from the kernel) equal the sizes of the
    /// generated Rust types this module writes, so a header change cannot go unnoticed.
    pub fn check_layouts(&self) -> Result<(), Tier1Error> {
        use std::mem::size_of;
        let m = &self.maps;
        let checks: [(&MapHandle, usize, usize, &'static str); 22] = [
            (
                &m.deny_cidr,
                size_of::<types::cidr_key>(),
                size_of::<types::dst_val>(),
                "snas_deny_cidr",
            ),
            (
                &m.deny6_cidr,
                size_of::<types::cidr6_key>(),
                size_of::<types::dst_val>(),
                "snas_deny6_cidr",
            ),
            (
                &m.job_conns,
                size_of::<u32>(),
                size_of::<types::job_conns>(),
                "snas_job_conns",
            ),
            (
                &m.job_conns_bias,
                size_of::<u32>(),
                size_of::<i64>(),
                "snas_job_conns_bias",
            ),
            (
                &m.infra,
                size_of::<types::infra_key>(),
                size_of::<u32>(),
                "snas_infra",
            ),
            (
                &m.infra6,
                size_of::<types::infra6_key>(),
                size_of::<u32>(),
                "snas_infra6",
            ),
            (
                &m.dst6_exact,
                size_of::<types::dst6_key>(),
                size_of::<types::dst_val>(),
                "snas_dst6_exact",
            ),
            (
                &m.dst6_cidr,
                size_of::<types::cidr6_key>(),
                size_of::<types::dst_val>(),
                "snas_dst6_cidr",
            ),
            (
                &m.flows6,
                size_of::<types::flow6_key>(),
                size_of::<types::flow_val>(),
                "snas_flows6",
            ),
            (
                &m.jobs,
                size_of::<u32>(),
                size_of::<types::job_cfg>(),
                "snas_jobs",
            ),
            (
                &m.job_state,
                size_of::<u32>(),
                size_of::<types::job_state>(),
                "snas_job_state",
            ),
            (
                &m.job_by_key,
                size_of::<u64>(),
                size_of::<u32>(),
                "snas_job_by_key",
            ),
            (
                &m.dst_exact,
                size_of::<types::dst_key>(),
                size_of::<types::dst_val>(),
                "snas_dst_exact",
            ),
            (
                &m.dst_cidr,
                size_of::<types::cidr_key>(),
                size_of::<types::dst_val>(),
                "snas_dst_cidr",
            ),
            (
                &m.proxies,
                size_of::<u32>(),
                size_of::<types::proxy>(),
                "snas_proxies",
            ),
            (
                &m.proxy_by_ip,
                size_of::<u32>(),
                size_of::<u32>(),
                "snas_proxy_by_ip",
            ),
            (
                &m.dns_nat,
                size_of::<types::dns_nat_key>(),
                size_of::<types::dns_nat_val>(),
                "snas_dns_nat",
            ),
            (
                &m.maglev,
                size_of::<u32>(),
                size_of::<types::maglev_table>(),
                "snas_maglev",
            ),
            (
                &m.flows,
                size_of::<types::flow_key>(),
                size_of::<types::flow_val>(),
                "snas_flows",
            ),
            (
                &m.counters,
                size_of::<types::counter_key>(),
                size_of::<types::counter_val>(),
                "snas_counters",
            ),
            (
                &m.debug,
                size_of::<u32>(),
                size_of::<types::debug_rec>(),
                "snas_debug",
            ),
            (
                &m.node,
                size_of::<u32>(),
                size_of::<types::node_info>(),
                "snas_node",
            ),
        ];
        for (map, k, v, name) in checks {
            if map.key_size() as usize != k || map.value_size() as usize != v {
                return Err(Tier1Error::ValueSize(name));
            }
        }
        Ok(())
    }
}

pub(super) fn update<K: Pod, V: Pod>(
    map: &MapHandle,
    k: &K,
    v: &V,
    name: &str,
) -> Result<(), Tier1Error> {
    map.update(bytes_of(k), bytes_of(v), MapFlags::ANY)
        .map_err(bpf_err(format!("update {name}")))
}

pub(super) fn lookup<V: Pod>(
    map: &MapHandle,
    k: &impl Pod,
    name: &'static str,
) -> Result<Option<V>, Tier1Error> {
    match map
        .lookup(bytes_of(k), MapFlags::ANY)
        .map_err(bpf_err(format!("lookup {name}")))?
    {
        None => Ok(None),
        Some(b) => from_bytes(&b).map(Some).ok_or(Tier1Error::ValueSize(name)),
    }
}

/// Calls `f(key, value)` for every entry of a hash map, `BATCH` entries per
/// `bpf_map_lookup_batch`. (libbpf-rs 0.27's `lookup_batch` iterator ends at the first batch
/// shorter than asked, but the kernel returns short batches whenever the next bucket does not
/// fit: it would stop early. The end is ENOENT.) Entries inserted or deleted meanwhile may or
/// may not be seen, as with any iteration of a live map.
pub(super) fn for_each_entry(
    map: &MapHandle,
    name: &'static str,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), Tier1Error> {
    let (ksz, vsz) = (map.key_size() as usize, map.value_size() as usize);
    let mut want = BATCH;
    let mut keys = vec![0u8; ksz * want as usize];
    let mut vals = vec![0u8; vsz * want as usize];
    // The batch position is opaque to userspace (a bucket index for hash maps), at most a key.
    let tok_len = ksz.max(8);
    let (mut tok_in, mut tok_out) = (vec![0u8; tok_len], vec![0u8; tok_len]);
    let mut first = true;
    let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    loop {
        let mut count = want;
        let in_batch = if first {
            std::ptr::null_mut()
        } else {
            tok_in.as_mut_ptr().cast()
        };
        // SAFETY: the fd is a live map; keys/vals hold `want` entries of the map's key and
        // value sizes, the tokens `tok_len` bytes, and `count` says how many entries fit; all
        // buffers outlive the call.
        let rc = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_batch,
                tok_out.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let errno = if rc < 0 { -rc } else { 0 };
        if errno == libc::ENOSPC && count == 0 {
            // One bucket holds more entries than a batch: ask for more at once.
            want = want.saturating_mul(2);
            keys.resize(ksz * want as usize, 0);
            vals.resize(vsz * want as usize, 0);
            continue;
        }
        if errno != 0 && errno != libc::ENOENT {
            return Err(Tier1Error::Bpf {
                what: format!("lookup_batch {name}"),
                source: libbpf_rs::Error::from(io::Error::from_raw_os_error(errno)),
            });
        }
        let n = (count as usize).min(want as usize);
        for i in 0..n {
            f(&keys[i * ksz..(i + 1) * ksz], &vals[i * vsz..(i + 1) * vsz]);
        }
        if errno == libc::ENOENT {
            return Ok(());
        }
        std::mem::swap(&mut tok_in, &mut tok_out);
        first = false;
    }
}

pub(super) fn delete_where<K: Pod>(map: &MapHandle, pred: impl Fn(&K) -> bool) {
    let doomed: Vec<Vec<u8>> = map
        .keys()
        .filter(|k| from_bytes::<K>(k).is_some_and(|k| pred(&k)))
        .collect();
    for k in doomed {
        let _ = map.delete(&k);
    }
}
