"""Each error the API sends arrives as its own exception class, carrying the stable code and
the HTTP status: over the Unix socket, over TCP with tokens, and on the exec WebSocket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import hutch
from conftest import Daemon

UNKNOWN = "sb-0000000000"


def raises(cls: type[hutch.HutchError], status: int, fn: Callable[[], Any]) -> hutch.HutchError:
    with pytest.raises(cls) as e:
        fn()
    assert e.value.code == cls.code and e.value.status == status, e.value
    assert isinstance(e.value, hutch.HutchError) and e.value.message
    return e.value


def test_request_errors(client: hutch.Client, sandbox: hutch.Sandbox) -> None:
    raises(hutch.BadRequest, 400, lambda: sandbox.write_file("/tmp/x", b"", mode=0o77777))
    raises(hutch.InvalidSpec, 400, lambda: client.create_sandbox(memory_mib=64))
    raises(hutch.UnsafePath, 400, lambda: sandbox.read_file("relative/path"))
    raises(hutch.NotFound, 404, lambda: client.sandbox(UNKNOWN))
    raises(hutch.NotFound, 404, lambda: client.template("no-such-template"))
    raises(hutch.CommandNotFound, 422, lambda: sandbox.exec(["/no/such/program"]))
    raises(hutch.OverCapacity, 429, lambda: client.create_sandbox(memory_mib=262144))


def test_stream_errors(client: hutch.Client, sandbox: hutch.Sandbox) -> None:
    unknown = hutch.Sandbox(client, hutch.SandboxInfo(UNKNOWN, {}, {}, 0, 0))
    raises(hutch.NotFound, 404, lambda: unknown.stream("true"))
    # After the upgrade, errors come as events: no HTTP status.
    raises(hutch.CommandNotFound, 0, lambda: sandbox.stream(["/no/such/program"]))


def test_state_conflict(client: hutch.Client) -> None:
    sb = hutch.Sandbox.create(client=client)
    sb.destroy()
    raises(hutch.Conflict, 409, lambda: sb.exec("true"))


def test_tokens_over_tcp(daemon: Daemon, sandbox: hutch.Sandbox) -> None:
    with hutch.Client(daemon.tcp, token="not-a-token") as wrong:
        raises(hutch.Unauthorized, 401, wrong.sandboxes)
    with hutch.Client(daemon.tcp, token=daemon.token("team=a")) as team_a:
        raises(hutch.Forbidden, 403, lambda: team_a.sandbox(sandbox.id))
        raises(hutch.Forbidden, 403, lambda: hutch.Sandbox(team_a, sandbox.info).destroy())
        raises(hutch.Forbidden, 403, lambda: hutch.Sandbox(team_a, sandbox.info).stream("true"))
        assert team_a.sandboxes() == []


def test_environment_selects_tcp_and_token(
    daemon: Daemon, sandbox: hutch.Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUTCH_HOST", daemon.tcp)
    monkeypatch.setenv("HUTCH_TOKEN", daemon.token())
    with hutch.Client() as c:
        assert c.endpoint.socket is None and c.endpoint.token
        assert sandbox.id in [sb.id for sb in c.sandboxes()]
        assert hutch.Sandbox(c, sandbox.info).exec("echo tcp").stdout == "tcp\n"
        with hutch.Sandbox(c, sandbox.info).stream("echo ws over tcp") as proc:
            assert proc.wait().stdout == b"ws over tcp\n"
    monkeypatch.delenv("HUTCH_HOST")
    monkeypatch.setenv("HUTCH_HOME", str(daemon.home))
    with hutch.Client() as c:
        assert c.endpoint.socket == daemon.socket
        assert sandbox.id in [sb.id for sb in c.sandboxes()]


# httpcore leaves the socket of a failed Unix connect to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreachable_daemon_is_a_connect_error(tmp_path: Any) -> None:
    with hutch.Client(socket=str(tmp_path / "none.sock")) as c:
        with pytest.raises(hutch.ConnectError):
            c.sandboxes()
        with pytest.raises(hutch.ConnectError):
            hutch.Sandbox(c, hutch.SandboxInfo(UNKNOWN, {}, {}, 0, 0)).stream("true")
