"""On-disk storage for the local Hub server: repos, refs, commits and a content-addressed blob store.

Layout under ``root``::

    objects/ab/abcdef...          file contents, named by their sha256 (shared by every repo)
    repos/{type}s/{ns}/{name}/
        repo.json                 {"private": bool, "createdAt": ...}
        refs.json                 {"branches": {"main": oid}, "tags": {}, "prs": {"1": oid}}
        commits/{oid}.json        {"parents", "title", "message", "author", "date", "files": {path: entry}}

A file entry is ``{"sha256", "size", "oid" (git blob sha1 of the content or of the LFS pointer), "lfs": bool}``.
Every write goes to a temporary file first and is renamed into place, so readers never see half a commit.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LFS_THRESHOLD = 10 * 1024 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

DEFAULT_GITATTRIBUTES = """\
*.bin filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar.gz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
tokenizer.json filter=lfs diff=lfs merge=lfs -text
"""


class HubError(Exception):
    """An error the server turns into ``{"error": message}`` with status ``status`` and ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.extra = extra or {}
        self.status = status
        self.message = message
        self.code = code


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def check_path(path: str) -> str:
    """Reject paths that could escape a snapshot: absolute, ``..``, empty segments, ``.git/``."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: '{path}'.")
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Repo:
    """One repository on disk; ``repo_id`` is ``namespace/name``."""

    storage: HubStorage
    repo_type: str
    repo_id: str

    @property
    def dir(self) -> Path:
        return self.storage.root / "repos" / f"{self.repo_type}s" / self.repo_id

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def exists(self) -> bool:
        return (self.dir / "repo.json").is_file()

    def meta(self) -> dict:
        return json.loads((self.dir / "repo.json").read_text())

    def set_meta(self, **changes) -> None:
        _write_atomic(self.dir / "repo.json", json.dumps({**self.meta(), **changes}).encode())

    def refs(self) -> dict:
        return json.loads((self.dir / "refs.json").read_text())

    def _set_refs(self, refs: dict) -> None:
        _write_atomic(self.dir / "refs.json", json.dumps(refs, indent=1).encode())

    def commit(self, oid: str) -> dict:
        return json.loads((self.dir / "commits" / f"{oid}.json").read_text())

    # -- revisions -------------------------------------------------------------------------------------------
    def resolve(self, revision: str) -> str:
        """Return the commit oid a branch, tag, ``refs/pr/N``, ``refs/heads/X`` or commit oid points to."""
        refs = self.refs()
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        elif revision.startswith("refs/tags/"):
            revision = revision[len("refs/tags/") :]
        if match := re.fullmatch(r"refs/pr/(\d+)", revision):
            oid = refs["prs"].get(match[1])
        else:
            oid = refs["branches"].get(revision) or refs["tags"].get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [p.stem for p in (self.dir / "commits").glob(f"{revision}*.json")]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def files(self, revision: str) -> tuple[str, dict]:
        oid = self.resolve(revision)
        return oid, self.commit(oid)["files"]

    def history(self, revision: str) -> list[tuple[str, dict]]:
        oid: str | None = self.resolve(revision)
        out = []
        while oid:
            commit = self.commit(oid)
            out.append((oid, commit))
            oid = commit["parents"][0] if commit["parents"] else None
        return out

    # -- writes ----------------------------------------------------------------------------------------------
    def _write_commit(self, parent: str | None, files: dict, title: str, message: str, author: str) -> str:
        commit = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "author": author,
            "date": _now(),
            "files": files,
        }
        body = json.dumps(commit, sort_keys=True).encode()
        oid = hashlib.sha1(b"commit %d\0" % len(body) + body + os.urandom(8)).hexdigest()
        _write_atomic(self.dir / "commits" / f"{oid}.json", body)
        return oid

    def create_branch(self, branch: str, start: str | None) -> None:
        with self.storage.lock:
            refs = self.refs()
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = self.resolve(start or "main")
            self._set_refs(refs)

    def delete_branch(self, branch: str) -> None:
        with self.storage.lock:
            refs = self.refs()
            if branch == "main" or branch not in refs["branches"]:
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch '{branch}'.", "RevisionNotFound")
            del refs["branches"][branch]
            self._set_refs(refs)

    def create_tag(self, tag: str, revision: str) -> None:
        with self.storage.lock:
            refs = self.refs()
            if tag in refs["tags"]:
                raise HubError(409, f"Tag already exists: {tag}")
            refs["tags"][tag] = self.resolve(revision)
            self._set_refs(refs)

    def apply_commit(
        self,
        revision: str,
        operations: list[tuple[str, dict]],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[str, str | None]:
        """Apply ``operations`` (key, value) from a commit payload; return (commit oid, PR number or None)."""
        with self.storage.lock:
            base = self.resolve(revision)
            if parent_commit and parent_commit != base:
                raise HubError(412, f"Parent commit {parent_commit} is not the head of '{revision}' ({base}).")
            files = dict(self.commit(base)["files"])
            for key, value in operations:
                path = check_path(str(value.get("path", "")).strip("/") if key == "deletedFolder" else value.get("path", ""))
                if key == "file":
                    data = value.get("content", "")
                    data = base64.b64decode(data) if value.get("encoding") == "base64" else data.encode()
                    files[path] = self.storage.put_bytes(data, lfs=False)
                elif key == "lfsFile":
                    sha256 = value.get("oid", "")
                    size = self.storage.object_size(sha256)
                    if size is None:
                        raise HubError(400, f"LFS object {sha256} for '{path}' was not uploaded; upload it first.")
                    files[path] = {"sha256": sha256, "size": size, "oid": git_blob_oid(lfs_pointer(sha256, size)), "lfs": True}
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
                else:
                    raise HubError(400, f"Unknown commit operation '{key}'.")
            oid = self._write_commit(base, files, title, message, author)
            refs = self.refs()
            pr_num = None
            if create_pr:
                pr_num = str(max((int(n) for n in refs["prs"]), default=0) + 1)
                refs["prs"][pr_num] = oid
            elif re.fullmatch(r"refs/pr/\d+", revision):
                refs["prs"][revision.rsplit("/", 1)[1]] = oid
            elif revision in refs["branches"] or revision.removeprefix("refs/heads/") in refs["branches"]:
                refs["branches"][revision.removeprefix("refs/heads/")] = oid
            else:
                raise HubError(400, f"Cannot commit to '{revision}': not a branch. Create the branch first.")
            self._set_refs(refs)
            return oid, pr_num

    def is_lfs_path(self, revision: str, path: str, size: int, sample: bytes) -> bool:
        """Decide regular vs LFS like the Hub: ``.gitattributes`` LFS patterns, >= 10 MiB, or binary content."""
        if size >= LFS_THRESHOLD or b"\0" in sample:
            return True
        try:
            _, files = self.files(revision)
        except HubError:
            files = {}
        attributes = files.get(".gitattributes")
        text = self.storage.read_object(attributes["sha256"]).decode(errors="replace") if attributes else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                if fnmatch.fnmatch(path, parts[0]) or ("/" not in parts[0] and fnmatch.fnmatch(name, parts[0])):
                    return True
        return False


class HubStorage:
    """All repos under ``root``; one lock serialises ref updates (the server runs in one process)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(NAME_RE.match(p) and ".." not in p for p in parts):
            raise HubError(400, f"Invalid repo id '{repo_id}': expected 'namespace/name' with letters, digits, '-', '_', '.'.")
        if repo_type not in ("model", "dataset", "space"):
            raise HubError(400, f"Invalid repo type '{repo_type}'.")
        return Repo(self, repo_type, repo_id)

    def create_repo(self, repo: Repo, *, private: bool, author: str) -> None:
        with self.lock:
            if repo.exists():
                raise HubError(409, f"You already created this {repo.repo_type} repo: {repo.repo_id}")
            repo.dir.mkdir(parents=True, exist_ok=True)
            files = {".gitattributes": self.put_bytes(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            oid = repo._write_commit(None, files, "initial commit", "", "system")
            repo._set_refs({"branches": {"main": oid}, "tags": {}, "prs": {}})
            _write_atomic(repo.dir / "repo.json", json.dumps({"private": private, "createdAt": _now(), "author": author}).encode())

    def delete_repo(self, repo: Repo) -> None:
        import shutil

        with self.lock:
            target = repo.dir.with_name(f".deleted-{repo.dir.name}-{os.getpid()}-{time.time_ns()}")
            os.replace(repo.dir, target)
            shutil.rmtree(target, ignore_errors=True)

    # -- objects ---------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise HubError(400, f"Invalid sha256 oid '{sha256}'.")
        return self.root / "objects" / sha256[:2] / sha256

    def object_size(self, sha256: str) -> int | None:
        path = self.object_path(sha256)
        return path.stat().st_size if path.is_file() else None

    def read_object(self, sha256: str) -> bytes:
        return self.object_path(sha256).read_bytes()

    def put_bytes(self, data: bytes, *, lfs: bool) -> dict:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha256)
        if not path.is_file():
            _write_atomic(path, data)
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"sha256": sha256, "size": len(data), "oid": oid, "lfs": lfs}

    def put_stream(self, read, length: int | None, expected_sha256: str, expected_size: int) -> None:
        """Write an upload to a temp file while hashing it; keep it only if sha256 and size match."""
        target = self.object_path(expected_sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in read:
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != expected_sha256 or size != expected_size:
                raise HubError(
                    400, f"Uploaded content does not match: expected sha256 {expected_sha256} ({expected_size} bytes), "
                    f"got {digest.hexdigest()} ({size} bytes)."
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def lfs_entry_info(self, entry: dict) -> dict | None:
        if not entry["lfs"]:
            return None
        return {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
