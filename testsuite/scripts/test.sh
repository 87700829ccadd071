#!/usr/bin/env bash
# The whole test suite, as the README gives it: host setup, formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/../.."

testsuite/scripts/setup-host.sh

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
