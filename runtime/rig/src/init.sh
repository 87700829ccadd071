#!/bin/busybox sh
# PID 1 of the rig. Mounts the host tree (read-only 9p) and the writable shares, moves it onto
# / and runs the job script with the host tree as its root, its stdout/stderr on virtio-serial
# ports, and reports the exit code on the control port. The host kills QEMU once it has read
# the exit line.
#
# Kernel command line: specc.run=<host dir holding job.sh and mounts>
# Ports (virtio-serial, fixed order): vport0p1 stdout, vport0p2 stderr, vport0p3 control.

mount -t devtmpfs dev /dev
mount -t proc proc /proc
ctl=/dev/vport0p3

fail() {
    echo "rig-init: $*" >&2
    echo "fail $*" >"$ctl"
    sync
    reboot -f
}

run=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        specc.run=*) run="${arg#specc.run=}" ;;
    esac
done
[ -n "$run" ] || fail "no specc.run= on the kernel command line"

o9p="trans=virtio,version=9p2000.L,msize=1048576"
mount -t 9p -o "$o9p,ro,cache=loose" root /host || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "cannot mount /tmp"
mount -t tmpfs -o mode=755 tmpfs /host/run || fail "cannot mount /run"
mount -t devtmpfs dev /host/dev || fail "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t proc proc /host/proc || fail "cannot mount /proc"
mount -t sysfs sys /host/sys || fail "cannot mount /sys"

# One line per writable share, parents before children: "<9p tag> <path>".
[ -r "/host$run/mounts" ] || fail "cannot read /host$run/mounts"
while read -r tag path; do
    [ -d "/host$path" ] || mkdir -p "/host$path"
    mount -t 9p -o "$o9p,cache=mmap" "$tag" "/host$path" || fail "cannot mount $tag on $path"
done <"/host$run/mounts"

# The job must see the host tree as the root of the mount namespace, not merely as its
# chroot: the kernel refuses a new user namespace to a process whose root is not the top of
# the namespace root's mount stack, and passt (and rootless tools) sandbox themselves in one.
# So move the tree onto / as switch_root does. This shell keeps the initramfs as its own root
# (lookups start below the moved mount), so its busybox, /dev and /proc stay usable for the
# exit report; the job is chrooted into the moved mount through the working directory. PID 1
# must never exec or exit: the kernel panics when init dies.
cd /host || fail "cannot enter the host tree"
mount -o move /host / || fail "cannot move the host tree onto /"

read -r up _ </proc/uptime
echo "start $up" >"$ctl"
chroot . /bin/sh "$run/job.sh" </dev/null >/dev/vport0p1 2>/dev/vport0p2
rc=$?
# Dirty mmap pages of the writable shares reach the host only on writeback.
sync
echo "exit $rc" >"$ctl"
# The host kills QEMU on the exit line; this only runs if it does not (with -no-reboot a
# reboot makes QEMU exit).
sleep 5
reboot -f
