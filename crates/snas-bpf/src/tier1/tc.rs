//! Attaching programs to devices: netlink clsact with SNAS's fixed filter handle and priority
//! (libbpf-rs has no safe tcx API), replaced on re-attach.

use std::os::fd::{AsFd, OwnedFd};

use libbpf_rs::{TcAttachPoint, TcHookBuilder, TC_INGRESS};

use super::{bpf_err, Tier1Error};

/// TC filter handle of SNAS programs.
pub const TC_HANDLE: u32 = 0x534e;
/// TC filter priority of SNAS programs.
pub const TC_PRIORITY: u32 = 1;

fn ifindex_i32(ifindex: u32) -> i32 {
    i32::try_from(ifindex).unwrap_or(i32::MAX)
}

/// Attaches `prog` at `point`. The clsact qdisc is created first (an existing one is fine;
/// libbpf then logs "Exclusivity flag on", which is harmless) when the point is ingress, so a
/// following egress attach on the same device does not ask again.
pub(super) fn tc_attach(
    prog: &OwnedFd,
    ifindex: u32,
    point: TcAttachPoint,
) -> Result<(), Tier1Error> {
    let mut hook = TcHookBuilder::new(prog.as_fd())
        .ifindex(ifindex_i32(ifindex))
        .replace(true)
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY)
        .hook(point);
    if point == TC_INGRESS {
        hook.create()
            .map_err(bpf_err(format!("create clsact on ifindex {ifindex}")))?;
    }
    hook.attach()
        .map_err(bpf_err(format!("attach to ifindex {ifindex}")))?;
    Ok(())
}

/// Best effort: the device may already be gone (veth deleted with its netns).
pub(super) fn tc_detach(prog: &OwnedFd, ifindex: u32, point: TcAttachPoint) {
    let mut hook = TcHookBuilder::new(prog.as_fd())
        .ifindex(ifindex_i32(ifindex))
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY)
        .hook(point);
    let _ = hook.detach();
}
