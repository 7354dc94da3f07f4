#!/usr/bin/env bash
# Brings a fresh machine to the point where the gateway builds and runs, idempotently and quickly when done:
#   1. the wasm32 target (rustup; Debian's rustc-web packages as a fallback when rustup cannot fetch it)
#   2. worker-build and the wasm-bindgen CLI, pinned, installed into .tools/ (never downloaded from GitHub)
#   3. npm packages from the lockfile (wrangler, miniflare, esbuild)
#   4. PostgreSQL's server and psql (Debian's postgresql package), for the Postgres store's tests and
#      `npm run dev -- --db neon`
#   5. the official OpenAI Python SDK, pinned (tests/sdk/requirements.txt), in a venv at .tools/python, for the
#      tests that read the gateway with both official SDKs
#   6. the Worker build (scripts/build.sh): the D1 bundle and the Postgres one
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORKER_BUILD_VERSION=0.8.7
# Must equal the `wasm-bindgen` pinned in Cargo.toml: library and CLI must match exactly.
WASM_BINDGEN_VERSION=$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$WASM_BINDGEN_VERSION" ] || { echo "setup: cannot read the pinned wasm-bindgen version from Cargo.toml" >&2; exit 1; }

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

ensure_wasm_target() {
  if rustc --print sysroot >/dev/null 2>&1 && [ -d "$(rustc --print sysroot)/lib/rustlib/wasm32-unknown-unknown" ]; then
    return
  fi
  say "adding the wasm32-unknown-unknown target"
  if rustup target add wasm32-unknown-unknown; then
    return
  fi
  say "rustup could not fetch the target; falling back to Debian's rustc-web (std is rebuilt for wasm32)"
  apt-get update && apt-get install -y rustc-web cargo-web rust-web-src lld-19
  mkdir -p /usr/lib/rustlib/wasm32-unknown-unknown/lib
  mkdir -p "$ROOT/.tools/debian-rust"
  for tool in cargo rustc; do
    printf '#!/bin/sh\nexec /usr/bin/%s "$@"\n' "$tool" > "$ROOT/.tools/debian-rust/$tool"
    chmod +x "$ROOT/.tools/debian-rust/$tool"
  done
  touch "$ROOT/.tools/debian-rust/enabled"
}

ensure_cargo_tool() { # crate version binary [extra cargo args...]
  local crate=$1 version=$2 binary=$3
  shift 3
  if [ -x ".tools/bin/$binary" ] && [ "$(".tools/bin/$binary" --version 2>/dev/null | awk '{print $NF}')" = "$version" ]; then
    return
  fi
  say "installing $crate $version into .tools/ (a few minutes, once)"
  cargo install "$crate" --version "$version" --root .tools --locked "$@" \
    || cargo install "$crate" --version "$version" --root .tools "$@"
}

ensure_npm_packages() {
  local stamp=node_modules/.package-lock.sha
  local want
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  say "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund
  echo "$want" > "$stamp"
}

ensure_postgres() {
  if node scripts/postgres.mjs which >/dev/null 2>&1; then
    return
  fi
  say "installing PostgreSQL (Debian's postgresql package) for the Postgres store"
  apt-get update && apt-get install -y --no-install-recommends postgresql
}

ensure_python_sdk() {
  local stamp=.tools/python/.requirements.sha
  local want
  want=$(sha256sum tests/sdk/requirements.txt | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  say "installing the OpenAI Python SDK into .tools/python (tests/sdk/requirements.txt)"
  rm -rf .tools/python
  python3 -m venv .tools/python
  .tools/python/bin/pip install --quiet --disable-pip-version-check --no-deps -r tests/sdk/requirements.txt
  echo "$want" > "$stamp"
}

ensure_wasm_target
ensure_cargo_tool worker-build "$WORKER_BUILD_VERSION" worker-build
ensure_cargo_tool wasm-bindgen-cli "$WASM_BINDGEN_VERSION" wasm-bindgen
ensure_npm_packages
ensure_postgres
ensure_python_sdk
bash scripts/build.sh
