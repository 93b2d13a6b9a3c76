"""A local, stdlib-only server that speaks the part of the Hugging Face Hub API ``huggingface_hub`` uses.

It covers whoami, repo create/delete/info/settings, tree and paths-info listings, refs, commits history,
branches and tags, preupload, the LFS batch API (basic transfer + verify), NDJSON commits (with
``create_pr``) and ``/resolve`` downloads: enough for ``upload_folder``, ``create_commit``,
``hf_hub_download``, ``snapshot_download`` and ``PeftModel.from_pretrained`` pointed at it.

Not covered: the Xet protocol. ``hf_xet`` is used automatically when installed, so set
``HF_HUB_DISABLE_XET=1`` for clients that upload to this server (the pytest fixture does it for you).

Run it::

    python -m hf_instruct_tune.testing.hub_server --port 8765 --root /tmp/hub --token hf_local --user alice

or in-process::

    with HubServer(root, tokens={"hf_local": "alice"}) as server:
        HfApi(endpoint=server.url, token="hf_local").whoami()
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from .hub_storage import HubError, HubStorage, Repo, check_path

XET_MESSAGE = (
    "This local Hub server does not implement the Xet storage protocol. "
    "Set HF_HUB_DISABLE_XET=1 in the client environment to upload through Git LFS."
)
REF_PREFIXES = ("pr", "heads", "tags", "convert")
CHUNK = 1024 * 1024


def _take_revision(segments: list[str]) -> tuple[str, list[str]]:
    """Split raw path segments into (revision, rest); accepts both ``refs%2Fpr%2F1`` and ``refs/pr/1``."""
    if not segments or not segments[0]:
        raise HubError(400, "Missing revision in URL.")
    if unquote(segments[0]) == "refs" and len(segments) >= 3 and segments[1] in REF_PREFIXES:
        return "/".join(unquote(s) for s in segments[:3]), segments[3:]
    return unquote(segments[0]), segments[1:]


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # -- plumbing ---------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from BaseHTTPRequestHandler
        if self.server.verbose:
            sys.stderr.write(f"hub-server: {self.command} {self.path.split('?')[0]} -> {format % args}\n")

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self) -> None:
        self._body_consumed = False
        try:
            self._route()
        except HubError as error:
            self._send_error(error)
        except Exception as error:  # pragma: no cover - reported to the client as a 500, with the cause
            self._send_error(HubError(500, f"Internal error in local Hub server: {type(error).__name__}: {error}"))

    def _iter_body(self) -> Iterator[bytes]:
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        raw = self._body()
        content_type = self.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in content_type:
            return {k: v for k, v in parse_qs(raw.decode()).items()}
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from error

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"):
        if not self._body_consumed and self.command in ("POST", "PUT", "DELETE"):
            self.close_connection = True  # the request body was not read: the connection cannot be reused
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.replace("\n", " ")}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.extra}, error.status, headers)

    # -- auth -------------------------------------------------------------------------------------------------
    def _user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.split(" ", 1)[1].strip() if header.lower().startswith("bearer ") else header.strip()
        user = self.server.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo: Repo) -> Repo:
        user = self._user()
        if not repo.exists() or (repo.meta()["private"] and user != repo.namespace):
            raise HubError(404, f"Repository not found: {repo.repo_id}", "RepoNotFound")
        return repo

    def _check_write(self, namespace: str, what: str) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, f"You must be authenticated to {what}. Pass a token (HfApi(token=...) or HF_TOKEN).")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to {what}: '{namespace}' is not your namespace (you are '{user}')")
        return user

    def _writable(self, repo: Repo) -> str:
        user = self._check_write(repo.namespace, f"write to {repo.repo_type} repo '{repo.repo_id}'")
        if not repo.exists():
            raise HubError(404, f"Repository not found: {repo.repo_id}", "RepoNotFound")
        return user

    # -- routing ----------------------------------------------------------------------------------------------
    def _route(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        seg = url.path.split("/")[1:]
        method = self.command
        if seg[:1] == ["api"]:
            return self._route_api(seg[1:], method)
        if seg[:2] == ["__lfs__", "upload"] and method == "PUT":
            return self._lfs_upload(seg[2])
        if seg[:2] == ["__lfs__", "verify"] and method == "POST":
            return self._lfs_verify(seg[2])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0][:-1], seg[1:]
        if len(seg) >= 6 and seg[1].endswith(".git") and seg[2:6] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(self.server.storage.repo(repo_type, f"{seg[0]}/{seg[1][:-4]}"))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            revision, rest = _take_revision(seg[3:])
            return self._resolve(self.server.storage.repo(repo_type, f"{seg[0]}/{seg[1]}"), revision, unquote("/".join(rest)))
        raise HubError(404, f"Not found: {method} {url.path}")

    def _route_api(self, seg: list[str], method: str) -> None:
        storage = self.server.storage
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(seg) >= 3 and seg[0] in ("models", "datasets", "spaces"):
            repo = storage.repo(seg[0][:-1], f"{seg[1]}/{seg[2]}")
            action, rest = (seg[3], seg[4:]) if len(seg) > 3 else ("", [])
            if action == "" and method == "GET":
                return self._info(repo, "main")
            if action == "revision" and method == "GET":
                return self._info(repo, _take_revision(rest)[0])
            if action == "tree" and method == "GET":
                revision, path = _take_revision(rest)
                return self._tree(repo, revision, unquote("/".join(path)).strip("/"))
            if action == "paths-info" and method == "POST":
                return self._paths_info(repo, _take_revision(rest)[0])
            if action == "preupload" and method == "POST":
                return self._preupload(repo, _take_revision(rest)[0])
            if action == "commit" and method == "POST":
                return self._commit(repo, _take_revision(rest)[0])
            if action == "commits" and method == "GET":
                return self._commits(repo, _take_revision(rest)[0])
            if action == "refs" and method == "GET":
                return self._refs(repo)
            if action == "branch" and method in ("POST", "DELETE"):
                return self._branch(repo, unquote("/".join(rest)), method)
            if action == "tag" and method == "POST":
                return self._tag(repo, unquote("/".join(rest)))
            if action == "settings" and method == "PUT":
                return self._settings(repo)
            if action.startswith("xet-"):
                raise HubError(501, XET_MESSAGE)
        raise HubError(404, f"Not found: {method} /api/{'/'.join(seg)}")

    # -- endpoints --------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json({
            "type": "user", "id": user, "name": user, "fullname": user, "email": None, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        })

    def _create_repo(self) -> None:
        body = self._json_body()
        namespace = body.get("organization") or self._user()
        if namespace is None:
            raise HubError(401, "You must be authenticated to create a repo. Pass a token (HfApi(token=...) or HF_TOKEN).")
        repo = self.server.storage.repo(body.get("type") or "model", f"{namespace}/{body.get('name', '')}")
        user = self._check_write(namespace, f"create a repo in '{namespace}'")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        url = f"{self.server.url}/{self._url_prefix(repo)}{repo.repo_id}"
        try:
            self.server.storage.create_repo(repo, private=private, author=user)
        except HubError as error:
            error.extra["url"] = url  # huggingface_hub reads it even on 409 with exist_ok=True
            raise
        self._send_json({"url": url, "name": repo.repo_id, "id": repo.repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        namespace = body.get("organization") or self._user() or ""
        repo = self.server.storage.repo(body.get("type") or "model", f"{namespace}/{body.get('name', '')}")
        self._writable(repo)
        self.server.storage.delete_repo(repo)
        self._send_json({})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        if content.startswith("---"):
            header = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                meta = yaml.safe_load(header)
            except yaml.YAMLError as error:
                return self._send_json({"errors": [{"message": f"Invalid YAML: {error}"}]}, 400)
            if meta is not None and not isinstance(meta, dict):
                return self._send_json({"errors": [{"message": "YAML metadata should be a mapping."}]}, 400)
        self._send_json({"warnings": []})

    def _settings(self, repo: Repo) -> None:
        self._writable(repo)
        body = self._json_body()
        if "private" in body or "visibility" in body:
            repo.set_meta(private=body.get("visibility") == "private" or body.get("private") is True)
        self._send_json({})

    @staticmethod
    def _url_prefix(repo: Repo) -> str:
        return "" if repo.repo_type == "model" else f"{repo.repo_type}s/"

    def _card_data(self, files: dict) -> dict:
        readme = files.get("README.md")
        if not readme:
            return {}
        text = self.server.storage.read_object(readme["sha256"]).decode(errors="replace")
        if not text.startswith("---") or text.count("---") < 2:
            return {}
        try:
            meta = yaml.safe_load(text.split("---", 2)[1])
        except yaml.YAMLError:
            return {}
        return meta if isinstance(meta, dict) else {}

    def _info(self, repo: Repo, revision: str) -> None:
        self._readable(repo)
        oid, files = repo.files(revision)
        commit = repo.commit(oid)
        meta, card = repo.meta(), self._card_data(files)
        tags = list(card.get("tags") or [])
        for key in ("library_name", "license"):
            if card.get(key):
                tags.append(card[key] if key == "library_name" else f"license:{card[key]}")
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [
            {"rfilename": p, **({"size": e["size"], "blobId": e["oid"], "lfs": self._sibling_lfs(e)} if blobs else {})}
            for p, e in sorted(files.items())
        ]
        self._send_json({
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
            "sha": oid, "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
            "cardData": card or None, "siblings": siblings,
            "usedStorage": sum(e["size"] for e in files.values()),
        })

    def _sibling_lfs(self, entry: dict) -> dict | None:
        info = self.server.storage.lfs_entry_info(entry)
        return {"sha256": info["oid"], "size": info["size"], "pointerSize": info["pointerSize"]} if info else None

    def _file_json(self, path: str, entry: dict) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            out["lfs"] = self.server.storage.lfs_entry_info(entry)
        return out

    def _tree(self, repo: Repo, revision: str, path: str) -> None:
        self._readable(repo)
        _, files = repo.files(revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{path}/" if path else ""
        if path and path in files:
            raise HubError(400, f"'{path}' is a file, not a directory.")
        entries, folders = [], set()
        for file_path, entry in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._file_json(file_path, entry))
        if path and not entries and not folders:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send_json(dirs + entries)

    def _paths_info(self, repo: Repo, revision: str) -> None:
        self._readable(repo)
        body = self._json_body()
        _, files = repo.files(revision)
        out = []
        for path in body.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(self._file_json(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": path})
        self._send_json(out)

    def _commits(self, repo: Repo, revision: str) -> None:
        self._readable(repo)
        self._send_json([
            {"id": oid, "title": c["title"], "message": c["message"], "date": c["date"], "authors": [{"user": c["author"]}]}
            for oid, c in repo.history(revision)
        ])

    def _refs(self, repo: Repo) -> None:
        self._readable(repo)
        refs = repo.refs()
        def ref(name: str, kind: str, oid: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
        self._send_json({
            "branches": [ref(n, "heads", o) for n, o in refs["branches"].items()],
            "tags": [ref(n, "tags", o) for n, o in refs["tags"].items()],
            "converts": [],
            "pullRequests": [ref(n, "pr", o) for n, o in refs["prs"].items()],
        })

    def _branch(self, repo: Repo, branch: str, method: str) -> None:
        self._writable(repo)
        body = self._json_body()
        if method == "DELETE":
            repo.delete_branch(branch)
        else:
            if not branch or branch.startswith("refs/") or ".." in branch:
                raise HubError(400, f"Invalid branch name '{branch}'.")
            repo.create_branch(branch, body.get("startingPoint"))
        self._send_json({})

    def _tag(self, repo: Repo, revision: str) -> None:
        self._writable(repo)
        body = self._json_body()
        repo.create_tag(body.get("tag", ""), revision)
        self._send_json({})

    def _preupload(self, repo: Repo, revision: str) -> None:
        self._writable(repo)
        body = self._json_body()
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        try:
            _, current = repo.files("main" if create_pr else revision)
        except HubError:
            current = {}
        out = []
        for item in body.get("files", []):
            path = check_path(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = repo.is_lfs_path("main" if create_pr else revision, path, int(item.get("size", 0)), sample)
            entry = current.get(path)
            oid = None
            if entry and entry["lfs"] == lfs:
                oid = entry["sha256"] if lfs else entry["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out, "commitOid": None})

    def _commit(self, repo: Repo, revision: str) -> None:
        user = self._writable(repo)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line.")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        oid, pr_num = repo.apply_commit(
            revision,
            [(line["key"], line["value"]) for line in lines[1:]],
            title=header.get("summary", ""),
            message=header.get("description", ""),
            author=user,
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        base = f"{self.server.url}/{self._url_prefix(repo)}{repo.repo_id}"
        self._send_json({
            "success": True, "commitOid": oid, "commitUrl": f"{base}/commit/{oid}",
            "pullRequestUrl": f"{base}/discussions/{pr_num}" if pr_num else None,
        })

    # -- LFS --------------------------------------------------------------------------------------------------
    def _lfs_batch(self, repo: Repo) -> None:
        self._writable(repo)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported; download files through /resolve.")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid", ""), int(obj.get("size", -1))
            if self.server.storage.object_size(oid) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
                continue
            ticket = secrets.token_urlsafe(24)
            self.server.tickets[ticket] = (oid, size, time.time() + 3600)
            objects.append({
                "oid": oid, "size": size, "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.server.url}/__lfs__/upload/{ticket}", "header": {}},
                    "verify": {"href": f"{self.server.url}/__lfs__/verify/{ticket}", "header": {}},
                },
            })
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _ticket(self, ticket: str) -> tuple[str, int]:
        oid, size, expires = self.server.tickets.get(ticket, (None, None, 0))
        if oid is None or expires < time.time():
            raise HubError(403, "Unknown or expired LFS upload URL; request a new one from the batch API.")
        return oid, size

    def _lfs_upload(self, ticket: str) -> None:
        oid, size = self._ticket(ticket)
        self.server.storage.put_stream(self._iter_body(), None, oid, size)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, ticket: str) -> None:
        self._body()
        oid, size = self._ticket(ticket)
        if self.server.storage.object_size(oid) != size:
            raise HubError(404, f"LFS object {oid} was not uploaded ({size} bytes expected).")
        self.server.tickets.pop(ticket, None)
        self._send_json({"success": True})

    # -- downloads --------------------------------------------------------------------------------------------
    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        self._readable(repo)
        oid, files = repo.files(revision)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        object_path = self.server.storage.object_path(entry["sha256"])
        start, end, status = 0, entry["size"], 200
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes="):
            first, _, last = range_header[6:].split(",")[0].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, entry["size"]) if last else entry["size"]
            if start >= max(end, 1) and entry["size"] > 0:
                raise HubError(416, f"Range not satisfiable: {range_header}")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry['size']}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(object_path, "rb") as handle:
            handle.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, storage: HubStorage, tokens: dict[str, str], verbose: bool):
        super().__init__(address, HubRequestHandler)
        self.storage = storage
        self.tokens = tokens
        self.verbose = verbose
        self.tickets: dict[str, tuple[str, int, float]] = {}
        host, port = self.server_address[:2]
        self.url = f"http://{host}:{port}"


class HubServer:
    """A local Hub server running in a background thread.

    Args:
        root: folder holding the repos and the blob store (created if missing, reused if present).
        tokens: accepted tokens mapped to the user they authenticate; default: one random token for ``user``.
        user: the default user, owner of the default token.
        host, port: where to listen; port 0 picks a free one.
    """

    def __init__(self, root: str | Path, tokens: dict[str, str] | None = None, *, user: str = "user",
                 host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.root = Path(root)
        self.user = user
        self.tokens = dict(tokens) if tokens else {f"hf_local_{secrets.token_hex(12)}": user}
        self.token = next((t for t, u in self.tokens.items() if u == user), next(iter(self.tokens)))
        self._httpd = _HubHTTPServer((host, port), HubStorage(self.root), self.tokens, verbose)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._httpd.url

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_tokens(values: list[str], user: str) -> dict[str, str]:
    tokens = {}
    for value in values:
        name, sep, token = value.partition(":")
        tokens[token if sep else name] = name if sep else user
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_instruct_tune.testing.hub_server",
        description="Serve a local, Hub-compatible API for huggingface_hub clients (uploads need HF_HUB_DISABLE_XET=1).",
        epilog="Example: python -m hf_instruct_tune.testing.hub_server --port 8765 --root /tmp/hub --token hf_local --user alice\n"
        "then: HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_local HF_HUB_DISABLE_XET=1 hf-instruct-tune upload alice/my-adapter out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8765, help="Port to listen on (0 picks a free one).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: 127.0.0.1).")
    parser.add_argument("--root", required=True, help="Folder where repos and blobs are stored.")
    parser.add_argument("--token", action="append", default=[], metavar="[USER:]TOKEN",
                        help="Accepted token, owned by --user unless prefixed 'USER:'. Repeatable. Default: a random one.")
    parser.add_argument("--user", default="user", help="Default user name (the namespace it can write to).")
    parser.add_argument("--verbose", action="store_true", help="Log every request to stderr.")
    args = parser.parse_args(argv)
    server = HubServer(args.root, _parse_tokens(args.token, args.user) or None, user=args.user,
                       host=args.host, port=args.port, verbose=args.verbose)
    users = sorted(set(server.tokens.values()))
    print(f"Local Hub serving {Path(args.root).resolve()} at {server.url} for user(s) {', '.join(users)}", flush=True)
    if not args.token:
        print(f"Generated token for '{server.user}': {server.token}", flush=True)
    print(f"Use it with: HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
