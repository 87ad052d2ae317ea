"""Every operation once, as a description of its HTTP exchange (`Call`) and how to read the
answer; the sync and async clients only run them (`bind`), so both speak the same API."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from . import _models as m
from . import _routes as r
from . import _stream, _tar
from ._errors import NotFound

T = TypeVar("T")

SandboxT = Any
"""Stands for the sandbox class of the client running a call (`Sandbox` or `AsyncSandbox`) in
the operations' annotations; `hutch._typed` (generated) names the real one."""


@dataclass
class Call(Generic[T]):
    """One request and the reading of its 2xx answer. `prepare` builds a body that takes work
    (packing a directory; it returns `httpx` request arguments) and `parse_blocks` says that
    reading the answer writes to disk: the async client runs those on a thread. With
    `consume`, the answer is read as a stream."""

    route: r.Route
    url: str
    parse: Callable[[httpx.Response], T]
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    content: bytes | None = None
    prepare: Callable[[], dict[str, Any]] | None = None
    parse_blocks: bool = False
    consume: _stream.Frames | None = None
    """Reads a streamed answer chunk by chunk instead of `parse` (then `finish()` is the
    result)."""

    def request(self) -> dict[str, Any]:
        """The keyword arguments of `httpx`'s `request` (runs `prepare`)."""
        kw: dict[str, Any] = {"params": self.params}
        if self.json is not None:
            kw["json"] = self.json
        if self.content is not None:
            kw["content"] = self.content
        return kw | (self.prepare() if self.prepare else {})


def call(
    route: r.Route, parse: Callable[[httpx.Response], Any] | None = None, **kw: Any
) -> Call[Any]:
    """A `Call` of `route`; keyword arguments named in its path template fill it (encoded),
    the rest go to `Call`. Without `parse`, the answer is read as the route's response type."""
    names = {k for k in kw if "{" + k + "}" in route.path}
    url = route.path.format(**{k: quote(str(kw.pop(k)), safe="") for k in names})
    if "json" in kw:
        kw["json"] = m.to_json(kw["json"])
    return Call(route, url, parse or reader(route), **kw)


def reader(route: r.Route) -> Callable[[httpx.Response], Any]:
    """Reads an answer as `route.response` (a list of them when `many`), else its bytes."""
    cls = route.response
    if cls is None:
        return lambda resp: resp.content
    if route.many:
        return lambda resp: [m.from_json(cls, x) for x in resp.json()]
    return lambda resp: m.from_json(cls, resp.json())


def argv(cmd: str | Sequence[str]) -> list[str]:
    """A command: a string runs under `sh -c`, a sequence is the argv itself."""
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def _find_argv(path: str) -> list[str]:
    return ["find", path, "-mindepth", "1", "-maxdepth", "1", "-printf", "%y\\t%s\\t%m\\t%f\\0"]


_KINDS = {"f": "file", "d": "dir", "l": "symlink"}


def _entries(path: str, res: m.ExecResult) -> list[m.FileEntry]:
    if res.exit_code != 0:
        raise NotFound(f"cannot list {path}: {res.stderr.strip()}")
    out = []
    for rec in filter(None, res.stdout.split("\0")):
        kind, size, mode, name = rec.split("\t", 3)
        out.append(
            m.FileEntry(
                name=name,
                path=path.rstrip("/") + "/" + name,
                type=_KINDS.get(kind, "other"),  # type: ignore[arg-type]
                size=int(size),
                mode=int(mode, 8),
            )
        )
    return sorted(out, key=lambda e: e.name)


