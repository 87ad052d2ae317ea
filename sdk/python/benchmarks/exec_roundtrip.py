"""Benchmark (not a test): the round trip of `exec true` through the SDK vs a bare HTTP/1.1
request on a kept-alive connection to the same daemon (the native API's cost), on one sandbox.

    python benchmarks/exec_roundtrip.py [--runs N]     # the daemon of $HUTCH_HOME (or HUTCH_HOST)

Prints p50/p95 in milliseconds for each, and the SDK's p50 over the native p50 (target: 1.3x).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import statistics
import time
from collections.abc import Callable

import hutch


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client` over a Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("hutch")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def native(endpoint: hutch.Endpoint, sandbox_id: str) -> Callable[[], None]:
    """One bare `POST /v1/sandboxes/{id}/exec` on a kept-alive connection."""
    if endpoint.socket:
        conn: http.client.HTTPConnection = UnixHTTPConnection(endpoint.socket)
    else:
        conn = http.client.HTTPConnection(endpoint.base_url.split("://", 1)[1])
    body = json.dumps({"argv": ["true"]})
    headers = {"content-type": "application/json", **endpoint.headers()}

    def once() -> None:
        conn.request("POST", f"/v1/sandboxes/{sandbox_id}/exec", body, headers)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["exit_code"] == 0

    return once


def measure(fn: Callable[[], None], runs: int) -> list[float]:
    for _ in range(min(20, runs)):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def report(name: str, ms: list[float]) -> float:
    p50 = statistics.median(ms)
    p95 = statistics.quantiles(ms, n=20)[18]
    print(f"{name:<22} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms")
    return p50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    runs = ap.parse_args().runs
    with hutch.Client() as client, hutch.Sandbox.create(client=client) as sb:
        loop = asyncio.new_event_loop()
        aclient = hutch.AsyncClient()
        asb = hutch.AsyncSandbox(aclient, sb.info)
        # Interleaved rounds, so drift in the guest or the host hits every surface alike.
        results: dict[str, list[float]] = {
            "native HTTP": [],
            "SDK Sandbox.exec": [],
            "SDK AsyncSandbox.exec": [],
        }
        fns = {
            "native HTTP": native(client.endpoint, sb.id),
            "SDK Sandbox.exec": lambda: sb.exec(["true"]) and None,
            "SDK AsyncSandbox.exec": lambda: loop.run_until_complete(asb.exec(["true"])) and None,
        }
        for _ in range(5):
            for name, fn in fns.items():
                results[name] += measure(fn, runs // 5)
        base = report("native HTTP", results["native HTTP"])
        for name in ("SDK Sandbox.exec", "SDK AsyncSandbox.exec"):
            print(f"{'':<22} {report(name, results[name]) / base:.2f}x native")
        loop.run_until_complete(aclient.close())
        loop.close()


if __name__ == "__main__":
    main()
