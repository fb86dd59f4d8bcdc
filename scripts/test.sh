#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), lint, build, then every test
# against the real Docker engine with real mTLS.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-deploy.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
cargo nextest run --workspace --no-fail-fast --failure-output final --status-level fail --final-status-level slow