class SandboxCalls:
    """Operations on one sandbox (`self` is a `Sandbox` or an `AsyncSandbox`)."""

    id: str
    info: m.SandboxInfo
    _client: Any

    def _adopt(self, info: m.SandboxInfo) -> Any:
        cls: Any = type(self)
        return cls(self._client, info)

    def _keep(self, resp: httpx.Response) -> m.SandboxInfo:
        self.info = m.from_json(m.SandboxInfo, resp.json())
        return self.info

    def refresh(self) -> Call[m.SandboxInfo]:
        """Reads the sandbox's current record (and keeps it as `info`)."""
        return call(r.GET, self._keep, id=self.id)

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: int | None = None,
    ) -> Call[m.ExecResult]:
        """Runs a command to completion; its exit code and whole output (each stream capped
        at 1 MiB, `truncated` set when more was dropped). A string runs under `sh -c`."""
        body = m.ExecBody(argv(cmd), env, cwd, stdin, timeout)
        return call(r.EXEC, id=self.id, json=body)

    def read_file(self, path: str) -> Call[bytes]:
        """The contents of a guest file."""
        return call(r.GET_FILE, id=self.id, params=[("path", path)])

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> Call[None]:
        """Writes a guest file (parents must exist), with permission bits `mode`."""
        content = data.encode() if isinstance(data, str) else data
        params = [("path", path), ("mode", f"{mode:o}")]
        return call(r.PUT_FILE, lambda _: None, id=self.id, params=params, content=content)

    def list_files(self, path: str) -> Call[list[m.FileEntry]]:
        """The entries of a guest directory, by name (listed in the guest by GNU `find`)."""
        body = m.ExecBody(_find_argv(path))
        return call(
            r.EXEC, lambda resp: _entries(path, reader(r.EXEC)(resp)), id=self.id, json=body
        )

    def upload_dir(self, local: str | os.PathLike[str], path: str) -> Call[None]:
        """Copies a local directory tree into guest directory `path` (a tar archive that the
        daemon checks entry by entry)."""
        params = [("path", path)]
        return call(
            r.PUT_ARCHIVE,
            lambda _: None,
            id=self.id,
            params=params,
            prepare=lambda: {"content": _tar.pack(local)},
        )

    def download_dir(self, path: str, local: str | os.PathLike[str]) -> Call[None]:
        """Copies guest directory `path` into a local directory (created if missing)."""
        params = [("path", path)]
        return call(
            r.GET_ARCHIVE,
            lambda resp: _tar.unpack(resp.content, local),
            id=self.id,
            params=params,
            parse_blocks=True,
        )

    def fork(self, count: int = 1) -> Call[list[SandboxT]]:
        """Snapshots the sandbox into `count` running children (new sandboxes)."""
        return call(
            r.FORK,
            lambda resp: [self._adopt(i) for i in reader(r.FORK)(resp)],
            id=self.id,
            json=m.ForkBody(count),
        )

    def pause(self) -> Call[m.SandboxInfo]:
        """Freezes the vCPUs, keeping memory."""
        return call(r.LIFECYCLE["pause"], self._keep, id=self.id)

    def resume(self) -> Call[m.SandboxInfo]:
        """Resumes a paused or suspended sandbox."""
        return call(r.LIFECYCLE["resume"], self._keep, id=self.id)

    def suspend(self) -> Call[m.SandboxInfo]:
        """Saves memory and disk and stops the VMM; `resume` restores it."""
        return call(r.LIFECYCLE["suspend"], self._keep, id=self.id)

    def stop(self) -> Call[m.SandboxInfo]:
        """Powers the sandbox off, keeping its record."""
        return call(r.LIFECYCLE["stop"], self._keep, id=self.id)

    def start(self) -> Call[m.SandboxInfo]:
        """Boots a stopped sandbox again (fresh disk)."""
        return call(r.LIFECYCLE["start"], self._keep, id=self.id)

    def destroy(self) -> Call[m.SandboxInfo]:
        """Destroys the sandbox: nothing of it remains on the host."""
        return call(r.DESTROY, self._keep, id=self.id)

    def publish_port(self, guest_port: int, host_port: int | None = None) -> Call[m.PortMapping]:
        """Makes a guest TCP port reachable on host loopback (any free port by default)."""
        body = m.PublishPort(host_port)
        return call(r.PUBLISH, id=self.id, guest_port=guest_port, json=body)

    def unpublish_port(self, guest_port: int) -> Call[list[m.PortMapping]]:
        """Stops publishing a guest port; the ports still published."""
        return call(r.UNPUBLISH, id=self.id, guest_port=guest_port)

    def ports(self) -> Call[list[m.PortMapping]]:
        """The published ports."""
        return call(r.PORTS, id=self.id)

    def set_network(self, policy: m.NetworkPolicy) -> Call[m.SandboxInfo]:
        """Replaces the network policy."""
        return call(r.SET_NETWORK, self._keep, id=self.id, json=policy)

    def network_log(self) -> Call[list[m.NetEvent]]:
        """Recent network decisions (denied flows, DNS answers)."""
        return call(r.NETWORK_LOG, id=self.id)

    def console(self) -> Call[bytes]:
        """The guest console log."""
        return call(r.CONSOLE, id=self.id)

    def secret_log(self) -> Call[list[m.BrokerEvent]]:
        """What the secret broker did with this sandbox's secrets (substitutions, refusals,
        violations, scrubs); never a value or a placeholder."""
        return call(r.SECRET_LOG, id=self.id)

    def audit(self, since_seq: int | None = None, kind: str | None = None) -> Call[m.AuditLog]:
        """The sandbox's journal: records from `since_seq` on, of `kind` (or below it: `exec`
        takes `exec.start` and `exec.end`), and its latest signed checkpoint."""
        params = [("from", str(since_seq))] if since_seq is not None else []
        params += [("kind", kind)] if kind is not None else []
        return call(r.AUDIT, id=self.id, params=params)

    def audit_verify(self) -> Call[m.AuditReport]:
        """Verifies the sandbox's journal on the host: `ok`, `unsealed` or `failed`."""
        return call(r.AUDIT_VERIFY, id=self.id)

    def recording(self, exec_id: str = "latest") -> Call[bytes]:
        """An exec's session recording (asciicast v2, guest-controlled text): by the exec's id
        (`hutch.exec.id` in its journal records), the seq of one of its records, or `latest`."""
        return call(r.RECORDING, id=self.id, exec=exec_id)


