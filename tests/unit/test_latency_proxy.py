"""benchmarks/latency_proxy.py: requests through it arrive intact, one delay later."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from latency_proxy import LatencyProxy  # noqa: E402


class Echo(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[::-1])

    def log_message(self, *args):
        pass


def test_requests_through_the_proxy_arrive_intact_and_late():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        payload = bytes(range(256)) * 1000  # 256 kB: several chunks
        timings = {}
        for delay in (0.0, 0.3):
            with LatencyProxy("127.0.0.1", port, delay) as proxy:
                assert proxy.endpoint.startswith("http://127.0.0.1:")
                started = time.perf_counter()
                with urllib.request.urlopen(urllib.request.Request(proxy.endpoint, data=payload), timeout=10) as r:
                    assert r.read() == payload[::-1]
                timings[delay] = time.perf_counter() - started
        assert timings[0.3] >= 0.3 and timings[0.3] > timings[0.0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
