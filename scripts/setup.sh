#!/usr/bin/env bash
# Installs everything SNAS needs on a fresh Debian 12 machine and builds it. Idempotent.
#
#   sudo scripts/setup.sh            # packages + release build
#   SNAS_SETUP_SKIP_BUILD=1 ...      # packages only
#
# gVisor: SNAS needs runsc >= 20240729 (the release with the systrap platform, which `snas run`
# uses by default). Debian 12's own suite carries 20221219 (ptrace only), so on bookworm this
# script adds the `bookworm-backports` suite, on the mirror apt already uses, to the apt
# sources (once: a later run finds it) and installs runsc from there, upgrading an old one. A
# runsc on PATH that is new enough is kept, whatever installed it. If no runsc >= 20240729 can
# be had, the script stops with a message that says what to do.
#
#   scripts/setup.sh --backports-source-only   # only make sure the backports suite is in the
#                                              # apt sources; prints the file that holds it
#   SNAS_SETUP_APT_DIR=DIR                     # apt's configuration directory (default
#                                              # /etc/apt; tests point it at a copy)
#
# Needs: root (apt-get), a Rust toolchain (cargo >= 1.85) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# The oldest runsc release SNAS accepts (YYYYMMDD): the first packaged one with systrap.
RUNSC_MIN=20240729
APT_DIR=${SNAS_SETUP_APT_DIR:-/etc/apt}
BACKPORTS=bookworm-backports
# The file this script writes; the extension follows the format of the sources it copies.
OUR_SOURCE=snas-$BACKPORTS

# --- apt sources -------------------------------------------------------------------------

