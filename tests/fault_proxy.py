"""A fault-injecting HTTP reverse proxy on 127.0.0.1, in front of the tests' moto S3 server.

Point s3fs at `proxy.url` instead of the moto endpoint and every request (GET, HEAD, PUT, POST,
DELETE) is forwarded unchanged, the client's Host header included, so a SigV4 signature made for the
proxy's address stays what the client signed. With probability `rate` one request gets one fault, of
the kind injected least so far among those that fit the request (so a run with a handful of faults
still meets every kind, whatever order the client's threads send their requests in):

- "500" / "503": an S3 error document (InternalError / SlowDown) instead of forwarding;
- "drop": the request is forwarded (its side effects happen), then the connection closes with no
  response, or after part of the status line and headers;
- "truncate" (GET only; other requests draw among the other kinds): the upstream response's
  headers with the full Content-Length, half its body, then the connection closes (an empty body
  cannot be cut short: that response is dropped instead, and counted as "drop").

`always_fail(method, path)` returning True gives that request a 503 every time (counted as "always"):
a persistent fault; `path` is the URL path without its query ("/bucket/images/a.png"). The proxy
listens on 127.0.0.1 only, forwards to a loopback upstream only, and closes every connection,
kept-alive ones included, when the block ends. Standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("500", "503", "drop", "truncate")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
UPSTREAM_TIMEOUT_S = 30.0
# Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and are not forwarded.
# Expect is answered here (the handler sends "100 Continue"); http.client cannot wait for one.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect", "transfer-encoding"}
)

ERROR_DOCUMENTS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    """The running proxy: its `url`, what it injected (`faults` by kind) and saw (`requests`).

    `rate` may be changed while it runs (e.g. 0 while a test uploads its fixtures).
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        rate: float,
        seed: int,
        kinds: Sequence[str],
        always_fail: Callable[[str, str], bool] | None,
    ) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
            raise ValueError(f"upstream must be http://127.0.0.1:PORT (a local test server), got {upstream_url!r}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)!r}")
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.always_fail = always_fail
        self.faults: Counter[str] = Counter()
        self._drawn: Counter[str] = Counter()  # kinds chosen (a "truncate" may end up counted as "drop")
        self.requests = 0
        self.url = ""  # set once the server is bound
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False

    def _draw(self, method: str, path: str) -> str | None:
        """Count the request and choose its fault, if any."""
        with self._lock:
            self.requests += 1
            if self.always_fail is not None and self.always_fail(method, path):
                return "always"
            if self._random.random() >= self.rate:
                return None
            # Only a GET answer has a body to cut short, so a GET tries "truncate" first on ties.
            kinds = [k for k in self.kinds if k != "truncate" or method == "GET"] or ["drop"]
            kinds.sort(key=lambda k: (self._drawn[k], k != "truncate"))
            self._drawn[kinds[0]] += 1
            return kinds[0]

    def _coin(self) -> bool:
        with self._lock:
            return self._random.random() < 0.5

    def _count(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def _track(self, connection: socket.socket, open_: bool) -> bool:
        """Register (or forget) a client connection; False once the proxy is closing."""
        with self._lock:
            if not open_:
                self._connections.discard(connection)
                return True
            if self._closed:
                return False
            self._connections.add(connection)
            return True

    def _close_all(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        if not self.server.proxy._track(self.connection, True):
            self.close_connection = True

    def finish(self) -> None:
        self.server.proxy._track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass  # quiet: tests report what matters through `faults` and `requests`

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        proxy = self.server.proxy
        body, chunked = self._read_body()
        fault = proxy._draw(self.command, urllib.parse.urlsplit(self.path).path)
        if fault in ("500", "503", "always"):
            proxy._count(fault)
            self._send_error_document("503" if fault == "always" else fault)
            return
        status, reason, headers, payload = self._forward(body, chunked)
        if fault == "truncate" and self.command != "HEAD" and len(payload) > 1:
            proxy._count("truncate")
            self._send_head(status, reason, headers, len(payload))
            self.wfile.write(payload[: len(payload) // 2])
            self._hang_up()
            return
        if fault in ("drop", "truncate"):
            proxy._count("drop")
            if proxy._coin():  # mid-response: a status line and part of the headers
                self.wfile.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: ".encode("latin-1"))
            self._hang_up()
            return
        length = int(headers.get("Content-Length", len(payload))) if self.command == "HEAD" else len(payload)
        self._send_head(status, reason, headers, length)
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> tuple[bytes, bool]:
        """The request body, de-chunked; and whether it came chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields, if any
                    return b"".join(parts), True
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else b""), False

    def _forward(self, body: bytes, chunked: bool) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        """Send the request upstream as the client sent it; the whole response."""
        upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)  # Host included: it is part of the signature
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders(body if (body or chunked) else None, encode_chunked=chunked)
            response = upstream.getresponse()
            payload = response.read()
            return response.status, response.reason, response.headers, payload
        finally:
            upstream.close()

    def _send_head(self, status: int, reason: str, headers: http.client.HTTPMessage, length: int) -> None:
        self.send_response_only(status, reason)
        for name, value in headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_error_document(self, code: str) -> None:
        error, message = ERROR_DOCUMENTS[code]
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{error}</Code><Message>{message}</Message>"
            f"<Resource>{self.path}</Resource><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(int(code), "Internal Server Error" if code == "500" else "Service Unavailable")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(document)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(document)

    def _hang_up(self) -> None:
        """Close the connection now, whatever was written so far."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


@contextlib.contextmanager
def fault_proxy(
    upstream_url: str,
    *,
    rate: float = 0.0,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    always_fail: Callable[[str, str], bool] | None = None,
) -> Iterator[FaultProxy]:
    """Run a fault-injecting proxy to `upstream_url` (a loopback http:// URL) for the block."""
    proxy = FaultProxy(upstream_url, rate=rate, seed=seed, kinds=kinds, always_fail=always_fail)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.proxy = proxy
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        proxy._close_all()
        server.server_close()
        thread.join(timeout=10)
