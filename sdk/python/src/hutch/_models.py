"""Typed request and response bodies of the daemon's API (`/openapi.json` names them the same;
`tests/test_contract.py` checks every field against the document)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def to_json(body: Any) -> Any:
    """A request dataclass as its JSON object, leaving out fields that are `None` (the daemon's
    defaults apply)."""
    if dataclasses.is_dataclass(body) and not isinstance(body, type):
        return {
            f.name: to_json(getattr(body, f.name))
            for f in dataclasses.fields(body)
            if getattr(body, f.name) is not None
        }
    if isinstance(body, list):
        return [to_json(v) for v in body]
    if isinstance(body, dict):
        return {k: to_json(v) for k, v in body.items()}
    return body


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """A response dataclass from its JSON object: known fields only, missing optional ones
    taking their defaults (the API only adds fields)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# ---- requests -------------------------------------------------------------------------------


@dataclass
class NetworkPolicy:
    """What a sandbox may reach: `none` (no NIC), `open` (public addresses) or `allow` (only
    these CIDRs, domains and ports)."""

    mode: Literal["none", "open", "allow"] = "none"
    cidrs: list[str] | None = None
    domains: list[str] | None = None
    ports: list[int] | None = None

    @classmethod
    def allow(
        cls,
        cidrs: list[str] | None = None,
        domains: list[str] | None = None,
        ports: list[int] | None = None,
    ) -> NetworkPolicy:
        """Only these destinations."""
        return cls("allow", cidrs or [], domains or [], ports or [])


@dataclass
class CreateSandbox:
    """`POST /v1/sandboxes`."""

    image: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    env: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    ttl_secs: int | None = None
    network: NetworkPolicy | None = None
    template: str | None = None
    idempotency_key: str | None = None


@dataclass
class ExecBody:
    """`POST /v1/sandboxes/{id}/exec`."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = None
    timeout_secs: int | None = None


@dataclass
class TtySize:
    """A terminal size."""

    rows: int
    cols: int


@dataclass
class ExecStart:
    """First text frame of the exec WebSocket."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    tty: TtySize | None = None
    timeout_secs: int | None = None


@dataclass
class ForkBody:
    """`POST /v1/sandboxes/{id}/fork`."""

    count: int = 1


@dataclass
class PoolBody:
    """`PUT /v1/templates/{name}/pool`."""

    size: int


@dataclass
class PublishPort:
    """`PUT /v1/sandboxes/{id}/ports/{guest_port}`."""

    host_port: int | None = None


@dataclass
class TemplateSpec:
    """`POST /v1/templates`: boot `image`, run `provision`, save."""

    name: str
    image: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    provision: str | None = None
    network: NetworkPolicy | None = None


@dataclass
class TaskSpec:
    """The `spec` part of `POST /v1/tasks`."""

    command: list[str]
    env: dict[str, str] | None = None
    allow: list[str] | None = None
    verify: str | None = None
    timeout_secs: int | None = None
    template: str | None = None
    network: NetworkPolicy | None = None


# ---- responses ------------------------------------------------------------------------------


@dataclass
class SandboxInfo:
    """A sandbox as the API reports it. `state` is its `SandboxState` object
    (`{"state": "running"}`, `{"state": "failed", "reason": …}`, …)."""

    id: str
    state: dict[str, Any]
    spec: dict[str, Any]
    created_at_ms: int
    updated_at_ms: int
    expires_at_ms: int | None = None

    @property
    def status(self) -> str:
        """The state's name: `running`, `paused`, `stopped`, `destroyed`, `failed`, …"""
        return str(self.state["state"])


@dataclass
class ExecResult:
    """A finished command: exit code (or signal), whole output, and whether output beyond the
    daemon's cap (1 MiB per stream) was dropped."""

    timed_out: bool
    stdout: str
    stderr: str
    truncated: bool
    exit_code: int | None = None
    signal: int | None = None

    @property
    def ok(self) -> bool:
        """Whether it exited 0."""
        return self.exit_code == 0


@dataclass
class PortMapping:
    """A guest TCP port published on a host loopback port."""

    guest_port: int
    host_addr: str
    host_port: int


@dataclass
class NetEvent:
    """One network decision about a sandbox's traffic."""

    time_ms: int
    proto: str
    dst: str
    dst_port: int
    verdict: str
    rule: str
    domain: str | None = None


@dataclass
class BrokerEvent:
    """One use of a secret by a sandbox's broker: never a value, never a placeholder."""

    time: str
    sandbox_id: str
    secret: str
    host: str
    port: int
    decision: str
    method: str | None = None
    path: str | None = None
    reason: str | None = None


@dataclass
class AuditLog:
    """A sandbox's journal records (JSON objects: `seq`, `kind`, `actor`, `attrs`, ...), its
    latest signed checkpoint and the host key that certifies the sandbox's key."""

    records: list[dict[str, Any]]
    host_key: str
    checkpoint: str | None = None


@dataclass
class AuditReport:
    """The verdict on a sandbox's journal: `ok` (intact, sealed), `unsealed` or `failed`,
    with each failure named."""

    status: str
    sandbox: str
    records: int
    checkpointed: int
    sealed: bool
    torn_bytes: int
    failures: list[dict[str, Any]]
    public_key: str | None = None


@dataclass
class TemplateInfo:
    """A saved template."""

    spec: dict[str, Any]
    digest: str
    image_digest: str
    has_nic: bool
    created_at_ms: int
    build_ms: int
    pool_size: int = 0
    pool_ready: int = 0


@dataclass
class TaskRecord:
    """A task's durable record: its verdict (`{"status": "accepted", …}`), the agent's and the
    verification's outcomes, and the accepted changes."""

    id: str
    spec: dict[str, Any]
    created_ms: int
    baseline_digest: str
    baseline_files: int
    verdict: dict[str, Any]
    timings: dict[str, Any]
    agent: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    changeset_digest: str | None = None
    not_carried: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    signature: str | None = None


@dataclass
class FileEntry:
    """One entry of a guest directory (`Sandbox.list_files`)."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
