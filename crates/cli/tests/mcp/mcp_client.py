"""Drives Hutch's MCP server with the official `mcp` Python package, as an MCP client would.

Usage: mcp_client.py CONFIG HUTCH_BIN HUTCH_HOME ADDR TOKEN SCOPED_TOKEN

CONFIG is the README's `mcpServers` snippet (JSON). Its `hutch` entry (`hutch mcp` over stdio)
is started with HUTCH_BIN on HUTCH_HOME; its `hutch-remote` entry (Streamable HTTP) is pointed
at ADDR with TOKEN in place of the snippet's placeholders. Over each, it initializes, lists
the tools, creates a sandbox, runs `python3 -c 'print(6*7)'` (and a long command that reports
progress, one it abandons, which must be killed, and one whose output is truncated), writes, reads and lists a file, uploads and
downloads a directory as a tar, reads the sandbox's resources, checks that bad arguments come
back as tool errors with the API's stable code, and destroys the sandbox. Over HTTP it also runs
a task and reads its verdict and diff. Then: `hutch mcp` with the older initialize handshake, a
token scoped to one label (no tasks, no other sandboxes), and a wrong token (refused). Prints
one line per check; exits non-zero at the first failure.
"""

import asyncio
import base64
import io
import json
import sys
import tarfile

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOOLS = {
    "create_sandbox", "list_sandboxes", "destroy_sandbox", "exec", "read_file", "write_file",
    "list_files", "upload_archive", "download_archive", "set_network_policy", "network_log",
    "run_task",
}


