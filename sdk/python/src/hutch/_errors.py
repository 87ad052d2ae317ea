"""The API's errors as exceptions: one class per stable error code, under `HutchError`."""

from __future__ import annotations

import json


class HutchError(Exception):
    """Any failure the daemon reported, or that kept the client from reaching it.

    `code` is the API's stable error code (`ErrorCode` in `/openapi.json`), `status` the HTTP
    status (0 when the daemon answered on a WebSocket or was never reached).
    """

    code: str = "internal"

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code


class BadRequest(HutchError):
    """The request was malformed (400)."""

    code = "bad_request"


class InvalidSpec(HutchError):
    """A sandbox, template or task spec was refused (400)."""

    code = "invalid_spec"


class UnsafePath(HutchError):
    """A guest path or archive entry was refused (400)."""

    code = "unsafe_path"


class Unauthorized(HutchError):
    """No token, or a wrong, removed or expired one (401)."""

    code = "unauthorized"


class Forbidden(HutchError):
    """The token's scope does not cover this (403)."""

    code = "forbidden"


class NotFound(HutchError):
    """No such sandbox, template, task or route (404)."""

    code = "not_found"


class Conflict(HutchError):
    """Not legal in the sandbox's current state (409)."""

    code = "conflict"


class OverCapacity(HutchError):
    """The daemon's admission limits refused a sandbox (429)."""

    code = "over_capacity"


class ExecFailed(HutchError):
    """The command could not be started (422)."""

    code = "exec_failed"


class CommandNotFound(HutchError):
    """The command does not exist in the guest (422)."""

    code = "command_not_found"


class InternalError(HutchError):
    """The daemon failed (500)."""

    code = "internal"


class Timeout(HutchError):
    """The guest did not answer within the deadline (504)."""

    code = "timeout"


class ConnectError(HutchError):
    """The daemon could not be reached (no stable code: nothing answered)."""

    code = "connect"


ERRORS: dict[str, type[HutchError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        InvalidSpec,
        UnsafePath,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        OverCapacity,
        ExecFailed,
        CommandNotFound,
        InternalError,
        Timeout,
    )
}
"""Every stable error code the API sends, to its exception class."""


def error_from(code: str, message: str, status: int = 0) -> HutchError:
    """The exception for an API error `{code, message}`; an unknown (newer) code keeps its
    code on the base class."""
    cls = ERRORS.get(code)
    if cls is None:
        return HutchError(message, status=status, code=code)
    return cls(message, status=status)


def error_from_body(status: int, body: bytes) -> HutchError:
    """The exception for a non-2xx answer: its `ApiError` body, or the status and the start of
    whatever else it said."""
    try:
        err = json.loads(body)
        return error_from(str(err["code"]), str(err["message"]), status)
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace")
        return InternalError(f"HTTP {status}: {text}", status=status)
