#!/usr/bin/env bash
# Builds the Worker (Rust → wasm) with the pinned tools in .tools/, twice:
#   worker/build/           the default bundle: keys and the ledger in D1
#   worker/build-postgres/  with the `postgres` feature, for DB_PROVIDER=neon (tokio-postgres over Hyperdrive)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -f .tools/debian-rust/enabled ]; then
  # Debian's rustc-web has no prebuilt wasm32 std: build it from source (see scripts/setup.sh).
  export PATH="$ROOT/.tools/debian-rust:$PATH" RUSTC_BOOTSTRAP=1 CARGO_UNSTABLE_BUILD_STD=std,panic_abort \
         CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19
fi
export PATH="$ROOT/.tools/bin:$PATH"
export WASM_BINDGEN_BIN="$ROOT/.tools/bin/wasm-bindgen"
export ESBUILD_BIN="$ROOT/node_modules/.bin/esbuild"
worker-build --release worker >&2
worker-build --release --out-dir build-postgres worker -- --features postgres >&2