def tar_of(files):
    """A base64 tar of {path: text}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def untar(b64):
    """{path: text} of the regular files in a base64 tar."""
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64))) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read().decode()
                for m in tar.getmembers() if m.isfile()}


def check(ok, what):
    if not ok:
        raise AssertionError(what)


async def call(client, name, args, **kw):
    """A tool call that must succeed: its structured content."""
    r = await client.call_tool(name, args, **kw)
    check(not r.is_error, f"{name} failed: {r.content}")
    return r.structured_content


async def refused(client, name, args, code):
    """A tool call that must come back as a tool error (not a protocol error) with `code`."""
    r = await client.call_tool(name, args)
    check(r.is_error, f"{name} {args} should have failed: {r.structured_content}")
    got = r.structured_content["code"]
    check(got == code, f"{name} {args}: code {got}, not {code}: {r.structured_content}")


async def task(client, label):
    workspace = tar_of({"hello.txt": "old\n"})
    got = await call(client, "run_task", {
        "workspace_tar_base64": workspace, "timeout_secs": 120,
        "command": ["sh", "-c", "echo new > hello.txt && echo made > made.txt"],
        "verify": "grep -q new hello.txt",
    })
    record = got["record"]
    check(record["verdict"]["status"] == "accepted", f"verdict: {record['verdict']}")
    check(record["verify"]["passed"], f"verify: {record['verify']}")
    diff = got["diff"]
    check("+new" in diff and "-old" in diff and "made.txt" in diff, f"diff: {diff}")
    print(f"{label}: run_task accepted {record['verdict']['changes']} changes, verified, with their diff")


async def scenario(client, label):
    tools = (await client.list_tools()).tools
    names = {t.name for t in tools}
    check(TOOLS <= names, f"missing tools: {TOOLS - names}")
    for t in tools:
        check(t.description and t.input_schema.get("type") == "object", f"{t.name} undescribed")
    print(f"{label}: initialized, {len(tools)} tools listed")

    sandbox = await call(client, "create_sandbox", {
        "memory_mib": 256, "disk_mib": 256, "ttl_secs": 900, "labels": {"via": "mcp"},
    })
    sid = sandbox["id"]
    check(sandbox["state"]["state"] == "running", f"created {sandbox}")
    try:
        out = await call(client, "exec", {"sandbox_id": sid, "command": "python3 -c 'print(6*7)'"})
        check(out["exit_code"] == 0 and out["stdout"] == "42\n", f"exec: {out}")
        print(f"{label}: exec python3 -c 'print(6*7)' -> {out['stdout'].strip()}")

        ticks = []

        async def progress(done, total, message):
            ticks.append((done, total, message))

        out = await call(client, "exec", {"sandbox_id": sid, "command": "sleep 3; echo done",
                                          "timeout_secs": 60}, progress_callback=progress)
        check(out["stdout"] == "done\n", f"long exec: {out}")
        check(len(ticks) >= 2 and ticks[0][1] == 60, f"progress: {ticks}")
        print(f"{label}: a 3 s exec reported progress {len(ticks)} times")

        # A call the client abandons is cancelled, and its process killed.
        with anyio.move_on_after(1.5):
            await client.call_tool("exec", {"sandbox_id": sid, "command": "sleep 300"})
            check(False, "sleep 300 returned")
        alive = "for f in /proc/[0-9]*/comm; do [ \"$(cat $f 2>/dev/null)\" = sleep ] && echo alive; done; true"
        for _ in range(50):
            out = await call(client, "exec", {"sandbox_id": sid, "command": alive})
            if out["stdout"] == "":
                break
            await asyncio.sleep(0.1)
        check(out["stdout"] == "", f"the abandoned exec still runs: {out}")
        print(f"{label}: an abandoned exec is cancelled and its process killed")

        out = await call(client, "exec", {"sandbox_id": sid, "max_output_bytes": 1000,
                                          "argv": ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x"]})
        check(out["stdout"] == "x" * 1000 and out["stdout_truncated"] and not out["stderr_truncated"]
              and "truncated" in out["notes"][0], f"truncation: {out}")
        print(f"{label}: output over max_output_bytes is cut and flagged")

        text = "héllo from MCP\n"
        await call(client, "write_file", {"sandbox_id": sid, "path": "/tmp/mcp/hello.txt",
                                          "content": text})
        got = await call(client, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/hello.txt"})
        check(got["content"] == text and got["encoding"] == "utf8" and not got["truncated"],
              f"read back: {got}")
        listing = await call(client, "list_files", {"sandbox_id": sid, "path": "/tmp/mcp"})
        check(listing["entries"] == [{"name": "hello.txt", "type": "file",
                                      "size": len(text.encode()), "mode": "644"}],
              f"listing: {listing}")
        print(f"{label}: wrote, read back and listed /tmp/mcp/hello.txt")

        tree = {"a.txt": "alpha\n", "sub/b.txt": "beta\n"}
        await call(client, "upload_archive", {"sandbox_id": sid, "path": "/work/proj",
                                              "tar_base64": tar_of(tree)})
        out = await call(client, "exec", {"sandbox_id": sid, "cwd": "/work/proj",
                                          "command": "cat sub/b.txt"})
        check(out["stdout"] == "beta\n", f"uploaded tree: {out}")
        got = await call(client, "download_archive", {"sandbox_id": sid, "path": "/work/proj"})
        check(untar(got["tar_base64"]) == tree, f"downloaded tree: {untar(got['tar_base64'])}")
        print(f"{label}: uploaded and downloaded a directory as a tar")

        state = await client.read_resource(f"hutch://sandboxes/{sid}")
        check(json.loads(state.contents[0].text)["state"]["state"] == "running", f"resource: {state}")
        console = await client.read_resource(f"hutch://sandboxes/{sid}/console")
        check(console.contents[0].mime_type == "text/plain", f"console: {console}")
        print(f"{label}: read the sandbox's state and console resources")

        await refused(client, "exec", {"sandbox_id": sid}, "bad_request")
        await refused(client, "exec", {"sandbox_id": sid, "command": "true", "bogus": 1},
                      "bad_request")
        await refused(client, "create_sandbox", {"cpus": "many"}, "bad_request")
        await refused(client, "exec", {"sandbox_id": "no-such-sandbox", "command": "true"},
                      "not_found")
        await refused(client, "read_file", {"sandbox_id": sid, "path": "relative/path"},
                      "unsafe_path")
        print(f"{label}: bad arguments are tool errors with stable codes")
    finally:
        gone = await call(client, "destroy_sandbox", {"sandbox_id": sid})
    check(gone["id"] == sid, f"destroy: {gone}")
    await refused(client, "exec", {"sandbox_id": sid, "command": "true"}, "conflict")
    print(f"{label}: destroyed {sid}")


def http_client(url, token):
    return Client(streamable_http_client(
        url, http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})))


async def main(config_path, hutch_bin, home, addr, token, scoped_token):
    with open(config_path) as f:
        servers = json.load(f)["mcpServers"]

    local = servers["hutch"]
    command = hutch_bin if local["command"] == "hutch" else local["command"]
    stdio = StdioServerParameters(command=command, args=local["args"], env={"HUTCH_HOME": home})
    async with Client(stdio) as client:
        print(f"stdio: negotiated {client.protocol_version}")
        await scenario(client, "stdio")
    async with Client(stdio, mode="legacy") as client:
        check(client.protocol_version < "2026", f"legacy handshake: {client.protocol_version}")
        check(len((await client.list_tools()).tools) == len(TOOLS), "legacy: tools")
        await refused(client, "destroy_sandbox", {"sandbox_id": "gone"}, "not_found")
        print(f"stdio: the initialize handshake ({client.protocol_version}) works too")

    remote = servers["hutch-remote"]
    check(remote["type"] == "http", f"remote entry: {remote}")
    url = remote["url"].replace("127.0.0.1:7070", addr)
    auth = remote["headers"]["Authorization"]
    check(auth == "Bearer YOUR_TOKEN", f"placeholder: {auth}")
    async with http_client(url, token) as client:
        await scenario(client, "http")
        await task(client, "http")

    # A token scoped to one label sees only its sandboxes and runs no tasks.
    async with http_client(url, scoped_token) as client:
        listed = await call(client, "list_sandboxes", {})
        check(listed["sandboxes"] == [], f"scoped listing: {listed}")
        await refused(client, "run_task", {"workspace_tar_base64": tar_of({}),
                                           "command": ["true"]}, "forbidden")
    print("http: a scoped token sees no other sandboxes and runs no tasks (forbidden)")

    # A wrong token: refused before MCP, with the API's error.
    resp = httpx2.post(url, headers={"Authorization": "Bearer wrong",
                                     "Accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    check(resp.status_code == 401 and resp.json()["code"] == "unauthorized",
          f"wrong token: {resp.status_code} {resp.text}")
    try:
        async with http_client(url, "wrong") as client:
            await client.list_tools()
        refused_by_client = False
    except Exception:  # the SDK's error for a 401 (its type varies across versions)
        refused_by_client = True
    check(refused_by_client, "the MCP client connected with a wrong token")
    print("http: a wrong token is refused (401 unauthorized)")


def leaves(e):
    """The exceptions inside (nested) exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in leaves(inner)]
    return [e]


if __name__ == "__main__":
    try:
        asyncio.run(main(*sys.argv[1:7]))
    except* AssertionError as group:
        for e in leaves(group):
            print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
