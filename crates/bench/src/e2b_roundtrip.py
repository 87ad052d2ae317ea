"""`hutch-bench e2b`'s measuring half: run by the benchmark with the Python that has E2B's
SDK, against the benchmark's daemon, on a sandbox it created.

    python e2b_roundtrip.py SANDBOX_ID RUNS

E2B's SDK reads E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY; the native API is at
HUTCH_HOST (a bare http://ADDR) with the bearer token HUTCH_TOKEN. Prints one JSON object:
each way's round-trip times in seconds, the ways interleaved, each after one untimed call.
"""

import http.client
import json
import os
import sys
import time

from e2b import Sandbox


def native(argv):
    """One bare `POST /v1/sandboxes/{id}/exec` on a kept-alive connection."""
    conn = http.client.HTTPConnection(os.environ["HUTCH_HOST"].split("://", 1)[1])
    body = json.dumps({"argv": argv})
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {os.environ['HUTCH_TOKEN']}",
    }

    def once():
        conn.request("POST", f"/v1/sandboxes/{sandbox_id}/exec", body, headers)
        resp = conn.getresponse()
        answer = resp.read()
        assert resp.status == 200 and json.loads(answer)["exit_code"] == 0, answer

    return once


def e2b_run(sandbox):
    """`commands.run("true")`: E2B starts it as `/bin/bash -l -c true` and streams it."""

    def once():
        assert sandbox.commands.run("true").exit_code == 0

    return once


sandbox_id, runs = sys.argv[1], int(sys.argv[2])
ways = {
    "native": native(["true"]),
    # The same guest command as E2B's, so the difference is the surface's alone.
    "native_bash": native(["/bin/bash", "-l", "-c", "true"]),
    "e2b": e2b_run(Sandbox.connect(sandbox_id)),
}
samples = {name: [] for name in ways}
for once in ways.values():
    once()
for _ in range(runs):
    for name, once in ways.items():
        started = time.perf_counter()
        once()
        samples[name].append(time.perf_counter() - started)
print(json.dumps(samples))
