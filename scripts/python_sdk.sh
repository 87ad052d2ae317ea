#!/usr/bin/env bash
# Installs the Python SDK (sdk/python) with pytest and mypy into its own virtual environment and runs its
# suite against a real daemon with real VMs (the suite starts `hutch daemon` on a private home).
#
# Usage: scripts/python_sdk.sh [path to hutch] (default: target/debug/hutch); pytest arguments
# may follow it.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."

hutch=$(realpath "${1:-target/debug/hutch}")
shift || true
venv=target/tools/python-sdk

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
if ! [ -x "$venv/bin/pytest" ] || ! [ -x "$venv/bin/mypy" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'pytest==8.4.2' 'mypy==1.18.2'
fi
# The SDK as a user installs it (its dependencies when missing), rebuilt from the tree each run.
"$venv/bin/pip" install -q ./sdk/python
"$venv/bin/pip" install -q --force-reinstall --no-deps ./sdk/python
rm -rf sdk/python/build sdk/python/src/*.egg-info

(cd sdk/python && HUTCH_BIN=$hutch "$OLDPWD/$venv/bin/python" -m pytest -p no:cacheprovider -q "$@")
