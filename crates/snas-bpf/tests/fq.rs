//! fq detection agrees with the kernel configuration (root; skipped otherwise).

mod common;

use std::process::Command;

#[test]
fn fq_probe_agrees_with_the_kernel_config() {
    if !common::root_or_skip("fq probe") {
        return;
    }
    let Ok(out) = Command::new("zcat").arg("/proc/config.gz").output() else {
        eprintln!("SKIP fq probe: no zcat");
        return;
    };
    let config = String::from_utf8_lossy(&out.stdout);
    if config.is_empty() {
        eprintln!("SKIP fq probe: no /proc/config.gz");
        return;
    }
    // Without /lib/modules a module-only fq cannot be loaded either.
    let built_in = config.lines().any(|l| l == "CONFIG_NET_SCH_FQ=y");
    let module = config.lines().any(|l| l == "CONFIG_NET_SCH_FQ=m")
        && std::path::Path::new("/lib/modules").exists();
    let probed = snas_bpf::fq_available().expect("probe runs");
    if module {
        eprintln!("fq is a module here; probe said {probed}");
    } else {
        assert_eq!(probed, built_in);
    }
}
