#!/bin/sh
# Lay out Corral's files under a root directory, as the container image has them:
#   install.sh <release dir> <root>
# <release dir> holds the built corral, corral-supervisor and corral-worker-* binaries (cargo build
# --release); the examples must have been built (examples/demo.sh's steps). The
# test suite runs it into a temporary root and serves from there.
set -eu
bin=$1
root=$2
src=$(cd "$(dirname "$0")/../.." && pwd)
lib=$root/usr/libexec/corral
share=$root/usr/share/corral
mkdir -p "$lib" "$share/plugins" "$share/policies" "$root/usr/local/bin" "$root/etc/corral/config"
for b in corral corral-supervisor corral-worker-wasm corral-worker-js corral-worker-python corral-worker-native; do
    install -m 0755 "$bin/$b" "$lib/$b"
done
install -m 0755 "$src/dist/container/entrypoint.sh" "$lib/entrypoint.sh"
ln -sf /usr/libexec/corral/corral "$root/usr/local/bin/corral"
install -m 0644 "$src"/policies/*.toml "$share/policies/"
# The examples, readable by the workers' user.
for p in hello-js hello-python; do
    mkdir -p "$share/plugins/$p"
    cp -R "$src/examples/$p/." "$share/plugins/$p/"
    rm -rf "$share/plugins/$p/tests" "$share/plugins/$p/__pycache__"
done
wasm=target/wasm32-wasip1/release/hello_wasm.wasm
mkdir -p "$share/plugins/hello-wasm/$(dirname $wasm)"
install -m 0644 "$src/examples/hello-wasm/plugin.toml" "$share/plugins/hello-wasm/"
install -m 0644 "$src/examples/hello-wasm/$wasm" "$share/plugins/hello-wasm/$wasm"
so=target/release/libhello_native.so
mkdir -p "$share/plugins/hello-native/$(dirname $so)"
install -m 0644 "$src/examples/hello-native/plugin.toml" "$share/plugins/hello-native/"
install -m 0755 "$src/examples/hello-native/$so" "$share/plugins/hello-native/$so"
chmod -R a+rX "$share"
# The built-in configuration (`docker run` without a mounted one): the examples,
# the shipped policy, the store in the container. Kubernetes mounts its ConfigMap
# over this directory.
cat > "$root/etc/corral/config/corral.toml" <<'TOML'
plugins_dir = "/usr/share/corral/plugins"
watch = false
policy = "/usr/share/corral/policies"
socket = "/run/corral/control.sock"
worker_dir = "/usr/libexec/corral"
cache_dir = "/var/cache/corral"
state_dir = "/var/lib/corral"
audit = "stderr"
log_format = "json"
TOML
