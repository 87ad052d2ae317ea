"""A real `hutch daemon` with a private HUTCH_HOME (sharing the host's images and accelerator
probe, as the Rust suites' `private_home`), on its Unix socket and on loopback TCP; after the
session, nothing of it may be left: no VMM process, run dir or network namespace."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import hutch

REPO = Path(__file__).resolve().parents[3]


def hutch_bin() -> str:
    """`$HUTCH_BIN`, else the workspace's debug build."""
    target = os.environ.get("CARGO_TARGET_DIR", REPO / "target")
    return os.environ.get("HUTCH_BIN", str(Path(target) / "debug" / "hutch"))


def real_home() -> Path:
    """The host's home, whose images and accelerator probe the private home shares."""
    return Path(os.environ.get("HUTCH_HOME", "/var/lib/hutch"))


def hutch_netns() -> set[str]:
    """Named network namespaces of Hutch's (sandboxes' and spares')."""
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("hutch")}
    except FileNotFoundError:
        return set()


def leaks(home: Path) -> list[str]:
    """VMM processes whose command line names a run dir under `home`, and run dirs left."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(f"{home / d}/" in cmdline for d in ("vms", "local")):
            found.append(f"process {pid}: {cmdline}")
    for d in ("vms", "local"):
        found += [f"run dir {p}" for p in (home / d).glob("*")]
    return found


@dataclass
class Daemon:
    """The running daemon: its home, socket and TCP address."""

    home: Path
    socket: str
    tcp: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """The environment of a `hutch` command on this home."""
        env = dict(os.environ, HUTCH_HOME=str(self.home))
        env.pop("HUTCH_HOST", None)
        env.pop("HUTCH_TOKEN", None)
        return env

    def token(self, label: str | None = None) -> str:
        """A new TCP token (admin, or limited to sandboxes labelled `label`, `k=v`)."""
        args = [hutch_bin(), "token", "create"] + (["--label", label] if label else [])
        out = subprocess.run(args, env=self.env(), check=True, capture_output=True, text=True)
        return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    if os.environ.get("HUTCH_SKIP_VM_TESTS"):
        pytest.skip("HUTCH_SKIP_VM_TESTS is set")
    netns_before = hutch_netns()
    home = Path(tempfile.mkdtemp(prefix="hh", dir="/tmp"))
    (home / "images").symlink_to(real_home() / "images")
    if (real_home() / "accel.json").exists():
        shutil.copy(real_home() / "accel.json", home / "accel.json")
    tcp = f"127.0.0.1:{free_port()}"
    d = Daemon(home, str(home / "hutch.sock"), tcp, None)  # type: ignore[arg-type]
    args = [
        hutch_bin(),
        "daemon",
        "--listen-tcp",
        tcp,
        "--max-sandboxes",
        "16",
        "--net-spares",
        "0",
    ]
    d.process = subprocess.Popen(args, env=d.env(), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(d.socket)
            break
        except OSError:
            assert d.process.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.05)
    try:
        yield d
    finally:
        with hutch.Client(socket=d.socket) as c:
            left = [sb.id for sb in c.sandboxes() if sb.info.status != "destroyed"]
            for sb in c.sandboxes():
                if sb.info.status != "destroyed":
                    sb.destroy()
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(timeout=60)
        found = leaks(home) + [f"network namespace {n}" for n in hutch_netns() - netns_before]
        if not found:
            shutil.rmtree(home, ignore_errors=True)
        assert not left, f"sandboxes left by the tests: {left}"
        assert not found, f"left behind: {found}"


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> Iterator[hutch.Client]:
    """An admin client on the daemon's Unix socket."""
    with hutch.Client(socket=daemon.socket) as c:
        yield c


@pytest.fixture(scope="module")
def sandbox(client: hutch.Client) -> Iterator[hutch.Sandbox]:
    """One sandbox (no network) shared by a module's tests."""
    with hutch.Sandbox.create(client=client, labels={"suite": "python-sdk"}) as sb:
        yield sb
