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
# The store tests fail, never skip, without PostgreSQL. Their shared cluster
# is a fresh one for this run, stopped and deleted at its end.
export OUTPOST_REQUIRE_PG=1
pg_cluster="${CARGO_TARGET_DIR:-target}/debug/outpost-test-pg"
"$pg_cluster" stop
trap '"$pg_cluster" stop || true' EXIT
cargo nextest run --workspace --no-fail-fast --failure-output final --status-level fail --final-status-level slow
