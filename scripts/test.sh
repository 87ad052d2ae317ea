#!/usr/bin/env bash
# Sets up the host (scripts/setup.sh) and runs every check and test, real VMs included.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

# The VMM backend's own tests boot a busybox initramfs.
if ! [ -x /bin/busybox ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
fi

echo "== rustfmt"
cargo fmt --all --check
echo "== clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== tests (unit, host-process agent, real VMs)"
# A missing VM prerequisite fails the run instead of skipping.
HUTCH_REQUIRE_VM_TESTS=1 cargo test --locked --workspace
echo "== API contract (schemathesis, generated Python client)"
./scripts/api_contract.sh target/release/hutch
