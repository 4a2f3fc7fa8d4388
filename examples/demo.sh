#!/usr/bin/env bash
# Corral's main job on built-in defaults: build the supervisor, the workers and the
# example plugins (Wasm, JavaScript, Python, native), then run the examples' functions one-shot
# and through a daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
cargo build --release --quiet -p corral -p corral-client -p corral-worker-wasm -p corral-worker-js \
    -p corral-worker-python -p corral-worker-native --bins
# The examples are their own workspaces with their own target directories.
env -u CARGO_TARGET_DIR cargo build --release --quiet --target wasm32-wasip1 \
    --manifest-path examples/hello-wasm/Cargo.toml
env -u CARGO_TARGET_DIR cargo build --release --quiet \
    --manifest-path examples/hello-native/Cargo.toml
corral=${CARGO_TARGET_DIR:-target}/release/corral

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# Workers run as an unprivileged user (policy: user = "nobody") when Corral runs as
# root, so plugin directories must be readable by that user. A checkout may sit below
# a private directory (/root is 0700): install the example where it can be read, as
# an operator would under /srv.
run=$(mktemp -d)
trap 'kill ${daemon:-} ${server:-} 2>/dev/null || true; rm -rf "$run"' EXIT
chmod 755 "$run"
plugin=$run/hello-wasm
entry=target/wasm32-wasip1/release/hello_wasm.wasm
mkdir -p "$plugin/$(dirname "$entry")"
cp examples/hello-wasm/plugin.toml "$plugin/"
cp "examples/hello-wasm/$entry" "$plugin/$entry"
native=$run/hello-native
native_entry=target/release/libhello_native.so
mkdir -p "$native/$(dirname "$native_entry")"
cp examples/hello-native/plugin.toml "$native/"
cp "examples/hello-native/$native_entry" "$native/$native_entry"
cp -r examples/hello-js examples/hello-python "$run/"
rm -rf "$run"/hello-python/__pycache__
chmod -R a+rX "$run"
js=$run/hello-js
py=$run/hello-python
# The daemon's configuration: examples/corral.toml with the installed plugins.
sed -e "s|^plugins = .*|plugins = [\"$plugin\", \"$js\", \"$py\", \"$native\"]|" \
    -e "s|^policy = .*|policy = \"$PWD/policies\"|" \
    examples/corral.toml >"$run/corral.toml"
# Keep the plugins' stores and the audit log with the demo.
sed -i "1i state_dir = \"$run/state\"\naudit = \"$run/audit.jsonl\"" "$run/corral.toml"
# Prometheus metrics on a port of the system's choosing (the daemon says which).
sed -i "1i metrics = \"127.0.0.1:0\"" "$run/corral.toml"

say corral run "$plugin" greet --input Ada
$corral run "$plugin" greet --input Ada
say corral run "$plugin" wc --input "one two three" --json
$corral run "$plugin" wc --input "one two three" --json
say corral run "$js" greet --input Ada   "# the same job in JavaScript..."
$corral run "$js" greet --input Ada
say corral run "$py" greet --input Ada   "# ...in Python"
$corral run "$py" greet --input Ada
say corral run "$native" greet --input Ada   "# ...and as machine code, confined by the OS alone"
$corral run "$native" greet --input Ada
say corral run "$js" render --input "# Corral *renders* markdown"   "# marked, vendored from npm"
$corral run "$js" render --input "# Corral *renders* markdown"
say corral run "$py" top --input "the cat and the dog and the bird"   "# the Python standard library"
$corral run "$py" top --input "the cat and the dog and the bird"
say corral run "$plugin" greet --input ""   "# a plugin error: exit code 3"
$corral run "$plugin" greet --input "" || echo "(exit code $?)"
say corral policy explain "$plugin"   "# which policy file and line set each limit"
$corral policy explain "$plugin" --policy policies

socket="$run/ctl/control.sock"   # its own private directory
say corral serve --config "$run/corral.toml" --socket "$socket" "&"
$corral serve --config "$run/corral.toml" --socket "$socket" 2> >(tee "$run/daemon.log" >&2) &
daemon=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
say corral call hello-wasm reverse --input stressed
$corral call hello-wasm reverse --input stressed --socket "$socket"
say corral call hello-wasm now
$corral call hello-wasm now --socket "$socket"
say corral call hello-python reverse --input stressed
$corral call hello-python reverse --input stressed --socket "$socket"
say corral call hello-js wc --input "one two three"
$corral call hello-js wc --input "one two three" --socket "$socket"
say corral call hello-wasm visit --input Ada   "# the plugin's own store, kept by the supervisor"
$corral call hello-wasm visit --input Ada --socket "$socket"
say corral call hello-wasm visit --input Ada
$corral call hello-wasm visit --input Ada --socket "$socket"
# A web server on this machine for the brokered fetch (the grant allows 127.0.0.1).
python3 -c 'import http.server, functools, sys
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1]))
open(sys.argv[2], "w").write(str(s.server_port)); s.serve_forever()' "$run/hello-js" "$run/port" 2>/dev/null &
server=$!
for _ in $(seq 100); do [ -s "$run/port" ] && break; sleep 0.05; done
url="http://127.0.0.1:$(cat "$run/port")/main.js"
say corral call hello-js fetch --input "$url"   "# the supervisor fetches for the plugin"
$corral call hello-js fetch --input "$url" --socket "$socket"
say corral call hello-python fetch --input http://example.com/   "# outside the grant: denied"
$corral call hello-python fetch --input http://example.com/ --socket "$socket" || echo "(exit code $?)"
say corral call hello-python announce --input "tea at five"   "# a topic all four subscribe to"
$corral call hello-python announce --input "tea at five" --socket "$socket"
for _ in $(seq 100); do
    [ "$($corral call hello-wasm news --socket "$socket")" = "tea at five" ] && break
    sleep 0.05
done
say corral call hello-wasm news
$corral call hello-wasm news --socket "$socket"
say cat audit.jsonl   "# every denial, one JSON line"
cat "$run/audit.jsonl"
say sed -i s/Hello/Howdy/ hello-js/main.js   "# edit a live plugin: hot reload, no call lost"
sed -i 's/`Hello, /`Howdy, /' "$js/main.js"
for _ in $(seq 200); do
    [ "$($corral call hello-js greet --input Ada --socket "$socket")" = "Howdy, Ada!" ] && break
    sleep 0.05
done
say corral call hello-js greet --input Ada   "# the new version, in a fresh worker"
$corral call hello-js greet --input Ada --socket "$socket"
say corral list
$corral list --socket "$socket"
say corral status   "# what each worker really enforces, and uses"
$corral status --socket "$socket"
metrics=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$run/daemon.log")
say curl "http://$metrics/metrics" "| grep corral_calls_total" "# Prometheus metrics"
python3 -c 'import sys, urllib.request
for l in urllib.request.urlopen("http://%s/metrics" % sys.argv[1]).read().decode().splitlines():
    if l.startswith(("corral_calls_total", "corral_plugin_workers{", "corral_process_resident")): print(l)' "$metrics"
say corral stop
$corral stop --socket "$socket"
wait "$daemon"
