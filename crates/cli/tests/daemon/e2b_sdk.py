"""An E2B program, unchanged, against a Hutch daemon (the README's "E2B SDK" example).

Configured only by E2B's own environment variables: E2B_API_URL and E2B_SANDBOX_URL (the
daemon's --listen-e2b address) and E2B_API_KEY (a hutch token).
"""

import importlib.metadata
import time
from datetime import datetime, timezone

# README:begin
from e2b import Sandbox

sandbox = Sandbox.create(metadata={"suite": "e2b"}, timeout=300)

result = sandbox.commands.run("echo hi")
assert (result.stdout, result.exit_code) == ("hi\n", 0), result
# README:end
from e2b import PtySize, SandboxQuery
from e2b.exceptions import AuthenticationException, SandboxException
from e2b.sandbox.commands.command_handle import CommandExitException

# A background command whose output streams while it runs.
seen = []
handle = sandbox.commands.run("echo one; sleep 2; echo two", background=True)
result = handle.wait(on_stdout=lambda out: seen.append((time.monotonic(), out)))
done = time.monotonic()
assert "".join(out for _, out in seen) == "one\ntwo\n", seen
assert seen[0][1] == "one\n" and done - seen[0][0] > 1.5, ("not streamed", seen)
assert result.exit_code == 0

# A failing command, and one killed by its pid.
try:
    sandbox.commands.run("echo oops >&2; exit 3")
    raise AssertionError("a failing command did not raise")
except CommandExitException as e:
    assert (e.exit_code, e.stderr) == (3, "oops\n"), e
sleeper = sandbox.commands.run("sleep 600", background=True)
assert sandbox.commands.kill(sleeper.pid)
try:
    sleeper.wait()
    raise AssertionError("a killed command did not raise")
except CommandExitException as e:
    assert e.exit_code != 0

# Stdin, written while the command runs.
cat = sandbox.commands.run("cat", background=True, stdin=True)
sandbox.commands.send_stdin(cat.pid, "piped\n")
sandbox.commands.close_stdin(cat.pid)
assert cat.wait().stdout == "piped\n"

sandbox.files.write("/tmp/e2b/hello.txt", "hello from e2b\n")
assert sandbox.files.read("/tmp/e2b/hello.txt") == "hello from e2b\n"
assert [e.name for e in sandbox.files.list("/tmp/e2b")] == ["hello.txt"]
assert sandbox.files.exists("/tmp/e2b/hello.txt")
assert not sandbox.files.exists("/tmp/e2b/nothing")
assert sandbox.commands.run("cat /tmp/e2b/hello.txt").stdout == "hello from e2b\n"
assert sandbox.files.make_dir("/tmp/e2b/dir") and not sandbox.files.make_dir("/tmp/e2b/dir")
sandbox.files.rename("/tmp/e2b/dir", "/tmp/e2b/moved")
assert sandbox.files.get_info("/tmp/e2b/moved").type.value == "dir"
sandbox.files.remove("/tmp/e2b/moved")
assert not sandbox.files.exists("/tmp/e2b/moved")

# Paused, then connected to again: its processes and files are as they were.
assert sandbox.pause()
assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"
sandbox = Sandbox.connect(sandbox.sandbox_id)
assert sandbox.files.read("/tmp/e2b/hello.txt") == "hello from e2b\n"

# What Hutch does not serve fails at once, with E2B's own exception.
for unsupported in (
    lambda: sandbox.files.watch_dir("/tmp"),
    lambda: sandbox.pty.create(PtySize(rows=24, cols=80)),
):
    started = time.monotonic()
    try:
        unsupported()
        raise AssertionError("an unsupported call succeeded")
    except SandboxException as e:
        assert "not supported" in str(e) and time.monotonic() - started < 5, e

sandbox.set_timeout(60)
info = sandbox.get_info()
left = (info.end_at - datetime.now(timezone.utc)).total_seconds()
assert 40 < left <= 60, ("set_timeout did not take", info.end_at)
assert info.metadata == {"suite": "e2b"}, info
ids = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"})).next_items()]
assert ids == [sandbox.sandbox_id], ids

assert sandbox.kill()
assert not Sandbox.kill(sandbox.sandbox_id)

try:
    Sandbox.create(api_key="not-a-hutch-token")
    raise AssertionError("a wrong API key was accepted")
except AuthenticationException:
    pass

print(f"e2b sdk {importlib.metadata.version('e2b')}: ok")
