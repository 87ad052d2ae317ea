"""The clients' static types: `hutch._typed` is what `tools/gen_typed.py` makes from the
operations now, and mypy --strict accepts the package and typed code using it."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import mypy.api

import hutch
from hutch import _calls

ROOT = Path(__file__).resolve().parents[1]

USER = """
from hutch import AsyncSandbox, Client, FileEntry, PortMapping, Sandbox


def sync(client: Client) -> None:
    with Sandbox.create(client=client) as sb:
        code: int | None = sb.exec("true").exit_code
        kids: list[Sandbox] = sb.fork(2)
        data: bytes = sb.read_file("/etc/hostname")
        ports: list[PortMapping] = sb.ports()
        again: Sandbox = client.sandbox(sb.id)


async def asynchronous() -> None:
    async with AsyncSandbox.create() as sb:
        out: str = (await sb.exec("true")).stdout
        kids: list[AsyncSandbox] = await sb.fork()
        files: list[FileEntry] = await sb.list_files("/")
"""


def test_generated_types_are_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_typed", ROOT / "tools" / "gen_typed.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "src" / "hutch" / "_typed.py").read_text() == gen.render(), (
        "run tools/gen_typed.py"
    )


def test_every_operation_is_bound_with_its_signature() -> None:
    for calls, classes in [
        (_calls.ClientCalls, [hutch.Client, hutch.AsyncClient]),
        (_calls.SandboxCalls, [hutch.Sandbox, hutch.AsyncSandbox]),
    ]:
        for name, op in vars(calls).items():
            if name.startswith("_") or not callable(op):
                continue
            for cls in classes:
                method = getattr(cls, name)
                assert method.__wrapped__ is op, f"{cls.__name__}.{name}"
                params = inspect.signature(method).parameters
                assert params == inspect.signature(op).parameters
                assert inspect.iscoroutinefunction(method) == cls.__name__.startswith("Async")


def test_mypy_strict_accepts_the_package_and_its_use(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER)
    package = ROOT / "src" / "hutch"
    out, err, status = mypy.api.run(
        ["--strict", "--no-incremental", str(package), str(tmp_path / "user.py")]
    )
    assert status == 0, out + err
