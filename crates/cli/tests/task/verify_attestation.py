"""Checks a Hutch task attestation with tooling nobody at Hutch wrote: securesystemslib's DSSE
envelope verification (threshold 2: the host key and the sandbox key) and `cryptography` for
the host key and the sandbox key's certificate.

argv: envelope.json host.key changeset.bin base-commit
Prints one JSON object: {"ok": true, ...facts} or {"ok": false, "error": ...}.
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey


def key(public: bytes) -> SSlibKey:
    keyid = hashlib.sha256(public).hexdigest()
    return SSlibKey(keyid, "ed25519", "ed25519", {"public": public.hex()})


def main() -> dict:
    envelope_path, host_key_path, changeset_path, base = sys.argv[1:5]
    with open(envelope_path) as f:
        envelope = Envelope.from_dict(json.load(f))
    with open(host_key_path) as f:
        seed = bytes.fromhex(f.read().strip())
    host_public = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    if envelope.payload_type != "application/vnd.in-toto+json":
        return {"ok": False, "error": f"payload type {envelope.payload_type}"}
    statement = json.loads(envelope.payload)
    predicate = statement["predicate"]
    sandbox = predicate["sandbox"]
    sandbox_public = bytes.fromhex(sandbox["publicKey"])
    # The host key certifies the sandbox key (the journal's certificate message).
    message = f"hutch.dev journal key v1\n{sandbox['id']}\n{sandbox['publicKey']}\n"
    Ed25519PublicKey.from_public_bytes(host_public).verify(
        bytes.fromhex(sandbox["certificate"]), message.encode()
    )
    verified = envelope.verify([key(host_public), key(sandbox_public)], 2)
    # A stranger's key in the sandbox's place does not make the threshold.
    stranger = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    try:
        envelope.verify([key(host_public), key(stranger)], 2)
        return {"ok": False, "error": "verified without the sandbox key"}
    except VerificationError:
        pass
    subjects = {s["name"]: s["digest"] for s in statement["subject"]}
    with open(changeset_path, "rb") as f:
        changeset = hashlib.sha256(f.read()).hexdigest()
    return {
        "ok": True,
        "verified_keys": sorted(verified),
        "type": statement["_type"],
        "predicate_type": statement["predicateType"],
        "changeset_matches": subjects.get("changeset.bin", {}).get("sha256") == changeset,
        "base_matches": subjects.get("base", {}).get("gitCommit") == base,
        "command": predicate["command"],
        "verdict": predicate["verdict"]["status"],
        "network": predicate["network"],
        "image_digest": predicate["image"].get("digest"),
        "checkpoint": predicate.get("journalCheckpoint") or "",
        "sandbox": sandbox["id"],
    }


try:
    print(json.dumps(main()))
except (VerificationError, InvalidSignature, ValueError, KeyError) as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
