#!/usr/bin/env bash
# The first command a new user runs: installs and builds everything (scripts/setup.sh), then runs
# the main SNAS job end to end and shows what happened.
#
# Today the main job is the policy life cycle: generate a signing key, check and sign a per-job
# policy, verify it as an enforcement point would, and ask the compiled policy about destinations.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
snas=target/release/snas
work=$(mktemp -d -t snas-quickstart.XXXXXX)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; }

step "generate a signing key pair" "snas policy keygen --out $work/keys --key-id demo"
$snas policy keygen --out "$work/keys" --key-id demo

step "check the example policy" "snas policy check examples/policy.toml"
$snas policy check examples/policy.toml

step "sign it (the control plane's job)" "snas policy sign --key $work/keys/demo.key examples/policy.toml > job.jws"
$snas policy sign --key "$work/keys/demo.key" examples/policy.toml > "$work/job.jws"
printf '%.96s…\n' "$(cat "$work/job.jws")"

step "verify it (what every enforcement point does)" "snas policy verify --trust $work/keys job.jws"
$snas policy verify --trust "$work/keys" "$work/job.jws"

step "ask the compiled policy about destinations" \
  "snas policy explain --trust $work/keys job.jws api.example.com:443 x.cdn.example.com:443 api.example.com:22 db.internal:5432 203.0.113.9:5432 169.254.169.254:80 10.0.0.1:443"
set +e
$snas policy explain --trust "$work/keys" "$work/job.jws" \
  api.example.com:443 x.cdn.example.com:443 api.example.com:22 db.internal:5432 \
  203.0.113.9:5432 169.254.169.254:80 10.0.0.1:443
rc=$?
set -e
echo "(exit $rc: 1 means at least one destination is denied, as expected here)"

step "a tampered token is rejected" "snas policy verify --trust $work/keys tampered.jws"
sed 's/\.\(.\)/.X\1/2' "$work/job.jws" > "$work/tampered.jws"
if $snas policy verify --trust "$work/keys" "$work/tampered.jws"; then
  echo "unexpected: tampered token verified" >&2; exit 1
fi
printf '\nSNAS quickstart finished.\n'
