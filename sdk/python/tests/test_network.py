"""Network policy, its log, and published ports on a sandbox with a network."""

from __future__ import annotations

import time
import urllib.request

import hutch
from hutch import NetworkPolicy

# RFC 5737 documentation ranges: never a real address.
ALLOWED = "203.0.113.0/24"
DENIED = "198.51.100.7"


def test_policy_log_and_ports(client: hutch.Client) -> None:
    policy = NetworkPolicy.allow(cidrs=[ALLOWED])
    with hutch.Sandbox.create(client=client, network=policy) as sb:
        assert sb.info.spec["network"]["mode"] == "allow"
        res = sb.exec(
            f"python3 -c 'import socket; socket.create_connection((\"{DENIED}\", 80), 2)'"
        )
        assert res.exit_code != 0
        deadline = time.monotonic() + 10
        while not [e for e in sb.network_log() if e.dst == DENIED]:
            assert time.monotonic() < deadline, "the denied flow never reached the log"
            time.sleep(0.2)
        event = next(e for e in sb.network_log() if e.dst == DENIED)
        assert (event.verdict, event.dst_port, event.proto) == ("deny", 80, "tcp")

        info = sb.set_network(NetworkPolicy.allow(cidrs=[ALLOWED, f"{DENIED}/32"]))
        assert f"{DENIED}/32" in info.spec["network"]["cidrs"]

        sb.exec("mkdir -p /tmp/www")
        sb.write_file("/tmp/www/id.txt", sb.id)
        with sb.stream(["python3", "-m", "http.server", "8000", "-d", "/tmp/www"]) as server:
            mapping = sb.publish_port(8000)
            assert (mapping.guest_port, mapping.host_addr) == (8000, "127.0.0.1")
            assert sb.ports() == [mapping]
            url = f"http://127.0.0.1:{mapping.host_port}/id.txt"
            deadline = time.monotonic() + 20
            while True:
                try:
                    body = urllib.request.urlopen(url, timeout=5).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the published port never answered"
                    time.sleep(0.2)
            assert body.decode().strip() == sb.id
            assert sb.unpublish_port(8000) == []
            server.signal(15)
