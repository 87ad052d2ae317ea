"""Python SDK of Hutch, disposable microVM sandboxes for coding agents.

    from hutch import Sandbox

    with Sandbox.create() as sb:                 # destroyed on exit
        print(sb.exec("echo hi").stdout)

Connects to `$HUTCH_HOME/hutch.sock` (default `/var/lib/hutch/hutch.sock`), or over TCP to
`HUTCH_HOST` (`host:port`) with `HUTCH_TOKEN`. `AsyncSandbox`/`AsyncClient` are the asyncio
twins. Every API error is a `HutchError` subclass carrying the stable `code`.
"""

from ._async import AsyncClient, AsyncProcess, AsyncSandbox
from ._connection import Endpoint
from ._errors import (
    ERRORS,
    BadRequest,
    CommandNotFound,
    Conflict,
    ConnectError,
    ExecFailed,
    Forbidden,
    HutchError,
    InternalError,
    InvalidSpec,
    NotFound,
    OverCapacity,
    Timeout,
    Unauthorized,
    UnsafePath,
)
from ._models import (
    ExecResult,
    FileEntry,
    AuditLog,
    AuditReport,
    BrokerEvent,
    NetEvent,
    NetworkPolicy,
    PortMapping,
    SandboxInfo,
    TaskRecord,
    TemplateInfo,
)
from ._stream import Exit, Output, StreamResult
from ._sync import Client, Process, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncProcess",
    "AsyncSandbox",
    "BadRequest",
    "Client",
    "CommandNotFound",
    "Conflict",
    "ConnectError",
    "ERRORS",
    "Endpoint",
    "ExecFailed",
    "ExecResult",
    "Exit",
    "FileEntry",
    "Forbidden",
    "HutchError",
    "InternalError",
    "InvalidSpec",
    "AuditLog",
    "AuditReport",
    "BrokerEvent",
    "NetEvent",
    "NetworkPolicy",
    "NotFound",
    "Output",
    "OverCapacity",
    "PortMapping",
    "Process",
    "Sandbox",
    "SandboxInfo",
    "StreamResult",
    "TaskRecord",
    "TemplateInfo",
    "Timeout",
    "Unauthorized",
    "UnsafePath",
]
