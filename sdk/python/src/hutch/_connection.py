"""Where the daemon is: its Unix socket (`$HUTCH_HOME/hutch.sock`) by default, or TCP with a
bearer token when `HUTCH_HOST` (`host:port`) is set, as the `hutch` CLI decides."""

from __future__ import annotations

import os
import socket as sockets
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_HOME = "/var/lib/hutch"


@dataclass(frozen=True)
class Endpoint:
    """A daemon address: `socket` (a Unix socket path) or `base_url` over TCP, and the token
    sent as `Authorization: Bearer …` (TCP needs one; the socket's file mode is its guard)."""

    base_url: str
    socket: str | None = None
    token: str | None = None

    @classmethod
    def resolve(
        cls,
        host: str | None = None,
        token: str | None = None,
        socket: str | None = None,
    ) -> Endpoint:
        """The endpoint from the arguments, else from `HUTCH_HOST`/`HUTCH_TOKEN`, else the
        socket of `$HUTCH_HOME` (default `/var/lib/hutch`)."""
        if socket is None:
            host = host or os.environ.get("HUTCH_HOST") or None
        if host is not None:
            if token is None:
                token = os.environ.get("HUTCH_TOKEN") or None
            url = host if "://" in host else f"http://{host}"
            return cls(base_url=url.rstrip("/"), token=token)
        if socket is None:
            home = os.environ.get("HUTCH_HOME") or DEFAULT_HOME
            socket = os.path.join(home, "hutch.sock")
        return cls(base_url="http://hutch", socket=socket, token=token)

    def ws_url(self, path: str) -> str:
        """The WebSocket URL of `path`."""
        return "ws" + self.base_url.removeprefix("http") + path

    def open_socket(self) -> sockets.socket:
        """A connected stream socket to the daemon (blocking: it may resolve and connect)."""
        if self.socket:
            sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            try:
                sock.connect(self.socket)
            except BaseException:
                sock.close()
                raise
            return sock
        url = urlsplit(self.base_url)
        return sockets.create_connection((url.hostname, url.port or 80), timeout=10)

    def headers(self) -> dict[str, str]:
        """Headers every request carries."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket else self.base_url
