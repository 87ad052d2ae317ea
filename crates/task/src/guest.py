# Hutch task helper, run in the guest. The host trusts nothing it prints: it re-checks every
# byte (see hutch-task's changeset module for the format).
#   python3 task.py diff ROOT BASELINE_JSON MAX_FILES MAX_FILE_BYTES  > stream
#   python3 task.py apply ROOT STREAM
import hashlib, json, os, shutil, stat, struct, sys

MAGIC, END = b"HUTCHCS1", b"HUTCHEND"


def walk(root):
    cur, special = {}, []

    def rec(rel):
        names = sorted(os.listdir(os.path.join(root, rel) if rel else root))
        if rel and not names and not rel.startswith(".git/"):
            cur[rel] = ("dir",)
        for name in names:
            p = rel + "/" + name if rel else name
            full = os.path.join(root, p)
            st = os.lstat(full)
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                lossy = p.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                special.append({"op": "special", "path": lossy, "kind": "non-UTF-8 name"})
                continue
            if stat.S_ISDIR(st.st_mode):
                rec(p)
            elif stat.S_ISREG(st.st_mode):
                cur[p] = ("file", st.st_mode & 0o777, st.st_size, full)
            elif stat.S_ISLNK(st.st_mode):
                cur[p] = ("symlink", os.readlink(full))
            else:
                kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device node"
                special.append({"op": "special", "path": p, "kind": kind})

    rec("")
    return cur, special


def in_git(p):
    return p == ".git" or p.startswith(".git/")


def git_changes(base, cur, special):
    """Changes inside .git: named, never carried (the host refuses them by name)."""
    out = []
    for p, c in sorted(cur.items()):
        if not in_git(p):
            continue
        b = base.get(p)
        if b is None:
            out.append({"path": p, "change": "added"})
        elif c[0] != b["kind"] or (c[0] == "symlink" and c[1] != b["target"]):
            out.append({"path": p, "change": "replaced"})
        elif c[0] == "file" and (c[2] != b["size"] or sha(c[3]) != b["sha256"]):
            out.append({"path": p, "change": "modified"})
        elif c[0] == "file" and c[1] != b["mode"]:
            out.append({"path": p, "change": "chmod"})
    out += [{"path": p, "change": "deleted"} for p in sorted(base) if in_git(p) and p not in cur]
    out += [{"path": s["path"], "change": "special"} for s in special if in_git(s["path"])]
    return out

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def diff(root, base_path, max_files, max_size):
    base = json.load(open(base_path))["entries"]
    cur, special = walk(root)
    git = git_changes(base, cur, special)
    entries = [s for s in special if not in_git(s["path"])]
    base = {p: b for p, b in base.items() if not in_git(p)}
    cur = {p: c for p, c in cur.items() if not in_git(p)}
    writes = []  # (path, mode, size, full, added)
    for p, c in sorted(cur.items()):
        b = base.get(p)
        if c[0] == "dir":
            if not (b and b["kind"] == "dir"):
                entries.append({"op": "mkdir", "path": p})
            continue
        if c[0] == "symlink":
            if not (b and b["kind"] == "symlink" and b["target"] == c[1]):
                entries.append({"op": "symlink", "path": p, "target": c[1]})
            continue
        _, mode, size, full = c
        if b and b["kind"] == "file" and b["size"] == size and sha(full) == b["sha256"]:
            if mode != b["mode"]:
                entries.append({"op": "chmod", "path": p, "mode": mode})
            continue
        writes.append((p, mode, size, full, b is None or b["kind"] == "dir"))
    isdir = lambda p: os.path.isdir(os.path.join(root, p)) and not os.path.islink(os.path.join(root, p))
    # An empty directory of the baseline that now has contents is still there.
    rmdirs = {p for p, b in base.items() if b["kind"] == "dir" and not isdir(p)}
    deleted = {p for p, b in base.items() if b["kind"] != "dir" and (p not in cur or cur[p][0] == "dir")}
    by_sha = {}
    for p in sorted(deleted):
        if base[p]["kind"] == "file":
            by_sha.setdefault(base[p]["sha256"], []).append(p)
    frames = []
    for p, mode, size, full, added in writes:
        if size > max_size:
            entries.append({"op": "oversize", "path": p, "size": size})
            continue
        if added and by_sha:
            h = sha(full)
            if by_sha.get(h):
                src = by_sha[h].pop(0)
                deleted.discard(src)
                entries.append({"op": "rename", "from": src, "to": p, "mode": mode})
                continue
        with open(full, "rb") as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            entries.append({"op": "oversize", "path": p, "size": len(data)})
            continue
        frames.append(data)
        entries.append({"op": "write", "path": p, "mode": mode, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    for p in sorted(deleted):
        entries.append({"op": "delete", "path": p})
    for p in sorted(rmdirs):
        entries.append({"op": "rmdir", "path": p})
    total = len(entries)
    listed = entries[: max_files + 1]
    kept = [e for e in listed if e["op"] == "write"]
    frames = frames[: len(kept)]
    manifest = {"entries": listed, "total": total}
    if git:
        manifest.update(git=git[:1000], git_total=len(git))
    manifest = json.dumps(manifest).encode()
    out = sys.stdout.buffer
    out.write(MAGIC + struct.pack("<Q", len(manifest)) + manifest)
    for data in frames:
        out.write(struct.pack("<Q", len(data)) + data)
    out.write(END)
    out.flush()


def prune(root, rel):
    d = os.path.dirname(rel)
    while d:
        try:
            os.rmdir(os.path.join(root, d))
        except OSError:
            return
        d = os.path.dirname(d)


def remove(full):
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    elif os.path.lexists(full):
        os.unlink(full)


def apply(root, stream_path):
    buf = open(stream_path, "rb").read()
    assert buf[:8] == MAGIC
    (n,) = struct.unpack("<Q", buf[8:16])
    manifest = json.loads(buf[16 : 16 + n])
    pos, frames = 16 + n, {}
    for e in manifest["entries"]:
        if e["op"] == "write":
            (size,) = struct.unpack("<Q", buf[pos : pos + 8])
            frames[e["path"]] = buf[pos + 8 : pos + 8 + size]
            pos += 8 + size
    j = lambda p: os.path.join(root, p)
    order = ["delete", "rmdir", "rename", "write", "symlink", "chmod", "mkdir"]
    for op in order:
        for e in manifest["entries"]:
            if e["op"] != op:
                continue
            if op == "delete":
                remove(j(e["path"]))
                prune(root, e["path"])
            elif op == "rename":
                os.makedirs(os.path.dirname(j(e["to"])) or root, exist_ok=True)
                remove(j(e["to"]))
                os.replace(j(e["from"]), j(e["to"]))
                os.chmod(j(e["to"]), e["mode"])
                prune(root, e["from"])
            elif op == "write":
                os.makedirs(os.path.dirname(j(e["path"])) or root, exist_ok=True)
                remove(j(e["path"]))
                with open(j(e["path"]), "wb") as f:
                    f.write(frames[e["path"]])
                os.chmod(j(e["path"]), e["mode"])
            elif op == "symlink":
                os.makedirs(os.path.dirname(j(e["path"])) or root, exist_ok=True)
                remove(j(e["path"]))
                os.symlink(e["target"], j(e["path"]))
            elif op == "chmod":
                os.chmod(j(e["path"]), e["mode"])
            elif op == "rmdir":
                os.rmdir(j(e["path"]))
                prune(root, e["path"])
            elif op == "mkdir":
                os.makedirs(j(e["path"]), exist_ok=True)


if __name__ == "__main__":
    if sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "apply":
        apply(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: task.py diff|apply ...")
