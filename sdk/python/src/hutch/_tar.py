"""Directories as tar archives: packed for upload, unpacked after download with tarfile's
`data` filter (no absolute paths, `..`, devices, or links leaving the destination), since a
guest-made archive is untrusted input."""

from __future__ import annotations

import io
import os
import tarfile


def pack(directory: str | os.PathLike[str]) -> bytes:
    """`directory` as a tar archive whose root is `.` (what the daemon's checker takes)."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(str(directory))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(os.fspath(directory), arcname=".")
    return buf.getvalue()


def unpack(archive: bytes, dest: str | os.PathLike[str]) -> None:
    """Unpacks a (guest-made) archive into `dest`, refusing anything that would leave it."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("unpacking needs Python's tarfile data filter (3.11.4 or later)")
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(dest, filter="data")
