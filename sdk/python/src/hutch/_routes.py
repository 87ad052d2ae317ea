"""Every route the SDK calls, with the fields it sends and reads. `tests/test_contract.py`
checks each one against the daemon's `/openapi.json`."""

from __future__ import annotations

from dataclasses import dataclass

from . import _models as m


@dataclass(frozen=True)
class Route:
    """One API operation: its method and path template, the query parameters the SDK may
    send, the JSON body type it sends (`request`), the type it reads from a 2xx answer
    (`response`, a list of them when `many`), or the content type of a raw body either way."""

    method: str
    path: str
    query: tuple[str, ...] = ()
    request: type | None = None
    response: type | None = None
    many: bool = False
    body_type: str | None = None
    answer_type: str | None = None


_S = "/v1/sandboxes/{id}"

CREATE = Route("POST", "/v1/sandboxes", request=m.CreateSandbox, response=m.SandboxInfo)
LIST = Route("GET", "/v1/sandboxes", query=("state", "label"), response=m.SandboxInfo, many=True)
GET = Route("GET", _S, response=m.SandboxInfo)
DESTROY = Route("DELETE", _S, response=m.SandboxInfo)
LIFECYCLE = {
    action: Route("POST", f"{_S}/{action}", response=m.SandboxInfo)
    for action in ("pause", "resume", "stop", "start", "suspend")
}
EXEC = Route("POST", f"{_S}/exec", request=m.ExecBody, response=m.ExecResult)
EXEC_WS = Route("GET", f"{_S}/exec/ws")
FORK = Route("POST", f"{_S}/fork", request=m.ForkBody, response=m.SandboxInfo, many=True)
CONSOLE = Route("GET", f"{_S}/console", answer_type="application/octet-stream")
PUT_FILE = Route("PUT", f"{_S}/files", query=("path", "mode"), body_type="application/octet-stream")
GET_FILE = Route("GET", f"{_S}/files", query=("path",), answer_type="application/octet-stream")
PUT_ARCHIVE = Route("PUT", f"{_S}/archive", query=("path",), body_type="application/x-tar")
GET_ARCHIVE = Route("GET", f"{_S}/archive", query=("path",), answer_type="application/x-tar")
SET_NETWORK = Route("PUT", f"{_S}/network", request=m.NetworkPolicy, response=m.SandboxInfo)
NETWORK_LOG = Route("GET", f"{_S}/network/log", response=m.NetEvent, many=True)
SECRET_LOG = Route("GET", f"{_S}/secrets/log", response=m.BrokerEvent, many=True)
AUDIT = Route("GET", f"{_S}/audit", query=("from", "kind"), response=m.AuditLog)
AUDIT_VERIFY = Route("GET", f"{_S}/audit/verify", response=m.AuditReport)
RECORDING = Route("GET", f"{_S}/recordings/{{exec}}", answer_type="application/x-asciicast")
PORTS = Route("GET", f"{_S}/ports", response=m.PortMapping, many=True)
PUBLISH = Route("PUT", f"{_S}/ports/{{guest_port}}", request=m.PublishPort, response=m.PortMapping)
UNPUBLISH = Route("DELETE", f"{_S}/ports/{{guest_port}}", response=m.PortMapping, many=True)
TEMPLATES = Route("GET", "/v1/templates", response=m.TemplateInfo, many=True)
CREATE_TEMPLATE = Route("POST", "/v1/templates", request=m.TemplateSpec, response=m.TemplateInfo)
TEMPLATE = Route("GET", "/v1/templates/{name}", response=m.TemplateInfo)
REMOVE_TEMPLATE = Route("DELETE", "/v1/templates/{name}", response=m.TemplateInfo)
SET_POOL = Route("PUT", "/v1/templates/{name}/pool", request=m.PoolBody, response=m.TemplateInfo)
RUN_TASK = Route(
    "POST",
    "/v1/tasks",
    query=("stream",),
    body_type="multipart/form-data",
    response=m.TaskRecord,
    answer_type="application/octet-stream",  # with stream=true: output frames, then the record
)
TASKS = Route("GET", "/v1/tasks", response=m.TaskRecord, many=True)
TASK = Route("GET", "/v1/tasks/{id}", response=m.TaskRecord)
TASK_DIFF = Route("GET", "/v1/tasks/{id}/diff", answer_type="text/plain")

ALL: list[Route] = [v for v in globals().values() if isinstance(v, Route)] + list(
    LIFECYCLE.values()
)
"""Every route above."""
