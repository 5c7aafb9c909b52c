//! Byte views of the BTF-generated map key/value types.
//!
//! Owns the only `unsafe` that turns generated structs into map bytes and back. Invariant:
//! [`Pod`] is implemented only for types generated from `bpf/lib/maps.h`, whose padding is
//! spelled out as `_pad` fields (no implicit holes), so every byte is initialised. The test
//! `map_value_sizes_match_generated_types` checks each type's size against the kernel's map
//! definition.

use crate::skel::types;

/// A generated C type that is plain bytes: `repr(C)`, `Copy`, no implicit padding, valid for
/// any bit pattern.
///
/// # Safety
/// Implement only for types meeting those conditions.
pub(crate) unsafe trait Pod: Copy + Default {}

// SAFETY: all generated from maps.h with explicit padding; integers and arrays only.
unsafe impl Pod for types::job_cfg {}
// SAFETY: as above (bpf_spin_lock is a u32).
unsafe impl Pod for types::job_state {}
// SAFETY: as above.
unsafe impl Pod for types::dst_key {}
// SAFETY: as above.
unsafe impl Pod for types::dst_val {}
// SAFETY: as above.
unsafe impl Pod for types::cidr_key {}
// SAFETY: as above.
unsafe impl Pod for types::proxy {}
// SAFETY: as above.
unsafe impl Pod for types::maglev_table {}
// SAFETY: as above.
unsafe impl Pod for types::flow_key {}
// SAFETY: as above.
unsafe impl Pod for types::flow_val {}
// SAFETY: as above.
unsafe impl Pod for types::counter_key {}
// SAFETY: as above.
unsafe impl Pod for types::counter_val {}
// SAFETY: as above.
unsafe impl Pod for types::audit_event {}
// SAFETY: as above.
unsafe impl Pod for types::debug_rec {}
// SAFETY: as above.
unsafe impl Pod for types::node_info {}
// SAFETY: as above.
unsafe impl Pod for types::dst6_key {}
// SAFETY: as above.
unsafe impl Pod for types::cidr6_key {}
// SAFETY: as above.
unsafe impl Pod for types::flow6_key {}
// SAFETY: as above.
unsafe impl Pod for types::dns_nat_key {}
// SAFETY: as above.
unsafe impl Pod for types::dns_nat_val {}
// SAFETY: as above.
unsafe impl Pod for types::job_conns {}
// SAFETY: as above.
unsafe impl Pod for types::infra_key {}
// SAFETY: as above.
unsafe impl Pod for types::infra6_key {}
// SAFETY: primitive integers.
unsafe impl Pod for u32 {}
// SAFETY: primitive integers.
unsafe impl Pod for i64 {}
// SAFETY: primitive integers.
unsafe impl Pod for u64 {}

pub(crate) fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T: Pod has no uninitialised bytes; the slice covers exactly the value and
    // borrows it.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

pub(crate) fn from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: lengths are equal, the regions do not overlap, and any bit pattern is a valid T.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    Some(v)
}
