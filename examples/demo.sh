#!/usr/bin/env bash
# Corral's main job on built-in defaults: build the supervisor, the Wasm worker and the
# example plugin, then run the example's functions one-shot and through a daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
cargo build --release --quiet -p corral -p corral-worker-wasm --bins
cargo build --release --quiet --target wasm32-wasip1 --manifest-path examples/hello-wasm/Cargo.toml
corral=target/release/corral

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say corral run examples/hello-wasm greet --input Ada
$corral run examples/hello-wasm greet --input Ada
say corral run examples/hello-wasm wc --input "one two three" --json
$corral run examples/hello-wasm wc --input "one two three" --json
say corral run examples/hello-wasm greet --input ""   "# a plugin error: exit code 3"
$corral run examples/hello-wasm greet --input "" || echo "(exit code $?)"

run=$(mktemp -d)
trap 'kill "$daemon" 2>/dev/null || true; rm -rf "$run"' EXIT
socket="$run/control.sock"
say corral serve --config examples/corral.toml --socket "$socket" "&"
$corral serve --config examples/corral.toml --socket "$socket" &
daemon=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
say corral call hello-wasm reverse --input stressed
$corral call hello-wasm reverse --input stressed --socket "$socket"
say corral call hello-wasm now
$corral call hello-wasm now --socket "$socket"
say corral list
$corral list --socket "$socket"
say corral stop
$corral stop --socket "$socket"
wait "$daemon"
