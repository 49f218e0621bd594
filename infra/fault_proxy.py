"""A fault-injecting HTTP proxy in front of an S3/SQS endpoint (moto's server locally), used by
tests/integration/test_faults.py and benchmarks/soak.py.

:class:`FaultProxy` is a threaded HTTP/1.1 server on 127.0.0.1 that forwards every request to the
upstream endpoint and, when its ``rule`` says so, instead answers 503 SlowDown / 500
InternalError, resets the connection (before forwarding, or after forwarding so the response is
lost), cuts a GetObject body in half, or holds a request until the caller releases it (a
deterministic "kill point"). Point the code under test's ``AWS_ENDPOINT_URL`` at
``proxy.endpoint``; clients that must not see faults talk to the upstream directly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["FAULTS", "FaultProxy", "Request", "passthrough"]

FAULTS = ("503", "500", "reset", "drop-response", "truncate")


class Request:
    """What a rule sees of one proxied request."""

    def __init__(self, n: int, method: str, path: str, target: str, body: bytes):
        self.n, self.method, self.path, self.target = n, method, path, target
        self.key = unquote(urlsplit(path).path)  # "/bucket/key" for S3 (path-style), "/" for SQS
        self.identity = (method, path, target, hashlib.sha1(body).hexdigest())

    @property
    def is_sqs(self) -> bool:
        return self.target.startswith("AmazonSQS.")

    @property
    def operation(self) -> str:
        return self.target.split(".", 1)[1] if self.is_sqs else f"S3 {self.method}"

    def is_object_get(self, prefix: str) -> bool:
        return self.method == "GET" and not self.is_sqs and self.key.startswith(prefix) and "?" not in self.path


class _Abort(Exception):
    """Raised inside a handler to drop the connection without any further I/O."""


class FaultProxy:
    """``with FaultProxy(upstream, rule) as proxy``: ``proxy.endpoint`` forwards to ``upstream``.

    ``rule(request) -> action``, called once per request under a lock, returns ``"pass"`` or one of
    ``FAULTS`` or ``"hold"``. ``proxy.log`` records ``(n, operation, key, action)`` for every request.
    """

    def __init__(self, upstream: str, rule):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rule = rule
        self.log: list[tuple[int, str, str, str]] = []
        self.lock = threading.Lock()
        self.holding = threading.Event()  # set while a request is held
        self.release = threading.Event()
        self._count = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (_Abort, ConnectionError):
                    pass

            def do_GET(self):
                proxy._serve(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def actions(self) -> Counter:
        return Counter(action for *_, action in self.log)

    # -- one request
    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        with self.lock:
            self._count += 1
            request = Request(self._count, handler.command, handler.path, handler.headers.get("X-Amz-Target", ""),
                              body)
            action = self.rule(request)
            self.log.append((request.n, request.operation, request.key, action))
        if action == "hold":
            self.holding.set()
            self.release.wait(timeout=300)
            _reset(handler)  # a held request is never forwarded: its client was killed meanwhile
        if action in ("503", "500"):
            _error(handler, int(action), request)
            return
        if action == "reset":
            _reset(handler)
        status, headers, data = self._forward(handler, body)
        if action == "drop-response":
            _reset(handler)
        handler.send_response_only(status)
        for name, value in headers:
            handler.send_header(name, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if action == "truncate" and len(data) > 1:
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            _reset(handler)
        handler.wfile.write(data)

    def _forward(self, handler, body: bytes):
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() != "expect":  # the proxy already answered "100 Continue" itself
                    connection.putheader(name, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            data = response.read()
            skip = {"connection", "keep-alive", "transfer-encoding", "server", "date"}
            if handler.command != "HEAD":
                skip.add("content-length")
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
            return response.status, headers, data
        finally:
            connection.close()


def _read_body(handler) -> bytes:
    """The raw request body (a chunked body is passed on as received, with its framing)."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        raw = bytearray()
        while True:
            line = handler.rfile.readline(65537)
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = handler.rfile.readline(65537)
                    raw += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += handler.rfile.read(size + 2)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _reset(handler) -> None:
    """Close the connection with a TCP RST, nothing more written."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    for closer in (handler.rfile.close, handler.wfile.close, handler.connection.close):
        try:
            closer()
        except OSError:
            pass
    raise _Abort()


def _error(handler, status: int, request: Request) -> None:
    code, message = {503: ("SlowDown", "Please reduce your request rate."),
                     500: ("InternalError", "We encountered an internal error. Please try again.")}[status]
    if request.is_sqs:
        body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message}).encode()
        content_type = "application/x-amz-json-1.0"
    else:
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>" \
               f"<RequestId>fault-{request.n}</RequestId></Error>".encode()
        content_type = "application/xml"
    handler.send_response_only(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def passthrough(_request: Request) -> str:
    return "pass"
