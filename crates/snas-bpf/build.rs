//! Compiles the BPF entry objects (tier 1's and the proxy's fast path) with clang-19 and generates libbpf-rs skeletons.
//!
//! The programs include kernel UAPI headers (`linux/*.h`), which include `asm/types.h` from
//! the architecture's directory: on Debian and Ubuntu `/usr/include/<multiarch tuple>`
//! (linux-libc-dev). The tuple is derived from the target being built (the programs run on
//! the target's kernel), not assumed: `SNAS_BPF_ASM_INCLUDE` overrides the directory.
use std::env;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

const OBJECTS: &[&str] = &[
    "sandbox_ingress",
    "sandbox_egress",
    "uplink_ingress",
    "proxy_fastpath",
];

/// Debian's multiarch tuple of a Linux target, from cargo's `CARGO_CFG_TARGET_*`. The kernel
/// headers are the same for the gnu and musl C libraries, so the C library does not matter.
fn multiarch(arch: &str, endian: &str, abi: &str) -> String {
    match (arch, endian) {
        ("x86", _) => "i386-linux-gnu".into(),
        ("arm", _) if abi.ends_with("hf") => "arm-linux-gnueabihf".into(),
        ("arm", _) => "arm-linux-gnueabi".into(),
        ("powerpc64", "little") => "powerpc64le-linux-gnu".into(),
        ("mips64", "little") => "mips64el-linux-gnuabi64".into(),
        ("mips64", _) => "mips64-linux-gnuabi64".into(),
        ("mips", "little") => "mipsel-linux-gnu".into(),
        ("riscv64", _) | ("riscv64gc", _) => "riscv64-linux-gnu".into(),
        (a, _) => format!("{a}-linux-gnu"),
    }
}

/// The directory holding the target's `asm/types.h`.
fn asm_include() -> PathBuf {
    if let Some(dir) = env::var_os("SNAS_BPF_ASM_INCLUDE") {
        return PathBuf::from(dir);
    }
    let var = |k: &str| env::var(k).unwrap_or_default();
    let tuple = multiarch(
        &var("CARGO_CFG_TARGET_ARCH"),
        &var("CARGO_CFG_TARGET_ENDIAN"),
        &var("CARGO_CFG_TARGET_ABI"),
    );
    Path::new("/usr/include").join(tuple)
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = env::var("SNAS_BPF_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let asm = asm_include();
    if !asm.join("asm/types.h").exists() {
        // Not fatal here: a distribution that keeps asm/ in /usr/include works without the
        // flag; where it is missing, clang's "asm/types.h not found" follows this hint.
        println!(
            "cargo:warning={}/asm/types.h not found: install the kernel headers for the target \
             (Debian: linux-libc-dev) or set SNAS_BPF_ASM_INCLUDE to the directory holding asm/",
            asm.display()
        );
    }
    let asm_flag = format!("-I{}", asm.display());
    for name in OBJECTS {
        let src = format!("bpf/{name}.bpf.c");
        SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args([
                asm_flag.as_str(),
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
    println!("cargo:rerun-if-env-changed=SNAS_BPF_ASM_INCLUDE");
}
