"""A stand-in for the Hugging Face Hub's HTTP API, small enough to read in one sitting.

It implements only what `huggingface_hub` calls for saekit's uploads and downloads: repo
creation, YAML validation, preupload, commit (NDJSON, files inline as base64) and
`resolve/{revision}/{path}` (HEAD and GET). Repos live in memory as a list of commits; every
request is recorded so tests can check what was sent (headers included).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.branches.get(revision, revision)
        for commit_sha, files in self.commits:
            if commit_sha == sha:
                return commit_sha, files
        return None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub:
    """Run with `with FakeHub() as hub:`; `hub.url` is the endpoint to give huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_commit(self, repo_id: str, changes: dict[str, bytes], branch: str = "main") -> str:
        """Commit files directly (for tests that need a repo without uploading)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo())
            base = repo.files_at(branch)
            files = dict(base[1]) if base else {}
            files.update(changes)
            sha = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
            repo.commits.append((sha, files))
            repo.branches[branch] = sha
            return sha

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(Request(self.command, self.path, dict(self.headers), body))
                return body

            def _send(self, status: int, payload: object = None, headers: dict | None = None):
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str) -> None:
                self._send(
                    status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}
                )

            def do_POST(self) -> None:
                body = self._record()
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = (
                        f"{payload['organization']}/{payload['name']}"
                        if payload.get("organization")
                        else payload["name"]
                    )
                    with hub.lock:
                        if repo_id in hub.repos:
                            body = {"error": "You already created this model repo"}
                            body["url"] = f"{hub.url}/{repo_id}"  # the Hub sends it along
                            return self._send(409, body, {"X-Error-Code": "RepoExists"})
                        hub.repos[repo_id] = Repo(private=bool(payload.get("private")))
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                # /api/models/{owner}/{name}/{preupload|commit}/{revision}
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    repo_id, action, revision = (
                        f"{parts[3]}/{parts[4]}",
                        parts[5],
                        unquote("/".join(parts[6:])),
                    )
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(
                            200,
                            {
                                "files": [
                                    {
                                        "path": f["path"],
                                        "uploadMode": "regular",
                                        "shouldIgnore": False,
                                    }
                                    for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        changes: dict[str, bytes] = {}
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                changes[value["path"]] = base64.b64decode(value["content"])
                        sha = hub.add_commit(repo_id, changes, branch=revision)
                        return self._send(
                            200,
                            {
                                "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                                "commitOid": sha,
                                "pullRequestUrl": None,
                            },
                        )
                self._error(404, "NotFound", f"no route for POST {path}")

            def _resolve(self) -> None:
                self._record()
                path = unquote(urlparse(self.path).path)
                parts = path.strip("/").split("/")
                # /{owner}/{name}/resolve/{revision}/{file...}
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "NotFound", f"no route for {self.command} {path}")
                repo_id, revision, file = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                found = repo.files_at(revision)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                sha, files = found
                if file not in files:
                    headers = {"X-Repo-Commit": sha}
                    self._send(404, None, {"X-Error-Code": "EntryNotFound", **headers})
                    return
                data = files[file]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", sha)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            do_GET = _resolve
            do_HEAD = _resolve

        return Handler
