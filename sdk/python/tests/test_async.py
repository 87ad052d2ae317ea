"""The asyncio client on a real VM (driven with `asyncio.run`, no pytest plugin)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import hutch
from conftest import Daemon


def test_async_sandbox_exec_stream_files(daemon: Daemon, tmp_path: Path) -> None:
    async def main() -> str:
        async with hutch.AsyncClient(socket=daemon.socket) as client:
            async with hutch.AsyncSandbox.create(client=client, labels={"suite": "async"}) as sb:
                res = await sb.exec(["sh", "-c", "echo $((6*7))"])
                assert (res.exit_code, res.stdout) == (0, "42\n")

                proc = await sb.stream("cat; echo err >&2")
                await proc.write(b"async stdin")
                await proc.close_stdin()
                chunks = [c async for c in proc]
                assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"async stdin"
                assert [c.data for c in chunks if c.stream == "stderr"] == [b"err\n"]
                assert proc.exit is not None and proc.exit.exit_code == 0
                await proc.close()

                async with await sb.pty(["sh", "-c", "read x; stty size"], rows=10, cols=20) as tty:
                    await tty.resize(33, 44)
                    await tty.write(b"\n")
                    assert b"33 44" in (await tty.wait()).stdout

                await sb.write_file("/tmp/a.txt", "async file")
                assert await sb.read_file("/tmp/a.txt") == b"async file"
                (tmp_path / "up").mkdir()
                (tmp_path / "up" / "f").write_text("tree")
                await sb.upload_dir(tmp_path / "up", "/tmp/up")
                await sb.download_dir("/tmp/up", tmp_path / "down")
                assert (tmp_path / "down" / "f").read_text() == "tree"
                assert [e.name for e in await sb.list_files("/tmp/up")] == ["f"]

                with pytest.raises(hutch.CommandNotFound):
                    await sb.stream(["/no/such/program"])
                return sb.id

    sid = asyncio.run(main())
    with hutch.Client(socket=daemon.socket) as c:
        assert c.sandbox(sid).info.status == "destroyed"


def test_awaited_create_is_not_destroyed_until_asked(daemon: Daemon) -> None:
    async def main() -> None:
        async with hutch.AsyncClient(socket=daemon.socket) as client:
            sb = await hutch.AsyncSandbox.create(client=client)
            try:
                assert (await client.sandbox(sb.id)).info.status == "running"
            finally:
                assert (await sb.destroy()).status == "destroyed"

    asyncio.run(main())
