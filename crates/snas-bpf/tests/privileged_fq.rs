//! fq detection agrees with the kernel configuration (root).

mod common;

use std::process::Command;

/// The running kernel's configuration: `/proc/config.gz`, else `/boot/config-<release>`.
fn kernel_config() -> String {
    if let Ok(out) = Command::new("zcat").arg("/proc/config.gz").output() {
        if out.status.success() && !out.stdout.is_empty() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let boot = format!("/boot/config-{}", release.trim());
    std::fs::read_to_string(&boot).unwrap_or_else(|e| {
        panic!(
            "cannot check the fq probe: no kernel configuration (/proc/config.gz with zcat, or \
             {boot}: {e})"
        )
    })
}

#[test]
fn fq_probe_agrees_with_the_kernel_config() {
    common::require_root("fq probe");
    let config = kernel_config();
    let built_in = config.lines().any(|l| l == "CONFIG_NET_SCH_FQ=y");
    // A module-only fq is loaded on demand when a qdisc asks for it, if there are modules.
    let module = config.lines().any(|l| l == "CONFIG_NET_SCH_FQ=m")
        && std::path::Path::new("/lib/modules").exists();
    let probed = snas_bpf::fq_available().expect("probe runs");
    assert_eq!(
        probed,
        built_in || module,
        "fq built in: {built_in}, loadable module: {module}"
    );
}
