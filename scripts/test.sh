#!/usr/bin/env bash
# Runs the whole SNAS test suite: unit, property, BPF test-run and privileged end-to-end tests.
# Installs what it needs first (scripts/setup.sh), so it works on a fresh machine. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAS_SETUP_SKIP_BUILD=1 scripts/setup.sh
cargo build --release --locked -p snas
# Tests that drive the binary (testbed, end to end, sandbox) run this one.
export SNAS_BIN="$PWD/target/release/snas"
cargo nextest run --workspace --locked --release --no-fail-fast "$@"
