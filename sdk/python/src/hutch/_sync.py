"""The blocking client: `Client`, `Sandbox` (a context manager that destroys on exit) and
`Process` (a streaming command over the exec WebSocket)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect, unix_connect

from . import _models as m
from . import _routes as r
from . import _stream as s
from ._calls import Call, ClientCalls, SandboxCalls, argv, bind, call
from ._connection import Endpoint
from ._errors import ConnectError, HutchError, NotFound, error_from_body

if TYPE_CHECKING:  # the operations with the types they return here (generated)
    from ._typed import ClientOps as _ClientBase
    from ._typed import SandboxOps as _SandboxBase
else:
    _ClientBase, _SandboxBase = ClientCalls, SandboxCalls

WS_OPTIONS: dict[str, Any] = {"max_size": 16 << 20, "compression": None, "open_timeout": 60}
"""Options of every exec WebSocket (output frames are far below the size cap)."""


def http_timeout(read: float | None) -> httpx.Timeout:
    """Connecting is bounded; answers may take as long as the operation (`None`: no bound)."""
    return httpx.Timeout(read, connect=10.0)


def ws_error(e: Exception, endpoint: Endpoint) -> HutchError:
    """A refused upgrade is the daemon's API error (404 unknown sandbox, 401, 403, …)."""
    if isinstance(e, InvalidStatus):
        return error_from_body(e.response.status_code, bytes(e.response.body or b""))
    return ConnectError(f"cannot open the exec stream at {endpoint}: {e}")


