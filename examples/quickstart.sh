#!/usr/bin/env bash
# The main job on a fresh machine: install what specc needs, build it, build the snapshot
# layers of examples/hello-busybox.kdl (`specc build`), then start a VM from the head layer's
# snapshot (restored, not booted) and run a command in it.
# On a host without hardware KVM the VMM runs inside the rig, which says so in one line.
set -euo pipefail
cd "$(dirname "$0")/.."

testsuite/scripts/setup-host.sh
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
cargo build --release -q -p specc -p specc-vmm

target/release/specc check examples/hello-busybox.kdl
target/release/specc plan examples/hello-busybox.kdl
target/release/specc build examples/hello-busybox.kdl
exec target/release/specc run --timings examples/hello-busybox.kdl -- \
    /bin/sh -c 'cat /etc/motd; greet "$(uname -sr)"; cat /srv/status'