class ClientCalls:
    """Operations on the daemon as a whole (`self` is a `Client` or an `AsyncClient`)."""

    _sandbox_cls: type

    def _sandbox(self, info: m.SandboxInfo) -> Any:
        return self._sandbox_cls(self, info)

    def create_sandbox(
        self,
        *,
        image: str | None = None,
        template: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk_mib: int | None = None,
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        ttl_secs: int | None = None,
        network: m.NetworkPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> Call[SandboxT]:
        """Creates a sandbox (booted from `image`, default `default`, or restored from
        `template`) and returns it running. Unset fields take the daemon's defaults."""
        body = m.CreateSandbox(
            image,
            cpus,
            memory_mib,
            disk_mib,
            env,
            labels,
            ttl_secs,
            network,
            template,
            idempotency_key,
        )
        return call(r.CREATE, lambda resp: self._sandbox(reader(r.CREATE)(resp)), json=body)

    def sandbox(self, id: str) -> Call[SandboxT]:
        """An existing sandbox by id."""
        return call(r.GET, lambda resp: self._sandbox(reader(r.GET)(resp)), id=id)

    def sandboxes(
        self, state: str | None = None, labels: dict[str, str] | None = None
    ) -> Call[list[SandboxT]]:
        """Sandboxes, optionally only those in `state` and carrying every label given."""
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        params += [("state", state)] if state else []
        return call(
            r.LIST, lambda resp: [self._sandbox(i) for i in reader(r.LIST)(resp)], params=params
        )

    def templates(self) -> Call[list[m.TemplateInfo]]:
        """Every saved template."""
        return call(r.TEMPLATES)

    def template(self, name: str) -> Call[m.TemplateInfo]:
        """One template."""
        return call(r.TEMPLATE, name=name)

    def create_template(
        self,
        name: str,
        *,
        image: str | None = None,
        provision: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk_mib: int | None = None,
        network: m.NetworkPolicy | None = None,
    ) -> Call[m.TemplateInfo]:
        """Boots `image`, runs the `provision` shell script as root and saves the VM, so that
        sandboxes created with `template=name` are restored from it instead of booting."""
        body = m.TemplateSpec(name, image, cpus, memory_mib, disk_mib, provision, network)
        return call(r.CREATE_TEMPLATE, json=body)

    def remove_template(self, name: str) -> Call[m.TemplateInfo]:
        """Removes a template."""
        return call(r.REMOVE_TEMPLATE, name=name)

    def set_pool(self, name: str, size: int) -> Call[m.TemplateInfo]:
        """Keeps `size` restored clones of a template ready (0: none)."""
        return call(r.SET_POOL, name=name, json=m.PoolBody(size))

    def run_task(
        self,
        workspace: str | os.PathLike[str] | bytes,
        command: Sequence[str],
        *,
        verify: str | None = None,
        allow: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout_secs: int | None = None,
        template: str | None = None,
        network: m.NetworkPolicy | None = None,
        on_output: Callable[[_stream.Output], None] | None = None,
    ) -> Call[m.TaskRecord]:
        """Runs an agent `command` on a copy of `workspace` (a local directory, or a tar
        archive as bytes) in a fresh sandbox, checks its changes (and runs `verify` on them
        without a network) and returns the record with the verdict; the host is not changed.
        `on_output` gets the agent's (and the verification's) output as it comes."""
        spec = m.TaskSpec(list(command), env, allow, verify, timeout_secs, template, network)
        spec_json = json.dumps(m.to_json(spec)).encode()

        def form() -> dict[str, Any]:
            tar = workspace if isinstance(workspace, bytes) else _tar.pack(workspace)
            return {
                "files": {
                    "spec": (None, spec_json, "application/json"),
                    "workspace": ("workspace.tar", tar, "application/x-tar"),
                }
            }

        if on_output is None:
            return call(r.RUN_TASK, prepare=form)
        frames = _stream.TaskFrames(on_output)
        return call(r.RUN_TASK, params=[("stream", "true")], prepare=form, consume=frames)

    def tasks(self) -> Call[list[m.TaskRecord]]:
        """Every stored task."""
        return call(r.TASKS)

    def task(self, id: str) -> Call[m.TaskRecord]:
        """One task's record."""
        return call(r.TASK, id=id)

    def task_diff(self, id: str) -> Call[str]:
        """A task's accepted changes as a unified diff."""
        return call(r.TASK_DIFF, lambda resp: resp.text, id=id)


def bind(
    cls: type, calls: type, wrap: Callable[[Callable[..., Call[Any]]], Callable[..., Any]]
) -> type:
    """Gives `cls` every public operation of `calls`, each wrapped to run its `Call` (the
    signature and documentation are the operation's; it returns what the call's answer reads
    as, not the `Call`)."""
    for name, op in vars(calls).items():
        if not name.startswith("_") and callable(op):
            method = functools.wraps(op)(wrap(op))
            method.__signature__ = inspect.signature(op).replace(  # type: ignore[attr-defined]
                return_annotation=inspect.Signature.empty
            )
            setattr(cls, name, method)
    return cls
