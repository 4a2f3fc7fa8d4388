#!/bin/sh
# The container's entrypoint: `corral <args>` (default: serve the mounted
# configuration), after making the pod's own cgroup writable when the Deployment
# asks for it.
#
# Levels high and maximum need a cgroup per worker. Kubernetes mounts a container's
# /sys/fs/cgroup read-only unless the container is privileged; on a cgroup v2 node
# the mount is the container's own cgroup namespace (its root is the container's
# group, nothing above it is visible), so with CAP_SYS_ADMIN it can be made
# writable for this container alone: a bind remount of this mount namespace's
# mount, which changes nothing on the node and no other container. Corral then
# moves itself into a leaf and creates its workers' groups below, within the
# pod's limits (ARCHITECTURE.md, "cgroups").
set -eu
if [ "${CORRAL_DELEGATE_CGROUP:-0}" = 1 ]; then
    # Only inside a cgroup namespace whose root is this container's group (v2:
    # "0::/"), never on a host's hierarchy.
    if [ "$(cat /proc/self/cgroup)" != "0::/" ]; then
        echo "corral entrypoint: CORRAL_DELEGATE_CGROUP=1 needs cgroup v2 and a cgroup namespace (got: $(cat /proc/self/cgroup | tr '\n' ' '))" >&2
        exit 78
    fi
    if [ ! -w /sys/fs/cgroup/cgroup.subtree_control ]; then
        mount -o remount,bind,rw /sys/fs/cgroup /sys/fs/cgroup || {
            echo "corral entrypoint: cannot make /sys/fs/cgroup writable (needs CAP_SYS_ADMIN and no AppArmor/SELinux rule against mount; docs/fleet.md)" >&2
            exit 78
        }
    fi
fi
# corral sits beside this script (/usr/libexec/corral in the image).
exec "$(dirname "$0")/corral" "$@"
