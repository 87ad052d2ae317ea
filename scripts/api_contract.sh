#!/usr/bin/env bash
# Checks the daemon's HTTP API against its own OpenAPI document: schemathesis sends generated
# requests (a bounded number per operation) and checks every answer's status, content type and
# body against the document; then a client generated from the document by
# openapi-python-client makes a few typed calls. The daemon runs on a temporary home on
# loopback TCP with a token, with room for no sandbox (creates answer 429 without booting).
#
# Usage: scripts/api_contract.sh [path to hutch] (default: target/release/hutch).
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."

hutch=$(realpath "${1:-target/release/hutch}")
work=$(realpath -m target/api-contract)
scripts=$(realpath scripts)
mkdir -p "$work"
venv=$work/venv
examples=${HUTCH_API_EXAMPLES:-20}

# Python tools in their own virtual environment, pinned.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
if ! [ -x "$venv/bin/schemathesis" ] || ! [ -x "$venv/bin/openapi-python-client" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis==4.32.5' 'openapi-python-client==0.29.1'
fi

home=$(mktemp -d /tmp/hutch-api.XXXXXX)
real=${HUTCH_HOME:-/var/lib/hutch}
ln -s "$real/images" "$home/images"
cp "$real/accel.json" "$home/accel.json" 2>/dev/null || true
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
token=$(HUTCH_HOME=$home "$hutch" token create)
HUTCH_HOME=$home "$hutch" daemon --listen-tcp "127.0.0.1:$port" --max-sandboxes 0 \
    --no-network --net-spares 0 >"$home/daemon.log" 2>&1 &
daemon=$!
cleanup() {
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    rm -rf "$home"
}
trap cleanup EXIT
for _ in $(seq 100); do
    curl -sf -o /dev/null -H "Authorization: Bearer $token" "$base/openapi.json" && break
    sleep 0.1
done

echo "== schemathesis ($examples examples per operation)"
# The WebSocket route is no plain HTTP exchange; the streamed exec suite covers it.
# Run from the work directory: schemathesis keeps its cache there.
(cd "$work" && SCHEMATHESIS_HOOKS=api_contract_hooks PYTHONPATH=$scripts \
    "$venv/bin/schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$examples" --seed 1 --workers 1 --phases examples,coverage,fuzzing \
    --exclude-path /v1/sandboxes/{id}/exec/ws \
    -H "Authorization: Bearer $token" --request-timeout 30 --warnings off)

echo "== generated Python client"
rm -rf "$work/python"
mkdir -p "$work/python"
curl -sf -H "Authorization: Bearer $token" "$base/openapi.json" >"$work/openapi.json"
"$venv/bin/openapi-python-client" generate --path "$work/openapi.json" \
    --output-path "$work/python/hutch_client" --meta none --overwrite >/dev/null
PYTHONPATH=$work/python "$venv/bin/python" "$scripts/api_roundtrip.py" "$base" "$token"
