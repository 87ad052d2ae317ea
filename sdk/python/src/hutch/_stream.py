"""The exec WebSocket's frames, independent of how the socket is driven (sync or async).

The client's first text frame is an `ExecStart`; then binary frames are stdin and text frames
are control messages (`eof`, `resize`, `signal`). The daemon sends `started`, output as binary
frames whose first byte is the stream (1 stdout, 2 stderr), then `exit` (or `error`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from . import _models as m
from ._errors import HutchError, InternalError, error_from, error_from_body

STDOUT = 1
STDERR = 2


@dataclass(frozen=True)
class Output:
    """A chunk of a streaming command's output."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Exit:
    """How a streaming command ended."""

    exit_code: int | None
    signal: int | None
    timed_out: bool


@dataclass
class StreamResult:
    """A streamed command's exit and the output read by `wait()` (what the caller had not
    already iterated over)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        """Whether it exited 0."""
        return self.exit_code == 0


@dataclass
class Collector:
    """Gathers output chunks for `wait()`."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def add(self, out: Output) -> None:
        """Appends one chunk to its stream."""
        (self.stdout if out.stream == "stdout" else self.stderr).extend(out.data)

    def result(self, exit: Exit) -> StreamResult:
        """The result with everything gathered."""
        return StreamResult(
            exit.exit_code, exit.signal, exit.timed_out, bytes(self.stdout), bytes(self.stderr)
        )


def start_frame(start: m.ExecStart) -> str:
    """The first frame: what to run."""
    return json.dumps(m.to_json(start))


def control(kind: Literal["eof", "resize", "signal"], **fields: int) -> str:
    """A control frame."""
    return json.dumps({"type": kind, **fields})


def decode(frame: bytes | str) -> Output | Exit | int:
    """One daemon frame: output, the exit, or the started process's pid. An `error` event
    raises its typed exception."""
    if isinstance(frame, bytes):
        if frame[:1] == bytes([STDOUT]):
            return Output("stdout", frame[1:])
        if frame[:1] == bytes([STDERR]):
            return Output("stderr", frame[1:])
        raise InternalError("exec stream: output frame without a stream byte")
    event = json.loads(frame)
    kind = event.get("type")
    if kind == "started":
        return int(event["pid"])
    if kind == "exit":
        return Exit(event.get("exit_code"), event.get("signal"), bool(event.get("timed_out")))
    if kind == "error":
        raise error_from(str(event["code"]), str(event["message"]))
    raise InternalError(f"exec stream: unexpected event {kind!r}")


def started(frame: bytes | str) -> int:
    """The pid from the first daemon frame, which must be `started` (or an error, raised)."""
    pid = decode(frame)
    if not isinstance(pid, int):
        raise InternalError("exec stream: the first event was not `started`")
    return pid


def closed_early(reason: object) -> HutchError:
    """The error for a socket that closed before the exit event."""
    return InternalError(f"exec stream closed before the command exited: {reason}")


class Frames(Protocol):
    """Reads a streamed HTTP answer chunk by chunk."""

    def feed(self, chunk: bytes) -> None:
        """Takes the next chunk of the body."""

    def finish(self) -> Any:
        """The result, once the body ended."""


TASK_RECORD = 3
TASK_ERROR = 4
MAX_TASK_FRAME = 64 << 20


class TaskFrames:
    """A streamed task answer (`POST /v1/tasks?stream=true`): frames `u8 kind ‖ u32 LE length ‖
    bytes`, output (1 stdout, 2 stderr) handed to `on_output` as it comes, then the record (3)
    or an API error (4)."""

    def __init__(self, on_output: Callable[[Output], None]) -> None:
        self._on_output = on_output
        self._buf = bytearray()
        self._record: m.TaskRecord | None = None

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while len(self._buf) >= 5 and self._record is None:
            kind, size = self._buf[0], int.from_bytes(self._buf[1:5], "little")
            if size > MAX_TASK_FRAME:
                raise InternalError(f"task stream: a frame of {size} bytes")
            if len(self._buf) < 5 + size:
                return
            data = bytes(self._buf[5 : 5 + size])
            del self._buf[: 5 + size]
            if kind in (STDOUT, STDERR):
                self._on_output(Output("stdout" if kind == STDOUT else "stderr", data))
            elif kind == TASK_RECORD:
                self._record = m.from_json(m.TaskRecord, json.loads(data))
            elif kind == TASK_ERROR:
                raise error_from_body(0, data)
            else:
                raise InternalError(f"task stream: unknown frame kind {kind}")

    def finish(self) -> m.TaskRecord:
        if self._record is None:
            raise InternalError("the task stream ended before its record")
        return self._record
