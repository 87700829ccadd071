#!/usr/bin/env bash
# The whole test suite, as the README gives it: host setup, formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/../.."

testsuite/scripts/setup-host.sh

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# A clean checkout gains nothing from incremental caches; they would only take disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

# The build and the rig's kernels and images need room; say so up front rather than let the
# linker die of a full disk half-way.
need_gib=12
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
avail_gib=$(($(df -Pk "$target" | awk 'NR==2 {print $4}') / 1024 / 1024))
if ((avail_gib < need_gib)); then
    echo "specc: the test suite needs about ${need_gib} GiB free beside $target; $avail_gib GiB are free" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
