#!/usr/bin/env bash
# Installs everything SNAS needs on a fresh Debian 12 machine and builds it. Idempotent.
#
#   sudo scripts/setup.sh            # packages + release build
#   SNAS_SETUP_SKIP_BUILD=1 ...      # packages only
#
# Needs: root (apt-get), a Rust toolchain (cargo >= 1.85) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt packages, network namespaces and eBPF need it)"

# Debian packages. Each is needed by something named beside it.
PACKAGES=(
  clang-19 llvm-19        # compiles bpf/*.c (libbpf-cargo calls clang-19)
  libelf-dev zlib1g-dev   # libbpf-sys builds libbpf from source
  pkg-config make gcc libc6-dev linux-libc-dev
  iproute2 ethtool nftables  # job namespaces, veths, offloads, the kernel baseline
  runsc                   # gVisor sandboxes
  curl dnsutils python3 procps  # tools the end-to-end tests run inside jobs
  squid                   # the squid baseline of snas-bench (started only by the benchmark)
  fonts-dejavu-core       # the font of snas-bench's PNG charts
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages with services (squid) must not start them: the benchmark runs its own squid in a
  # namespace. policy-rc.d is Debian's switch for that; ours is removed right after.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# BPF filesystem for pinned maps (already mounted on most systemd hosts).
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi

if [ -z "${SNAS_SETUP_SKIP_BUILD:-}" ]; then
  log "building snas (release)"
  cargo build --release --locked -p snas
  log "built target/release/snas"
fi
