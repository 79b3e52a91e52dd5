"""A small fake Hugging Face Hub on 127.0.0.1 for tests: the part of the Hub HTTP API that huggingface_hub 2.x uses
to create a repo, commit files (inline "regular" uploads) and list and download them. Unknown requests get a 404
and are recorded in ``FakeHub.unknown`` so a test sees what is missing."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API = r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(_API + r"/preupload/([^/]+)$"), "preupload"),
    ("POST", re.compile(_API + r"/commit/([^/]+)$"), "commit"),
    ("GET", re.compile(_API + r"/tree/([^/]+)(?:/(.+))?$"), "tree"),
    ("GET", re.compile(_API + r"(?:/revision/([^/]+))?$"), "info"),
    ("GET", re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$"), "resolve"),
    ("HEAD", re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$"), "resolve"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
]


def git_blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """One repository: its creation request and its commits (oid, files after that commit), oldest first."""

    repo_type: str
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        """The files on ``main``."""
        return self.commits[-1][1] if self.commits else {}

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The commit that ``revision`` (``main`` or a commit oid) names, or None."""
        if revision == "main":
            return self.commits[-1] if self.commits else ("0" * 40, {})
        return next((c for c in self.commits if c[0] == revision), None)


class FakeHub:
    """The server and its storage; ``with FakeHub() as hub:`` serves at ``hub.url`` until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[str] = []
        self.unknown: list[str] = []
        self.authorizations: set[str] = set()
        self.fail_commits = 0
        self.commit_delay_s = 0.0
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        """The stored repository (KeyError when it was never created)."""
        return self.repos[(repo_type, repo_id)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests are recorded in ``FakeHub.requests`` instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with hub.lock:
            hub.requests.append(f"{method} {url.path}")
            if self.headers.get("Authorization"):
                hub.authorizations.add(self.headers["Authorization"])
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(url.path)
            if route_method == method and match:
                groups = [unquote(g) if g is not None else None for g in match.groups()]
                getattr(self, "_" + name)(groups, body, parse_qs(url.query), head=method == "HEAD")
                return
        with hub.lock:
            hub.unknown.append(f"{method} {self.path}")
        self._send(404, {"error": f"fake hub: no route for {method} {url.path}"})

    def _agent_harnesses(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        """huggingface_hub fetches this registry (for its user agent) once a day from the endpoint: an empty one."""
        self._send(200, {})

    def _send(self, status: int, payload: object = None, raw: bytes | None = None, **headers: str) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _find(self, kind: str | None, repo_id: str, revision: str | None = "main"):
        repo = self.server_hub.repos.get((_TYPES.get(kind or "models", "model"), repo_id))
        if repo is None:
            self._send(404, {"error": "Repository not found"}, X_Error_Code="RepoNotFound")
            return None, None
        snapshot = repo.snapshot(revision or "main")
        if snapshot is None:
            self._send(404, {"error": f"Invalid rev id: {revision}"}, X_Error_Code="RevisionNotFound")
            return None, None
        return repo, snapshot

    def _create(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        request = json.loads(body)
        repo_type = request.get("type") or "model"
        repo_id = f"{request['organization']}/{request['name']}"
        with self.server_hub.lock:
            if (repo_type, repo_id) in self.server_hub.repos:
                self._send(409, {"error": "You already created this repo", "url": f"{self.server_hub.url}/{repo_id}"})
                return
            private = request.get("visibility", "public") == "private"
            self.server_hub.repos[(repo_type, repo_id)] = FakeRepo(repo_type, private)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send(200, {"url": f"{self.server_hub.url}/{prefix}{repo_id}", "name": repo_id})

    def _preupload(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        repo, snapshot = self._find(groups[0], groups[1], groups[2])
        if repo is not None:
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            self._send(200, {"files": answer})

    def _commit(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        hub = self.server_hub
        time.sleep(hub.commit_delay_s)
        with hub.lock:
            repo, snapshot = self._find(groups[0], groups[1], groups[2])
            if repo is None:
                return
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                self._send(500, {"error": "fake hub: internal error"})
                return
            files = dict(repo.files)
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"])
            oid = hashlib.sha1(body + str(len(repo.commits)).encode()).hexdigest()
            repo.commits.append((oid, files))
        self._send(200, {"commitUrl": f"{hub.url}/{groups[1]}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def _tree(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        repo, snapshot = self._find(groups[0], groups[1], groups[2])
        if repo is None:
            return
        folder = (groups[3] or "").strip("/")
        prefix = folder + "/" if folder else ""
        inside = sorted(path for path in snapshot[1] if path.startswith(prefix))
        if folder and not inside:
            self._send(404, {"error": f"{folder} does not exist"}, X_Error_Code="EntryNotFound")
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict] = {}
        for path in inside:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub = prefix + "/".join(parts[:depth])
                entries[sub] = {"type": "directory", "oid": git_blob_id(sub.encode()), "path": sub}
            if recursive or len(parts) == 1:
                data = snapshot[1][path]
                entries[path] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
        self._send(200, list(entries.values()))

    def _info(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        repo, snapshot = self._find(groups[0], groups[1], groups[2])
        if repo is not None:
            siblings = [{"rfilename": path} for path in sorted(snapshot[1])]
            self._send(200, {"id": groups[1], "sha": snapshot[0], "private": repo.private, "siblings": siblings})

    def _resolve(self, groups: list, body: bytes, query: dict, head: bool) -> None:
        repo, snapshot = self._find(groups[0], groups[1], groups[2])
        if repo is None:
            return
        data = snapshot[1].get(groups[3])
        if data is None:
            self._send(404, {"error": "Entry not found"}, X_Error_Code="EntryNotFound")
            return
        self._send(200, raw=data, X_Repo_Commit=snapshot[0], ETag=f'"{git_blob_id(data)}"')
