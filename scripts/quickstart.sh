#!/usr/bin/env bash
# The first command a new user runs (as root, on a fresh Debian 12 machine): installs and builds
# everything (scripts/setup.sh), brings up the local testbed (two nodes with their agents and
# tier-1 eBPF, two egress proxies, and a test "internet" with DNS, HTTP(S) and echo servers, all in
# network namespaces), signs a per-job policy, and runs the main job: a Python workload in a
# gVisor sandbox (systrap platform) that tries both what its policy allows and what it forbids.
# `snas run` then prints what both tiers decided. The testbed stays up for you to explore; remove
# it with `target/release/snas testbed down`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
snas=target/release/snas
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }

step "bring up the local testbed (idempotent)" "snas testbed up"
$snas testbed up | tail -n 3

key=/run/snas-testbed/snastb/keys/testbed-snastb.key
ca=/run/snas-testbed/snastb/tls/ca.pem
if [ ! -r "$key" ]; then
  echo "quickstart: the testbed has no generated signing key at $key (was it brought up with --trust?)" >&2
  echo "quickstart: run '$snas testbed down' and this script again" >&2
  exit 1
fi
work=$(mktemp -d -t snas-quickstart.XXXXXX)
trap 'rm -rf "$work"' EXIT

step "check and sign the job's policy (the control plane's job)" \
  "snas policy sign --key $key examples/demo-policy.toml > job.jwt"
$snas policy check examples/demo-policy.toml
$snas policy sign --key "$key" examples/demo-policy.toml > "$work/job.jwt"
$snas policy explain --trust /run/snas-testbed/snastb/trust "$work/job.jwt" \
  api.example.com:80 api.example.com:443 api.example.com:7/udp blocked.example.com:80 169.254.169.254:80 || true

step "run the workload in a gVisor sandbox (systrap platform) under that policy" \
  "snas run --policy @job.jwt --app examples -- python3 /app/sandbox_demo.py \"\$(cat $ca)\""
# systrap is `snas run`'s default platform; it needs runsc >= 20240729, which setup.sh installed.
# The argument is the testbed's CA certificate, so that the HTTPS check verifies the server.
$snas run --policy "@$work/job.jwt" --app examples -- python3 /app/sandbox_demo.py "$(cat "$ca")"

printf '\nSNAS quickstart finished: every check above passed. The testbed is still up:\n'
printf '  %s testbed status    # what runs where\n' "$snas"
printf '  %s testbed down      # remove it\n' "$snas"