class Client(_ClientBase):
    """A connection to the daemon: its Unix socket by default (`$HUTCH_HOME/hutch.sock`), or
    TCP at `host` (`HUTCH_HOST`, `host:port`) with `token` (`HUTCH_TOKEN`). Keeps connections
    alive between calls; close it (or use it as a context manager) when done.

    `timeout` bounds how long one answer may take, in seconds (default: unbounded, since
    creates, templates and tasks take as long as they take)."""

    def __init__(
        self,
        host: str | None = None,
        token: str | None = None,
        *,
        socket: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.endpoint = Endpoint.resolve(host, token, socket)
        transport = httpx.HTTPTransport(uds=self.endpoint.socket) if self.endpoint.socket else None
        self._http = httpx.Client(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=http_timeout(timeout),
        )
        self._sandbox_cls = Sandbox

    def _run(self, c: Call[Any]) -> Any:
        request = self._http.build_request(c.route.method, c.url, **c.request())
        try:
            resp = self._http.send(request, stream=c.consume is not None)
            try:
                if not resp.is_success:
                    raise error_from_body(resp.status_code, resp.read())
                if c.consume is None:
                    return c.parse(resp)
                for chunk in resp.iter_bytes():
                    c.consume.feed(chunk)
                return c.consume.finish()
            finally:
                resp.close()
        except httpx.TransportError as e:
            raise ConnectError(f"cannot reach the hutch daemon at {self.endpoint}: {e}") from e

    def _ws(self, path: str) -> ClientConnection:
        ep = self.endpoint
        try:
            sock = ep.open_socket()
        except OSError as e:
            raise ConnectError(f"cannot reach the hutch daemon at {ep}: {e}") from e
        sock.settimeout(None)
        opts = WS_OPTIONS | {"additional_headers": ep.headers(), "sock": sock}
        try:
            # Entered as a context manager (what websockets expects); `Process` closes it.
            # `unix_connect` for a Unix socket: `connect` would set TCP options on it.
            opener = unix_connect if ep.socket else connect
            conn: ClientConnection = opener(uri=ep.ws_url(path), **opts).__enter__()
            return conn
        except BaseException as e:
            sock.close()
            if isinstance(e, (InvalidStatus, OSError)):
                raise ws_error(e, ep) from e
            raise

    def openapi(self) -> dict[str, Any]:
        """The daemon's OpenAPI document."""
        doc: dict[str, Any] = self._http.get("/openapi.json").json()
        return doc

    def close(self) -> None:
        """Closes the kept connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


bind(Client, ClientCalls, lambda op: lambda self, *a, **kw: self._run(op(self, *a, **kw)))


class Sandbox(_SandboxBase):
    """One sandbox. `Sandbox.create(...)` makes one; as a context manager it is destroyed on
    exit. Every operation of the API on a sandbox is a method (see `hutch._calls.SandboxCalls`
    for their documentation)."""

    def __init__(self, client: Client, info: m.SandboxInfo) -> None:
        self._client = client
        self._owns_client = False
        self.info = info
        self.id = info.id

    @classmethod
    def create(cls, client: Client | None = None, **spec: Any) -> Sandbox:
        """Creates a sandbox and waits until it runs; `spec` as `Client.create_sandbox`
        (`image`, `template`, `cpus`, `memory_mib`, `disk_mib`, `env`, `labels`, `ttl_secs`,
        `network`, `idempotency_key`). Without a client, it makes (and later closes) one."""
        owns = client is None
        client = client or Client()
        try:
            sandbox: Sandbox = client.create_sandbox(**spec)
        except BaseException:
            if owns:
                client.close()
            raise
        sandbox._owns_client = owns
        return sandbox

    @classmethod
    def connect(cls, id: str, client: Client | None = None) -> Sandbox:
        """An existing sandbox (destroyed on exit only when used as a context manager)."""
        owns = client is None
        sandbox: Sandbox = (client or Client()).sandbox(id)
        sandbox._owns_client = owns
        return sandbox

    def stream(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: int | None = None,
    ) -> Process:
        """Starts a command and streams it: iterate for output chunks, `write` stdin, `wait`
        for the exit. Closing it early kills the command."""
        return self._open(m.ExecStart(argv(cmd), env, cwd, None, timeout))

    def pty(
        self,
        cmd: str | Sequence[str] = ("/bin/sh",),
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: int | None = None,
    ) -> Process:
        """Starts a command under a pseudo-terminal (output all on `stdout`); `resize` it."""
        return self._open(m.ExecStart(argv(cmd), env, cwd, m.TtySize(rows, cols), timeout))

    def _open(self, start: m.ExecStart) -> Process:
        ws = self._client._ws(call(r.EXEC_WS, id=self.id).url)
        try:
            ws.send(s.start_frame(start))
            return Process(ws, s.started(ws.recv()))
        except BaseException:
            ws.close()
            raise

    def kill(self) -> None:
        """Destroys the sandbox if it still exists, and closes a client it made itself."""
        try:
            self.destroy()
        except NotFound:
            pass
        finally:
            if self._owns_client:
                self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"


bind(Sandbox, SandboxCalls, lambda op: lambda self, *a, **kw: self._client._run(op(self, *a, **kw)))


class Process:
    """A command streaming over the exec WebSocket. Iterating yields `Output` chunks until it
    exits (then `exit` is set); `wait()` gathers the rest. Thread-safe between one reader and
    one writer (stdin)."""

    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self._ws = ws
        self.pid = pid
        self.exit: s.Exit | None = None

    def __iter__(self) -> Iterator[s.Output]:
        while self.exit is None:
            try:
                event = s.decode(self._ws.recv())
            except ConnectionClosed as e:
                raise s.closed_early(e) from e
            if isinstance(event, s.Exit):
                self.exit = event
            elif isinstance(event, s.Output):
                yield event

    def wait(self) -> s.StreamResult:
        """Waits for the exit; the output not yet iterated over, and how it ended."""
        out = s.Collector()
        for chunk in self:
            out.add(chunk)
        assert self.exit is not None
        self.close()
        return out.result(self.exit)

    def write(self, data: bytes | str) -> None:
        """Sends bytes to its stdin."""
        self._ws.send(data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        """Ends its stdin."""
        self._ws.send(s.control("eof"))

    def resize(self, rows: int, cols: int) -> None:
        """Resizes its terminal (PTY sessions)."""
        self._ws.send(s.control("resize", rows=rows, cols=cols))

    def signal(self, signal: int) -> None:
        """Sends a signal to its process group."""
        self._ws.send(s.control("signal", signal=signal))

    def close(self) -> None:
        """Closes the stream; a command still running is killed."""
        self._ws.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
