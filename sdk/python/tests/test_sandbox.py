"""The blocking client on real VMs: exec, streaming with stdin and signals, PTY, files,
directory transfer, lifecycle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import hutch


def test_exec_returns_exit_code_and_both_streams(sandbox: hutch.Sandbox) -> None:
    res = sandbox.exec("echo out; echo err >&2; exit 3")
    assert (res.exit_code, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert not res.truncated and not res.timed_out and not res.ok
    res = sandbox.exec(["cat"], stdin="from stdin", env={"X": "1"}, cwd="/tmp")
    assert res.stdout == "from stdin"
    assert sandbox.exec("echo $X $(pwd)", env={"X": "1"}, cwd="/tmp").stdout == "1 /tmp\n"


def test_exec_flags_truncation_and_timeout(sandbox: hutch.Sandbox) -> None:
    res = sandbox.exec("head -c 1100000 /dev/zero | tr '\\0' a")
    assert res.truncated and res.exit_code == 0
    assert len(res.stdout) == 1 << 20
    res = sandbox.exec(["sleep", "30"], timeout=1)
    assert res.timed_out and res.exit_code is None and res.signal is not None


def test_stream_yields_chunks_takes_stdin_and_exits(sandbox: hutch.Sandbox) -> None:
    with sandbox.stream("cat; echo bye >&2; exit 7") as proc:
        assert proc.pid > 0
        proc.write(b"line one\n")
        proc.write("line two\n")
        proc.close_stdin()
        chunks = list(proc)
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    assert (out, err) == (b"line one\nline two\n", b"bye\n")
    assert proc.exit == hutch.Exit(exit_code=7, signal=None, timed_out=False)


def test_stream_chunks_arrive_before_the_exit(sandbox: hutch.Sandbox) -> None:
    with sandbox.stream("echo first; read x; echo second $x") as proc:
        it = iter(proc)
        first = next(it)
        assert first == hutch.Output("stdout", b"first\n") and proc.exit is None
        proc.write(b"go\n")
        result = proc.wait()
    assert result.stdout == b"second go\n" and result.ok


def test_stream_signal_kills_the_command(sandbox: hutch.Sandbox) -> None:
    with sandbox.stream(["sleep", "60"]) as proc:
        proc.signal(15)
        result = proc.wait()
    assert result.signal == 15 and result.exit_code is None


def test_pty_session_resizes(sandbox: hutch.Sandbox) -> None:
    with sandbox.pty(["sh", "-c", "stty size; read x; stty size"], rows=24, cols=80) as proc:
        seen = b""
        for chunk in proc:
            assert chunk.stream == "stdout"
            seen += chunk.data
            if b"24 80" in seen:
                break
        proc.resize(40, 100)
        proc.write(b"go\n")
        rest = proc.wait()
    assert b"40 100" in rest.stdout and rest.ok


def test_files_round_trip_and_list(sandbox: hutch.Sandbox) -> None:
    data = bytes(range(256)) * 1000
    sandbox.exec("mkdir -p /tmp/files")
    sandbox.write_file("/tmp/files/blob.bin", data, mode=0o600)
    sandbox.write_file("/tmp/files/note.txt", "hello")
    assert sandbox.read_file("/tmp/files/blob.bin") == data
    assert sandbox.read_file("/tmp/files/note.txt") == b"hello"
    sandbox.exec("mkdir /tmp/files/sub; ln -s note.txt /tmp/files/link")
    entries = {e.name: e for e in sandbox.list_files("/tmp/files")}
    assert sorted(entries) == ["blob.bin", "link", "note.txt", "sub"]
    assert (entries["blob.bin"].type, entries["blob.bin"].size, entries["blob.bin"].mode) == (
        "file",
        len(data),
        0o600,
    )
    assert entries["sub"].type == "dir" and entries["link"].type == "symlink"
    assert entries["note.txt"].path == "/tmp/files/note.txt"
    with pytest.raises(hutch.NotFound):
        sandbox.list_files("/no/such/dir")


def test_directory_upload_and_download(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.sh").write_text("#!/bin/sh\necho deep\n")
    os.chmod(src / "a" / "b" / "deep.sh", 0o755)
    os.symlink("a/b/deep.sh", src / "run")
    sandbox.upload_dir(src, "/tmp/tree")
    assert sandbox.exec("/tmp/tree/run").stdout == "deep\n"
    sandbox.exec("echo made in guest > /tmp/tree/a/guest.txt")
    dst = tmp_path / "dst"
    sandbox.download_dir("/tmp/tree", dst)
    assert (dst / "top.txt").read_text() == "top"
    assert (dst / "a" / "guest.txt").read_text() == "made in guest\n"
    assert os.readlink(dst / "run") == "a/b/deep.sh"
    assert os.stat(dst / "a" / "b" / "deep.sh").st_mode & 0o777 == 0o755


def test_pause_resume_and_refresh(sandbox: hutch.Sandbox) -> None:
    assert sandbox.pause().status == "paused"
    try:
        with pytest.raises(hutch.Conflict) as e:
            sandbox.exec("true")
        assert (e.value.code, e.value.status) == ("conflict", 409)
    finally:
        assert sandbox.resume().status == "running"
    assert sandbox.refresh().status == "running" and sandbox.info.status == "running"
    assert b"" != sandbox.console()


def test_listing_by_label(client: hutch.Client, sandbox: hutch.Sandbox) -> None:
    ids = [sb.id for sb in client.sandboxes(labels={"suite": "python-sdk"})]
    assert ids == [sandbox.id]
    assert sandbox.id in [sb.id for sb in client.sandboxes(state="running")]
    assert client.sandbox(sandbox.id).info.spec["labels"] == {"suite": "python-sdk"}


def test_context_manager_destroys_on_exit_also_after_an_error(client: hutch.Client) -> None:
    with pytest.raises(ZeroDivisionError):
        with hutch.Sandbox.create(client=client) as sb:
            assert sb.exec("echo up").stdout == "up\n"
            raise ZeroDivisionError("inside the block")
    assert sb.id not in [s.id for s in client.sandboxes(state="running")]
    assert client.sandbox(sb.id).info.status == "destroyed"


def test_the_journal_records_execs_and_verifies_while_unsealed(sandbox: hutch.Sandbox) -> None:
    sandbox.exec(["sh", "-c", "echo journalled"])
    log = sandbox.audit(kind="exec")
    kinds = [r["kind"] for r in log.records]
    assert "exec.start" in kinds and "exec.end" in kinds, kinds
    assert all(r["kind"].startswith("exec") for r in log.records)
    started = [r for r in log.records if r["kind"] == "exec.start"]
    assert ["sh", "-c", "echo journalled"] in [
        r["attrs"].get("process.command_args") for r in started
    ]
    assert log.host_key
    later = sandbox.audit(since_seq=log.records[-1]["seq"])
    assert [r["seq"] for r in later.records][0] == log.records[-1]["seq"]
    report = sandbox.audit_verify()
    assert (report.status, report.failures, report.sealed) == ("unsealed", [], False)
    assert report.records >= len(log.records)
    # No secrets attached: the broker has nothing to say.
    assert sandbox.secret_log() == []


def test_an_exec_is_recorded_as_asciicast_named_by_its_journal(sandbox: hutch.Sandbox) -> None:
    sandbox.exec(["sh", "-c", "echo recorded"])
    end = sandbox.audit(kind="exec.end").records[-1]
    cast = sandbox.recording(end["attrs"]["hutch.exec.id"])
    header, *events = [json.loads(line) for line in cast.decode().splitlines()]
    assert header["version"] == 2 and header["width"] > 0
    assert ["o", "recorded\n"] in [e[1:] for e in events]
    assert sandbox.recording() == cast  # the latest exec
    assert end["attrs"]["hutch.recording.bytes"] == len(cast)
