"""A round trip through the Python client openapi-python-client generated from the daemon's
OpenAPI document (scripts/api_contract.sh): typed answers, typed errors, a multipart upload.

Usage: api_roundtrip.py BASE_URL TOKEN (the daemon runs with --max-sandboxes 0).
"""

import io
import sys

from hutch_client import AuthenticatedClient
from hutch_client.api.sandboxes import create_sandbox, get_sandbox, list_sandboxes
from hutch_client.api.tasks import run_task
from hutch_client.api.templates import list_templates
from hutch_client.models import ApiError, CreateSandbox, ErrorCode, TaskSpec, TaskUpload
from hutch_client.types import File


def expect(cond, what):
    if not cond:
        sys.exit(f"api_roundtrip: {what}")


def main(base, token):
    client = AuthenticatedClient(base_url=base, token=token)

    listed = list_sandboxes.sync_detailed(client=client)
    expect(listed.status_code == 200 and listed.parsed == [], f"list: {listed}")
    templates = list_templates.sync_detailed(client=client)
    expect(templates.status_code == 200 and isinstance(templates.parsed, list), "templates")

    missing = get_sandbox.sync_detailed(id="sb-00000000", client=client)
    expect(missing.status_code == 404, f"unknown sandbox: {missing.status_code}")
    expect(
        isinstance(missing.parsed, ApiError) and missing.parsed.code == ErrorCode.NOT_FOUND,
        f"a 404 is a typed ApiError: {missing.parsed!r}",
    )

    body = CreateSandbox.from_dict({"idempotency_key": "roundtrip", "labels": {"team": "a"}})
    full = create_sandbox.sync_detailed(client=client, body=body)
    expect(
        full.status_code == 429 and full.parsed.code == ErrorCode.OVER_CAPACITY,
        f"create on a full daemon: {full.status_code} {full.parsed!r}",
    )

    # The multipart task upload arrives whole: the task is recorded with its spec (and fails,
    # as the daemon has room for no sandbox).
    upload = TaskUpload(
        spec=TaskSpec.from_dict({"command": ["true"]}),
        workspace=File(payload=io.BytesIO(b"\0" * 1024), file_name="workspace.tar",
                       mime_type="application/x-tar"),
    )
    task = run_task.sync_detailed(client=client, body=upload)
    expect(
        task.status_code == 201 and task.parsed.spec.command == ["true"]
        and "capacity" in task.parsed.error,
        f"task upload: {task.status_code} {task.parsed!r}",
    )

    anon = AuthenticatedClient(base_url=base, token="hutch_not_a_token")
    refused = list_sandboxes.sync_detailed(client=anon)
    expect(
        refused.status_code == 401 and refused.parsed.code == ErrorCode.UNAUTHORIZED,
        f"unknown token: {refused.status_code}",
    )
    print("api_roundtrip: ok")


if __name__ == "__main__":
    main(*sys.argv[1:3])
