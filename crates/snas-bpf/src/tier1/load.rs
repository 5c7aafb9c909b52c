//! Loading the three BPF objects with the node's constants and pinning their maps and programs;
//! reopening a node from its pins; taking it all down again.
//!
//! Invariant: every object reuses the maps the first one pinned (libbpf finds the pin path
//! and shares the map), so the three programs see one set of maps.

use std::fs;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, TC_EGRESS, TC_INGRESS};

use super::maps::{lookup, update, Maps};
use super::pins::remove_pins;
use super::tc::{tc_attach, tc_detach};
use super::{bpf_err, Tier1, Tier1Error};
use crate::config::{saturating_ns, NodeConfig};
use crate::pod::from_bytes;
use crate::skel::{sandbox, sandbox_egress, types, uplink};

const PROG_SANDBOX: &str = "prog_sandbox_ingress";
const PROG_SANDBOX_EGRESS: &str = "prog_sandbox_egress";
const PROG_UPLINK: &str = "prog_uplink_ingress";

impl Tier1 {
    /// Loads both programs with the node's constants, pins maps and programs under
    /// `node.pin_dir` (reusing maps already pinned there, so their state survives), and
    /// attaches the uplink program if `node.attach_uplink`.
    ///
    /// The pin directory must be on a bpffs mount (see [`ensure_bpffs`]).
    pub fn load(node: &NodeConfig) -> Result<Tier1, Tier1Error> {
        let dir = node.pin_dir.clone();
        fs::create_dir_all(&dir).map_err(|source| Tier1Error::PinDir {
            path: dir.clone(),
            source,
        })?;

        macro_rules! load_object {
            ($builder:ty, $prog:ident, $pin:expr, $name:literal) => {{
                let mut storage = MaybeUninit::uninit();
                let mut open = <$builder>::default()
                    .open(&mut storage)
                    .map_err(bpf_err(concat!("open ", $name)))?;
                if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
                    ro.cfg_uplink_ifindex = node.uplink_ifindex;
                    ro.cfg_node_ip = u32::from_ne_bytes(node.node_ip.octets());
                    ro.cfg_uplink_mtu = node.uplink_mtu;
                    ro.cfg_horizon_ns = saturating_ns(node.horizon);
                    ro.cfg_geneve_port = node.geneve_port;
                    ro.cfg_audit_rate = node.audit_per_sec;
                    ro.cfg_icmp_rate = node.icmp_budget.per_sec.get();
                    ro.cfg_icmp_burst = node.icmp_budget.burst.get();
                    ro.cfg_record_debug = u8::from(node.record_debug);
                }
                set_pins(open.open_object_mut(), &dir)?;
                let mut skel = open.load().map_err(bpf_err(concat!("load ", $name)))?;
                pin_prog(&mut skel.progs.$prog, &dir.join($pin))?;
            }};
        }
        load_object!(
            sandbox::SandboxIngressSkelBuilder,
            snas_sandbox_ingress,
            PROG_SANDBOX,
            "sandbox_ingress"
        );
        load_object!(
            sandbox_egress::SandboxEgressSkelBuilder,
            snas_sandbox_egress,
            PROG_SANDBOX_EGRESS,
            "sandbox_egress"
        );
        load_object!(
            uplink::UplinkIngressSkelBuilder,
            snas_uplink_ingress,
            PROG_UPLINK,
            "uplink_ingress"
        );

        let t = Tier1::open_pinned(&dir)?;
        t.check_layouts()?;
        let info = types::node_info {
            uplink_ifindex: node.uplink_ifindex,
            node_ip: u32::from_ne_bytes(node.node_ip.octets()),
        };
        let attached = if node.attach_uplink {
            node.uplink_ifindex
        } else {
            0
        };
        let info = types::node_info {
            uplink_ifindex: attached,
            ..info
        };
        update(&t.maps.node, &0u32, &info, "snas_node")?;
        if node.attach_uplink {
            tc_attach(&t.uplink_prog, node.uplink_ifindex, TC_INGRESS)?;
        }
        Ok(t)
    }

    /// Opens the maps and programs pinned under `dir` by an earlier [`Tier1::load`]. Nothing
    /// is attached or detached.
    pub fn open_pinned(dir: &Path) -> Result<Tier1, Tier1Error> {
        let prog = |name: &str| {
            libbpf_rs::Program::fd_from_pinned_path(dir.join(name))
                .map_err(bpf_err(format!("open pinned program {name}")))
        };
        Ok(Tier1 {
            pin_dir: dir.to_path_buf(),
            maps: Maps::open(dir)?,
            sandbox_prog: prog(PROG_SANDBOX)?,
            sandbox_egress_prog: prog(PROG_SANDBOX_EGRESS)?,
            uplink_prog: prog(PROG_UPLINK)?,
            writers: Mutex::new(()),
            displaced_rules: AtomicU64::new(0),
        })
    }

    /// Detaches everything this node attached (every job's veth, the uplink) and removes the
    /// pins and the pin directory. The kernel frees the maps when the last user goes.
    pub fn teardown(self) -> Result<(), Tier1Error> {
        for key in self.maps.jobs.keys() {
            if let Some(idx) = from_bytes::<u32>(&key) {
                if self.attached(idx)? {
                    tc_detach(&self.sandbox_prog, idx, TC_INGRESS);
                    tc_detach(&self.sandbox_egress_prog, idx, TC_EGRESS);
                }
            }
        }
        if let Some(info) = lookup::<types::node_info>(&self.maps.node, &0u32, "snas_node")? {
            if info.uplink_ifindex != 0 {
                tc_detach(&self.uplink_prog, info.uplink_ifindex, TC_INGRESS);
            }
        }
        remove_pins(&self.pin_dir)
    }
}

fn set_pins(obj: &mut libbpf_rs::OpenObject, dir: &Path) -> Result<(), Tier1Error> {
    for mut map in obj.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        // Internal maps (.rodata, .bss) are per object and not shared.
        if name.contains('.') {
            continue;
        }
        map.set_pin_path(dir.join(&name))
            .map_err(bpf_err(format!("set pin path of {name}")))?;
    }
    Ok(())
}

fn pin_prog(prog: &mut libbpf_rs::ProgramMut<'_>, path: &Path) -> Result<(), Tier1Error> {
    if path.exists() {
        fs::remove_file(path).map_err(|source| Tier1Error::PinDir {
            path: path.into(),
            source,
        })?;
    }
    prog.pin(path)
        .map_err(bpf_err(format!("pin {}", path.display())))
}
