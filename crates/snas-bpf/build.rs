//! Compiles the tier-1 BPF entry objects with clang-19 and generates libbpf-rs skeletons.
use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const OBJECTS: &[&str] = &["sandbox_ingress", "sandbox_egress", "uplink_ingress"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = env::var("SNAS_BPF_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    for name in OBJECTS {
        let src = format!("bpf/{name}.bpf.c");
        SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args([
                "-I/usr/include/x86_64-linux-gnu",
                "-Ibpf",
                "-O2",
                "-g",
                // v3: atomic fetch-or and compare-and-swap for the flow state (conntrack.h).
                "-mcpu=v3",
                "-Wall",
                "-Werror",
            ])
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {src}: {e:#}"));
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=bpf/lib");
    for entry in std::fs::read_dir("bpf/lib")
        .expect("bpf/lib exists")
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    println!("cargo:rerun-if-env-changed=SNAS_BPF_CLANG");
}
