#!/usr/bin/env bash
# Everything `npm test` runs, after scripts/setup.sh has built the Worker:
#   1. native unit tests of the pure Rust modules (validation, SSE, limiter maths, ...)
#   2. the stand-ins' own protocol tests
#   3. integration tests: the real Worker in workerd, driven over HTTP (tests/)
set -euo pipefail
cd "$(dirname "$0")/.."
export WRANGLER_SEND_METRICS=false NO_COLOR=1

echo "[test] unit tests" >&2
cargo test --quiet -p gateway -p key-limiter
cargo test --quiet -p gateway --features postgres  # the Postgres store's own tests and config

echo "[test] stand-in protocol tests" >&2
node --test standins/

echo "[test] integration tests (workerd via Miniflare, see scripts/serve.mjs)" >&2
# One test binary at a time (cargo's default); tests inside a binary share one gateway and run in parallel.
cargo test --quiet --no-fail-fast -p gateway-tests -- --test-threads 8
