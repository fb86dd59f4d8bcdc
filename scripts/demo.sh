#!/usr/bin/env bash
# The end-to-end demo: control plane, one agent, and a real Terraform
# init/plan/apply in a sandboxed container, its log streamed here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --bins --quiet
state="${OUTPOST_STATE_DIR:-$PWD/.cache/demo-state}"
exec ./target/debug/outpost dev --demo --state-dir "$state" "$@"