# The apt source files, deb822 (*.sources) and one-line (sources.list, *.list).
deb822_files() { local f; for f in "$APT_DIR"/sources.list.d/*.sources; do [ -f "$f" ] && echo "$f"; done; true; }
oneline_files() {
  local f
  for f in "$APT_DIR"/sources.list "$APT_DIR"/sources.list.d/*.list; do [ -f "$f" ] && echo "$f"; done
  true
}

# deb822 stanzas of enabled `deb` entries, one line each: URIs, Suites, Signed-By separated by
# US (\037: not whitespace, so that `read` keeps empty fields).
# Continuation lines (a key block embedded in Signed-By) are skipped; such a Signed-By is not
# a file name and is reported as empty.
deb822_entries() {
  local f
  for f in $(deb822_files); do
    awk '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no" && uris != "")
          printf "%s\037%s\037%s\n", uris, suites, signed
        types = uris = suites = signed = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }
      {
        key = $0; sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        k = tolower(key)
        if (k == "types") types = val
        else if (k == "uris") uris = val
        else if (k == "suites") suites = val
        else if (k == "enabled") enabled = val
        else if (k == "signed-by") signed = (val ~ /^\//) ? val : ""
      }
      END { flush() }' "$f"
  done
}

# One-line entries of type `deb`: options, URI, suite separated by US (options without the brackets).
oneline_entries() {
  local f
  for f in $(oneline_files); do
    awk '
      /^[ \t]*#/ || NF < 3 || $1 != "deb" { next }
      {
        opts = ""; i = 2
        if ($2 ~ /^\[/) {
          while (i <= NF) { opts = opts (opts == "" ? "" : " ") $i; if ($i ~ /\]$/) break; i++ }
          gsub(/^\[|\]$/, "", opts); i++
        }
        printf "%s\037%s\037%s\n", opts, $i, $(i + 1)
      }' "$f"
  done
}

has_word() { [[ " $1 " == *" $2 "* ]]; }

# Whether an enabled source already carries the backports suite (ours or anyone's).
backports_present() {
  local uris suites signed opts uri suite
  while IFS=$'\x1f' read -r uris suites signed; do
    has_word "$suites" "$BACKPORTS" && return 0
  done < <(deb822_entries)
  while IFS=$'\x1f' read -r opts uri suite; do
    [ "$suite" = "$BACKPORTS" ] && return 0
  done < <(oneline_entries)
  return 1
}

# The file naming the backports suite (for messages).
backports_file() {
  grep -lsE "(^|[[:space:]])$BACKPORTS([[:space:]]|$)" \
    "$APT_DIR"/sources.list "$APT_DIR"/sources.list.d/*.list "$APT_DIR"/sources.list.d/*.sources \
    | head -n 1 || true
}

# Adds `bookworm-backports main` on the mirror that serves `bookworm`, in the same format and
# with the same keyring as that entry. Prints the file that carries the suite.
ensure_backports_source() {
  if backports_present; then
    backports_file
    return 0
  fi
  local uris suites signed opts uri suite
  while IFS=$'\x1f' read -r uris suites signed; do
    has_word "$suites" bookworm || continue
    uri=${uris%% *}
    [[ "$uri" == cdrom:* ]] && continue
    local out="$APT_DIR/sources.list.d/$OUR_SOURCE.sources"
    {
      echo "# Added by SNAS scripts/setup.sh: runsc >= $RUNSC_MIN (gVisor with systrap) comes from here."
      echo "Types: deb"
      echo "URIs: $uri"
      echo "Suites: $BACKPORTS"
      echo "Components: main"
      [ -n "$signed" ] && echo "Signed-By: $signed"
    } > "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$out"
    return 0
  done < <(deb822_entries)
  while IFS=$'\x1f' read -r opts uri suite; do
    [ "$suite" = bookworm ] || continue
    [[ "$uri" == cdrom:* ]] && continue
    local out="$APT_DIR/sources.list.d/$OUR_SOURCE.list"
    {
      echo "# Added by SNAS scripts/setup.sh: runsc >= $RUNSC_MIN (gVisor with systrap) comes from here."
      echo "deb ${opts:+[$opts] }$uri $BACKPORTS main"
    } > "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$out"
    return 0
  done < <(oneline_entries)
  die "no apt source for Debian 'bookworm' found in $APT_DIR (sources.list, sources.list.d/*.list or *.sources): cannot tell which mirror to take $BACKPORTS from; add a line such as 'deb http://deb.debian.org/debian $BACKPORTS main' to $APT_DIR/sources.list.d/ and run this script again"
}

if [ "${1:-}" = "--backports-source-only" ]; then
  ensure_backports_source
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (apt packages, network namespaces and eBPF need it)"

# --- Debian packages ---------------------------------------------------------------------

# Each is needed by something named beside it. runsc is handled below (it needs a newer
# release than Debian 12's own suite has).
PACKAGES=(
  clang-19 llvm-19        # compiles bpf/*.c (libbpf-cargo calls clang-19)
  libelf-dev zlib1g-dev   # libbpf-sys builds libbpf from source
  pkg-config make gcc libc6-dev linux-libc-dev
  iproute2 ethtool nftables  # job namespaces, veths, offloads, the kernel baseline
  curl dnsutils python3 procps  # tools the end-to-end tests run inside jobs
  squid                   # the squid baseline of snas-bench (started only by the benchmark)
  fonts-dejavu-core       # the font of snas-bench's PNG charts
  systemd                 # systemd-analyze: the deploy/systemd units' hardening test
  containerd busybox-static  # `snas oci` under containerd (ctr) with a busybox rootfs, no image pulls
  python3-venv            # .venv/ with kubernetes-validate: the deploy/kubernetes manifests' test
)
export DEBIAN_FRONTEND=noninteractive
updated=
apt_update() { [ -n "$updated" ] || { apt-get update -qq; updated=1; }; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # Packages with services (squid) must not start them: the benchmark runs its own squid in a
  # namespace. policy-rc.d is Debian's switch for that; ours is removed right after.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

# --- gVisor (runsc >= RUNSC_MIN) ---------------------------------------------------------

# The release (YYYYMMDD) of the runsc on PATH, or nothing. Debian prints
# `runsc version 0.0~20240729.0`, gVisor's own builds `runsc version release-20240729.0`.
runsc_release() {
  command -v runsc >/dev/null || return 0
  runsc --version 2>/dev/null | head -n 1 | grep -oE '[0-9]{8}' | head -n 1 || true
}

release=$(runsc_release)
if [ -n "$release" ] && [ "$release" -ge "$RUNSC_MIN" ]; then
  log "runsc $release present ($(command -v runsc))"
else
  if [ -n "$release" ]; then
    log "runsc $release is older than $RUNSC_MIN (no systrap platform): upgrading"
  fi
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
  target=()
  if [ "$codename" = bookworm ]; then
    src=$(ensure_backports_source)
    log "runsc from $BACKPORTS ($src)"
    # The new source must be read even when the packages above needed no update.
    updated=
    target=(-t "$BACKPORTS")
  fi
  apt_update
  if ! apt-get install -y -qq --no-install-recommends "${target[@]}" runsc >/dev/null; then
    die "apt-get install ${target[*]} runsc failed (see above). SNAS needs runsc >= $RUNSC_MIN; check \`apt-cache policy runsc\`"
  fi
  release=$(runsc_release)
  if [ -z "$release" ] || [ "$release" -lt "$RUNSC_MIN" ]; then
    candidate=$(apt-cache policy runsc 2>/dev/null | sed -n 's/^ *Candidate: *//p' | head -n 1)
    die "no runsc >= $RUNSC_MIN could be installed: the runsc on PATH ($(command -v runsc || echo none)) is ${release:-missing}, apt's best candidate is ${candidate:-none}. SNAS's sandboxes use gVisor's systrap platform, which needs runsc >= $RUNSC_MIN: on Debian 12 it comes from '$BACKPORTS' (${codename:+this machine is $codename; }see \`apt-cache policy runsc\`), or put gVisor's own release on PATH ahead of it. An old runsc still works with \`snas run --platform ptrace\`, at 6-30x the cost per system call"
  fi
  log "runsc $release installed ($(command -v runsc))"
fi

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# kubernetes-validate (PyPI) for the manifests' test, in a venv inside the repository
# (.venv/, git-ignored); crates/snas/tests/kubernetes_manifests.rs runs .venv/bin/kubernetes-validate.
KV_VERSION=1.37.0
if ! .venv/bin/kubernetes-validate --version 2>/dev/null | grep -q "$KV_VERSION"; then
  log "installing kubernetes-validate $KV_VERSION into .venv/"
  python3 -m venv .venv
  .venv/bin/pip install -q "kubernetes-validate==$KV_VERSION"
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
