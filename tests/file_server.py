"""A real HTTP server on 127.0.0.1 for download tests: plain files and a small Hugging Face hub.

Files are served with ETag, Last-Modified and Content-Length, honour If-None-Match (304) and byte ranges
(If-Range), and can be cut short on demand (`drops`). The hub part answers what huggingface_hub's
`snapshot_download` asks: `/api/models/{repo}/revision/{rev}` (info and commit), `/api/models/{repo}/tree/{rev}`
(file listing) and HEAD/GET `/{repo}/resolve/{rev}/{file}` with X-Repo-Commit, ETag and Content-Length.
Every request is logged (method, path, status, headers) for the tests to count.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int
    headers: dict[str, str]


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, list[int]] = field(default_factory=dict)  # path -> body bytes sent by its next GETs
    repos: dict[str, Repo] = field(default_factory=dict)
    ranges: bool = True
    delay_s: float = 0.0  # pause before each body, to make downloads overlap
    log: list[Logged] = field(default_factory=list)
    url: str = ""

    def __enter__(self) -> FileServer:
        server = self

        class Handler(_Handler):
            state = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def count(self, path: str | None = None, *, method: str = "GET", status: int | None = None) -> int:
        return sum(
            1
            for r in self.log
            if (path is None or r.path == path) and r.method == method and (status is None or r.status == status)
        )


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


class _Handler(BaseHTTPRequestHandler):
    state: FileServer
    protocol_version = "HTTP/1.0"  # one request per connection: a cut body is a closed socket

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        if path.startswith("/api/models/"):
            return self._api(path)
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if match and match.group(1) in self.state.repos:
            repo = self.state.repos[match.group(1)]
            if match.group(2) not in ("main", repo.commit):
                return self._error(path, 404, "RevisionNotFound")
            data = repo.files.get(match.group(3))
            if data is None:
                return self._error(path, 404, "EntryNotFound", {"X-Repo-Commit": repo.commit})
            return self._file(path, data, body, {"X-Repo-Commit": repo.commit})
        if path in self.state.files:
            return self._file(path, self.state.files[path], body, {"Last-Modified": LAST_MODIFIED})
        return self._error(path, 404, "RepoNotFound" if "/resolve/" in path else None)

    def _api(self, path: str) -> None:
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
        if match is None or match.group(1) not in self.state.repos:
            return self._error(path, 404, "RepoNotFound")
        repo_id, what, revision = match.groups()
        repo = self.state.repos[repo_id]
        if revision not in ("main", repo.commit):
            return self._error(path, 404, "RevisionNotFound")
        if what == "revision":
            siblings = [{"rfilename": name} for name in repo.files]
            payload: object = {"id": repo_id, "sha": repo.commit, "siblings": siblings, "private": False}
        else:
            payload = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in repo.files.items()
            ]
        raw = json.dumps(payload).encode()
        self._send(path, 200, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
        self.wfile.write(raw)

    def _file(self, path: str, data: bytes, body: bool, extra: dict[str, str]) -> None:
        etag = etag_of(data)
        if self.headers.get("If-None-Match") == etag:
            return self._send(path, 304, {"ETag": etag, **extra})
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if match and self.state.ranges and self.headers.get("If-Range", etag) == etag:
            start = int(match.group(1))
            if start >= len(data):
                return self._send(path, 416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
        part = data[start:]
        headers = {"ETag": etag, "Content-Length": str(len(part)), "Accept-Ranges": "bytes", **extra}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(path, 206 if start else 200, headers)
        if not body:
            return
        drops = self.state.drops.get(path)
        if drops:
            self.wfile.write(part[: drops.pop(0)])  # announce everything, send some, hang up
            self.wfile.flush()
            self.close_connection = True
            return
        time.sleep(self.state.delay_s)
        self.wfile.write(part)

    def _error(self, path: str, status: int, code: str | None, extra: dict[str, str] | None = None) -> None:
        raw = json.dumps({"error": code or "not found"}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw)), **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(path, status, headers)
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _send(self, path: str, status: int, headers: dict[str, str]) -> None:
        self.state.log.append(Logged(self.command, path, status, {k: v for k, v in self.headers.items()}))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


def point_hub_at(monkeypatch: Any, url: str, scratch: Path) -> None:
    """Make huggingface_hub talk to `url`, as if HF_ENDPOINT had been set before it was imported.

    It derives ENDPOINT and its URL template from HF_ENDPOINT at import (transformers imports it early), and
    some calls (its agent-harness registry, cached under `scratch`) read only those: all are set here.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(scratch / "agent_harnesses.json"))
