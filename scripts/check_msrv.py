#!/usr/bin/env python3
"""Checks that the declared MSRV is true as far as it can be without that toolchain.

The workspace declares `rust-version` in Cargo.toml and every crate inherits it. Clippy's
`incompatible_msrv` lint catches standard-library APIs newer than it; this catches the rest
that is visible from here: a dependency in Cargo.lock that itself needs a newer Rust.
"""
import json
import subprocess
import sys


def version(text):
    """`1.88` and `1.88.0` alike: (1, 88, 0)."""
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    declared = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
    if len(declared) != 1 or None in declared:
        sys.exit(f"every workspace crate must inherit one rust-version, found {sorted(map(str, declared))}")
    msrv = declared.pop()
    newer = sorted(
        f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
        for p in meta["packages"]
        if p.get("rust_version") and version(p["rust_version"]) > version(msrv)
    )
    if newer:
        sys.exit(f"the declared MSRV {msrv} is not true:\n  " + "\n  ".join(newer))
    print(f"MSRV {msrv}: no dependency needs a newer Rust")


main()
