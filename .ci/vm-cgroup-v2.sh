#!/usr/bin/env bash
# Real cgroup v2 enforcement, checked inside a throwaway VM.
#
# The development and CI hosts are hybrid (memory, cpu and pids are cgroup v1
# controllers), so the e2e suite proves the v1 path. This boots a Debian 6.1 kernel
# under QEMU (TCG) with cgroup v1 disabled, an initramfs of busybox plus the built
# binaries, and runs `corral-vm-check` there: cgroup2 at /sys/fs/cgroup with
# +cpu +memory +pids enabled at the root.
#
# Usage: .ci/vm-cgroup-v2.sh [BIN_DIR]   (default: target/debug)
#   BIN_DIR holds corral-vm-check, corral-worker-wasm and corral-worker-hostile
#   (`cargo build --workspace --bins` builds them).
# Needs root (apt-get install, device nodes in the initramfs). The kernel image is
# cached in target/vm/. Prints the checks' output and exits with their status.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022

target=${CARGO_TARGET_DIR:-target}
bin_dir=${1:-$target/debug}
vm_dir=$target/vm
binaries=(corral-vm-check corral-worker-wasm corral-worker-hostile)
boot_timeout=${CORRAL_VM_TIMEOUT:-600}

say() { echo "== vm-cgroup-v2: $*" >&2; }
die() {
    echo "vm-cgroup-v2: $*" >&2
    exit 1
}

for b in "${binaries[@]}"; do
    [[ -x $bin_dir/$b ]] || die "$bin_dir/$b is missing (cargo build --workspace --bins)"
done
bin_dir=$(realpath "$bin_dir")
mkdir -p "$vm_dir"
vm_dir=$(realpath "$vm_dir")

# --- host tools -------------------------------------------------------------------
apt_updated=
apt_update() {
    if [[ -z $apt_updated ]]; then
        apt-get update -qq
        apt_updated=1
    fi
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
installed busybox-static || need+=(busybox-static)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "needs root to install ${need[*]}"
    say "installing ${need[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox missing after installing busybox-static"

work=$(mktemp -d "${TMPDIR:-/tmp}/corral-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel -------------------------------------------------------------------------
# Debian's cloud kernel: memcg, pids, CFS bandwidth and the 8250 serial console are
# built in, so no modules are needed.
kernel=$(find "$vm_dir" -maxdepth 1 -name 'vmlinuz-6.1.0-*-cloud-amd64' | sort -V | tail -n 1)
if [[ -z $kernel ]]; then
    apt_update
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
        awk '{print $1}' | sort -V | tail -n 1)
    [[ -n $pkg ]] || die "no linux-image-6.1.0-*-cloud-amd64-unsigned package in the apt lists"
    say "downloading $pkg"
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2)
    mkdir "$work/kernel"
    dpkg-deb --fsys-tarfile "$work"/"$pkg"_*.deb | tar -x -C "$work/kernel" ./boot/
    found=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n 1)
    [[ -n $found ]] || die "$pkg has no /boot/vmlinuz-*"
    kernel=$vm_dir/$(basename "$found")
    mv "$found" "$kernel"
    rm -rf "$work/kernel" "$work"/*.deb
fi
say "kernel $(basename "$kernel")"

# --- initramfs ----------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,opt/corral/bin}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in sh mount mkdir cat ls sleep sync poweroff; do
    ln -s busybox "$root/bin/$applet"
done
# The kernel opens /dev/console for init before devtmpfs is mounted.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

# Debug info is of no use in the VM and is four fifths of the debug Wasm worker.
for b in "${binaries[@]}"; do
    if command -v objcopy >/dev/null; then
        objcopy --strip-debug "$bin_dir/$b" "$root/opt/corral/bin/$b"
    else
        cp "$bin_dir/$b" "$root/opt/corral/bin/$b"
    fi
done
# Their shared libraries and the dynamic loader, each at the path ldd resolves.
for b in "${binaries[@]}"; do
    { ldd "$bin_dir/$b" || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

# Workers drop to nobody:nogroup when the supervisor is root.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
printf 'passwd: files\ngroup: files\n' >"$root/etc/nsswitch.conf"

# ttyS1 carries the checks' stdout, ttyS2 their exit status; ttyS0 is the console
# (progress and the kernel's messages). Closing a tty waits until it has drained.
cat >"$root/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control
echo "init: cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
# As systemd's Delegate=yes would: the checks start inside a group of their own
# (corral.service) that holds their process, so the supervisor must move itself into
# a leaf before it can offer controllers to its workers' groups.
mkdir /sys/fs/cgroup/corral.service
cd /tmp
rc=0
sh -c 'echo $$ >/sys/fs/cgroup/corral.service/cgroup.procs &&
    exec /opt/corral/bin/corral-vm-check /opt/corral/bin' >/dev/ttyS1 || rc=$?
echo "$rc" >/dev/ttyS2
sync
poweroff -f
EOF
chmod 755 "$root/init"

say "packing the initramfs"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 | gzip -1) \
    >"$work/initrd.gz"
say "initramfs $(du -h "$work/initrd.gz" | cut -f1)"

# --- boot ---------------------------------------------------------------------------
: >"$work/out"
: >"$work/rc"
say "booting (TCG; timeout ${boot_timeout}s)"
start=$SECONDS
qemu_status=0
timeout "$boot_timeout" qemu-system-x86_64 \
    -machine q35 -accel tcg -m 1024 -smp 2 \
    -nographic -no-reboot -monitor none -nic none \
    -kernel "$kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 panic=-1 cgroup_no_v1=all quiet" \
    -serial stdio -serial "file:$work/out" -serial "file:$work/rc" \
    </dev/null | sed -u 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g; s/\r//g' >&2 || qemu_status=$?
say "VM finished in $((SECONDS - start)) s"

tr -d '\r' <"$work/out"
rc=$(tr -dc '0-9' <"$work/rc")
if [[ -z $rc ]]; then
    ((qemu_status == 124)) && echo "vm-cgroup-v2: the VM timed out after ${boot_timeout}s" >&2
    die "the VM reported no exit status (qemu status $qemu_status)"
fi
exit "$rc"
