"""A small Hub-compatible HTTP server for tests: the endpoints huggingface_hub calls to create a
repo and a branch, pre-upload and commit files, read repo info and download files (`resolve`), with
bearer-token auth, private repos, namespaces owned by users, pull requests, and injectable failures.
Stdlib only; in memory.

    server = HubServer(tokens={"hf_alice": "alice"}).start()   # server.url -> http://127.0.0.1:PORT
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: content}
    # number -> {"title": ...}; its ref is refs/pr/N
    prs: dict[int, dict] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubServer:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user
        self.repos: dict[str, Repo] = {}
        self.requests: list[
            tuple[str, str, dict]
        ] = []  # (method, path, headers): what the clients sent
        self.fail: Optional[str] = None  # "commit": drop the connection when a commit arrives
        self._httpd: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def add_repo(
        self, repo_id: str, owner: str, files: dict[str, bytes], private: bool = False
    ) -> Repo:
        repo = Repo(owner, private)
        self.repos[repo_id] = repo
        _commit(repo, "main", files, parent=None)
        return repo


def _commit(repo: Repo, ref: str, files: dict[str, bytes], parent: Optional[str]) -> str:
    content = dict(repo.commits.get(parent, {})) if parent else {}
    content.update(files)
    h = hashlib.sha1(
        repr(
            (parent, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in content.items()))
        ).encode()
    )
    oid = h.hexdigest()
    repo.commits[oid] = content
    repo.refs[ref] = oid
    return oid


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---------------------------------------------------------------- helpers

    def _user(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        return self.hub.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, body: object = None, headers: Optional[dict] = None, head: bool = False
    ) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(
        self, status: int, message: str, code: Optional[str] = None, head: bool = False, **extra
    ) -> None:
        self._send(
            status,
            {"error": message, **extra},
            {"X-Error-Code": code, "X-Error-Message": message}
            if code
            else {"X-Error-Message": message},
            head=head,
        )

    def _repo(self, repo_id: str, *, write: bool = False, head: bool = False) -> Optional[Repo]:
        """The repo if this request may read (or write) it; else an error has been sent."""
        repo, user = self.hub.repos.get(repo_id), self._user()
        if self.headers.get("Authorization") and user is None:
            self._error(401, "Invalid credentials in Authorization header", head=head)
            return None
        if repo is None or (repo.private and user != repo.owner):
            self._error(
                401 if user is None else 404, "Repository not found", "RepoNotFound", head=head
            )
            return None
        if write and user != repo.owner:
            self._error(
                403 if user else 401, f"You don't have the rights to write to {repo_id}", head=head
            )
            return None
        return repo

    def _log(self) -> None:
        self.hub.requests.append((self.command, self.path, dict(self.headers)))

    # ---------------------------------------------------------------- routes

    def do_HEAD(self) -> None:
        self._log()
        self._resolve(head=True)

    def do_GET(self) -> None:
        self._log()
        path = unquote(urlparse(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4 and parts[4:5] != ["discussions"]:
            repo_id = "/".join(parts[2:4])
            repo = self._repo(repo_id)
            if repo is None:
                return
            revision = (
                "/".join(parts[5:])
                if len(parts) > 5 and parts[4] in ("revision", "tree")
                else "main"
            )
            oid = repo.resolve(revision)
            if oid is None:
                return self._error(404, f"Revision not found: {revision}", "RevisionNotFound")
            if parts[4:5] == ["tree"]:  # the whole tree (files only), one page
                return self._send(
                    200,
                    [
                        {
                            "type": "file",
                            "path": p,
                            "size": len(c),
                            "oid": hashlib.sha1(b"blob %d\0" % len(c) + c).hexdigest(),
                        }
                        for p, c in sorted(repo.commits[oid].items())
                    ],
                )
            return self._send(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": oid,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])],
                },
            )
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "discussions":
            repo = self._repo("/".join(parts[2:4]))
            if repo is None:
                return
            num = int(parts[5])
            pr = repo.prs.get(num)
            if pr is None:
                return self._error(404, "Discussion not found")
            return self._send(
                200,
                {
                    "title": pr["title"],
                    "num": num,
                    "author": {"name": repo.owner},
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "status": "draft",
                    "repo": {"name": "/".join(parts[2:4]), "type": "model"},
                    "isPullRequest": True,
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                },
            )
        if parts[:2] == ["api", "whoami-v2"]:
            user = self._user()
            return (
                self._send(200, {"name": user, "type": "user"})
                if user
                else self._error(401, "Invalid token")
            )
        self._resolve(head=False)

    def _resolve(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path).strip("/").split("/")
        if len(path) < 5 or path[2] != "resolve":
            return self._error(404, "Not found", head=head)
        repo_id = "/".join(path[:2])
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        # The revision may itself hold slashes (refs/pr/1, quoted by the client): match the longest
        # known one.
        rest = path[3:]
        for cut in range(len(rest) - 1, 0, -1):
            oid = repo.resolve("/".join(rest[:cut]))
            if oid is not None:
                filename = "/".join(rest[cut:])
                break
        else:
            return self._error(404, "Revision not found", "RevisionNotFound", head=head)
        content = repo.commits[oid].get(filename)
        if content is None:
            return self._error(404, f"Entry not found: {filename}", "EntryNotFound", head=head)
        etag = hashlib.sha256(content).hexdigest()
        self._send(
            200,
            content,
            {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
            head=head,
        )

    def do_POST(self) -> None:
        self._log()
        url = urlparse(self.path)
        parts = unquote(url.path).strip("/").split("/")
        body = self._body()
        if parts == ["api", "validate-yaml"]:
            return self._send(200, {"errors": [], "warnings": []})
        if parts == ["api", "repos", "create"]:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            req = json.loads(body)
            owner = req.get("organization") or user
            repo_id = f"{owner}/{req['name']}"
            if repo_id in self.hub.repos:
                return self._error(
                    409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}"
                )
            if owner != user:
                return self._error(
                    403, f"You don't have the rights to create a model under the namespace {owner}"
                )
            self.hub.add_repo(
                repo_id,
                user,
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                private=req.get("visibility", "public") == "private" or bool(req.get("private")),
            )
            return self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        # a (draft) pull request against main
        if parts[:2] == ["api", "models"] and parts[4:] == ["discussions"]:
            repo = self._repo("/".join(parts[2:4]), write=True)
            if repo is None:
                return
            num = len(repo.prs) + 1
            repo.prs[num] = {"title": json.loads(body).get("title", "")}
            repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
            return self._send(
                200, {"num": num, "url": f"{self.hub.url}/{'/'.join(parts[2:4])}/discussions/{num}"}
            )
        if parts[:2] != ["api", "models"] or len(parts) < 6:
            return self._error(404, "Not found")
        repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if action == "branch":
            if revision in repo.refs:
                return self._error(409, "Reference already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.refs[revision] = repo.resolve(start)
            return self._send(200, {})
        base = repo.resolve(revision)
        if base is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._send(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ],
                    "commitOid": base,
                },
            )
        if action == "commit":
            if self.hub.fail == "commit":  # the network goes down mid-upload: no response at all
                self.close_connection = True
                self.connection.shutdown(2)
                return
            files, summary = {}, ""
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    summary = item["value"]["summary"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    return self._error(
                        400, f"this test server does not take {item['key']} operations"
                    )
            if not summary:
                return self._error(400, "empty commit message")
            if "create_pr=1" in (url.query or ""):
                return self._error(
                    400, "this test server opens pull requests through the discussions endpoint"
                )
            oid = _commit(repo, revision if revision in repo.refs else "main", files, parent=base)
            return self._send(
                200,
                {
                    "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                    "success": True,
                },
            )
        self._error(404, "Not found")
