"""Templates, forks and agent tasks on real VMs."""

from __future__ import annotations

from pathlib import Path

import pytest

import hutch


def test_template_restore_and_fork(client: hutch.Client) -> None:
    name = "pysdk-tpl"
    info = client.create_template(name, provision="echo provisioned > /etc/pysdk-marker")
    try:
        assert info.spec["name"] == name and info.digest.startswith("sha256:")
        assert name in [t.spec["name"] for t in client.templates()]
        assert client.set_pool(name, 0).pool_size == 0
        with hutch.Sandbox.create(client=client, template=name) as sb:
            assert sb.info.spec["origin"]["template"] == name
            assert sb.read_file("/etc/pysdk-marker") == b"provisioned\n"
            sb.write_file("/tmp/before-fork", "parent state")
            children = sb.fork()
            assert len(children) == 1
            with children[0] as child:
                assert isinstance(child, hutch.Sandbox) and child.id != sb.id
                assert child.info.spec["origin"]["parent"] == sb.id
                assert child.read_file("/tmp/before-fork") == b"parent state"
                child.write_file("/tmp/child-only", "x")
            assert sb.exec(["test", "-e", "/tmp/child-only"]).exit_code == 1
    finally:
        assert client.remove_template(name).spec["name"] == name


def test_task_verdict_and_diff(client: hutch.Client, tmp_path: Path) -> None:
    (tmp_path / "README").write_text("workspace\n")
    output: list[hutch.Output] = []
    record = client.run_task(
        tmp_path,
        ["sh", "-c", "echo agent at work; echo added by the agent > added.txt"],
        verify="test -f added.txt && echo verified >&2",
        timeout_secs=120,
        on_output=output.append,
    )
    assert hutch.Output("stdout", b"agent at work\n") in output, output
    assert b"verified\n" in b"".join(o.data for o in output if o.stream == "stderr")
    assert record.verdict == {"status": "accepted", "changes": 1}, record
    assert record.verify is not None and record.verify["passed"]
    assert [c["path"] for c in record.changes] == ["added.txt"]
    diff = client.task_diff(record.id)
    assert "+added by the agent" in diff and "added.txt" in diff
    assert client.task(record.id).verdict == record.verdict
    assert record.id in [t.id for t in client.tasks()]


def test_task_without_streaming_and_its_errors(client: hutch.Client, tmp_path: Path) -> None:
    record = client.run_task(tmp_path, ["true"], timeout_secs=60)
    assert record.verdict == {"status": "empty"}
    with pytest.raises(hutch.NotFound):
        client.task("task-0000000000")
