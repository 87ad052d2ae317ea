"""The asyncio client: `AsyncClient`, `AsyncSandbox` (`async with AsyncSandbox.create(...)`
destroys on exit) and `AsyncProcess`. Same operations as the blocking client (both run the
calls of `hutch._calls`); packing and unpacking archives run on a thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from . import _models as m
from . import _routes as r
from . import _stream as s
from ._calls import Call, ClientCalls, SandboxCalls, argv, bind, call
from ._connection import Endpoint
from ._errors import ConnectError, NotFound, error_from_body
from ._sync import WS_OPTIONS, http_timeout, ws_error

if TYPE_CHECKING:  # the operations with the types they return here (generated)
    from ._typed import AsyncClientOps as _ClientBase
    from ._typed import AsyncSandboxOps as _SandboxBase
else:
    _ClientBase, _SandboxBase = ClientCalls, SandboxCalls


class AsyncClient(_ClientBase):
    """`Client` for asyncio: the same connection rules and operations, awaited."""

    def __init__(
        self,
        host: str | None = None,
        token: str | None = None,
        *,
        socket: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.endpoint = Endpoint.resolve(host, token, socket)
        uds = self.endpoint.socket
        transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=http_timeout(timeout),
        )
        self._sandbox_cls = AsyncSandbox

    async def _run(self, c: Call[Any]) -> Any:
        kw = await asyncio.to_thread(c.request) if c.prepare else c.request()
        request = self._http.build_request(c.route.method, c.url, **kw)
        try:
            resp = await self._http.send(request, stream=c.consume is not None)
            try:
                if not resp.is_success:
                    raise error_from_body(resp.status_code, await resp.aread())
                if c.consume is None and c.parse_blocks:
                    return await asyncio.to_thread(c.parse, resp)
                if c.consume is None:
                    return c.parse(resp)
                async for chunk in resp.aiter_bytes():
                    c.consume.feed(chunk)
                return c.consume.finish()
            finally:
                await resp.aclose()
        except httpx.TransportError as e:
            raise ConnectError(f"cannot reach the hutch daemon at {self.endpoint}: {e}") from e

    async def _ws(self, path: str) -> ClientConnection:
        ep = self.endpoint
        try:
            sock = await asyncio.to_thread(ep.open_socket)
        except OSError as e:
            raise ConnectError(f"cannot reach the hutch daemon at {ep}: {e}") from e
        opts = WS_OPTIONS | {"additional_headers": ep.headers(), "sock": sock}
        try:
            opener = unix_connect if ep.socket else connect
            return await opener(uri=ep.ws_url(path), **opts)
        except BaseException as e:
            sock.close()
            if isinstance(e, (InvalidStatus, OSError)):
                raise ws_error(e, ep) from e
            raise

    async def openapi(self) -> dict[str, Any]:
        """The daemon's OpenAPI document."""
        doc: dict[str, Any] = (await self._http.get("/openapi.json")).json()
        return doc

    async def close(self) -> None:
        """Closes the kept connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _awaited(op: Any) -> Any:
    async def method(self: Any, *a: Any, **kw: Any) -> Any:
        client = self if isinstance(self, AsyncClient) else self._client
        return await client._run(op(self, *a, **kw))

    return method


bind(AsyncClient, ClientCalls, _awaited)


class AsyncSandbox(_SandboxBase):
    """`Sandbox` for asyncio: `async with AsyncSandbox.create(...) as sb:` destroys it on
    exit; `sb = await AsyncSandbox.create(...)` does not."""

    def __init__(self, client: AsyncClient, info: m.SandboxInfo) -> None:
        self._client = client
        self._owns_client = False
        self.info = info
        self.id = info.id

    @classmethod
    def create(cls, client: AsyncClient | None = None, **spec: Any) -> _Creating:
        """Creates a sandbox (see `Sandbox.create`); await it, or enter it with `async with`."""
        return _Creating(client, spec)

    @classmethod
    async def connect(cls, id: str, client: AsyncClient | None = None) -> AsyncSandbox:
        """An existing sandbox (destroyed on exit only when used as a context manager)."""
        sandbox: AsyncSandbox = await (client or AsyncClient()).sandbox(id)
        sandbox._owns_client = client is None
        return sandbox

    async def stream(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: int | None = None,
    ) -> AsyncProcess:
        """`Sandbox.stream` for asyncio."""
        return await self._open(m.ExecStart(argv(cmd), env, cwd, None, timeout))

    async def pty(
        self,
        cmd: str | Sequence[str] = ("/bin/sh",),
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: int | None = None,
    ) -> AsyncProcess:
        """`Sandbox.pty` for asyncio."""
        return await self._open(m.ExecStart(argv(cmd), env, cwd, m.TtySize(rows, cols), timeout))

    async def _open(self, start: m.ExecStart) -> AsyncProcess:
        ws = await self._client._ws(call(r.EXEC_WS, id=self.id).url)
        try:
            await ws.send(s.start_frame(start))
            return AsyncProcess(ws, s.started(await ws.recv()))
        except BaseException:
            await ws.close()
            raise

    async def kill(self) -> None:
        """Destroys the sandbox if it still exists, and closes a client it made itself."""
        try:
            await self.destroy()
        except NotFound:
            pass
        finally:
            if self._owns_client:
                await self._client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.id!r})"


bind(AsyncSandbox, SandboxCalls, _awaited)


class _Creating(Awaitable[AsyncSandbox]):
    """A sandbox being created: awaitable, or an async context manager destroying it on exit."""

    def __init__(self, client: AsyncClient | None, spec: dict[str, Any]) -> None:
        self._client = client
        self._spec = spec
        self._sandbox: AsyncSandbox | None = None

    async def _create(self) -> AsyncSandbox:
        client = self._client or AsyncClient()
        try:
            sandbox: AsyncSandbox = await client.create_sandbox(**self._spec)
        except BaseException:
            if self._client is None:
                await client.close()
            raise
        sandbox._owns_client = self._client is None
        return sandbox

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._create().__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._create()
        return self._sandbox

    async def __aexit__(self, *exc: object) -> None:
        if self._sandbox is not None:
            await self._sandbox.kill()


class AsyncProcess:
    """`Process` for asyncio: `async for chunk in proc`, `await proc.wait()`."""

    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self._ws = ws
        self.pid = pid
        self.exit: s.Exit | None = None

    async def __aiter__(self) -> AsyncIterator[s.Output]:
        while self.exit is None:
            try:
                event = s.decode(await self._ws.recv())
            except ConnectionClosed as e:
                raise s.closed_early(e) from e
            if isinstance(event, s.Exit):
                self.exit = event
            elif isinstance(event, s.Output):
                yield event

    async def wait(self) -> s.StreamResult:
        """Waits for the exit; the output not yet iterated over, and how it ended."""
        out = s.Collector()
        async for chunk in self:
            out.add(chunk)
        assert self.exit is not None
        await self.close()
        return out.result(self.exit)

    async def write(self, data: bytes | str) -> None:
        """Sends bytes to its stdin."""
        await self._ws.send(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        """Ends its stdin."""
        await self._ws.send(s.control("eof"))

    async def resize(self, rows: int, cols: int) -> None:
        """Resizes its terminal (PTY sessions)."""
        await self._ws.send(s.control("resize", rows=rows, cols=cols))

    async def signal(self, signal: int) -> None:
        """Sends a signal to its process group."""
        await self._ws.send(s.control("signal", signal=signal))

    async def close(self) -> None:
        """Closes the stream; a command still running is killed."""
        await self._ws.close()

    async def __aenter__(self) -> AsyncProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
