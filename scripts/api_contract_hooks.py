"""Schemathesis hooks for scripts/api_contract.sh: how to send the API's binary bodies."""

import json

import schemathesis


@schemathesis.serializer("application/x-tar", "application/octet-stream")
def binary(ctx, value):
    """Bytes as they are; anything else generated for a binary body as its JSON text."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()
