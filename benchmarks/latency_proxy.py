"""A TCP proxy on 127.0.0.1 that holds every chunk a client sends for ``delay_s`` before passing it
on: each request to the local S3/SQS endpoint then takes one network round trip longer, as it
does against real S3 and SQS (tens of milliseconds), while moto answers in about one.

Used by benchmarks/throughput.py ``--latency-ms`` to measure what the worker's overlap of
receives, manifest writes and deletes with classification buys when requests are slow.
"""

from __future__ import annotations

import socket
import threading
import time


class LatencyProxy:
    """``with LatencyProxy("127.0.0.1", 5000, 0.02) as proxy``: ``proxy.endpoint`` forwards to the
    upstream port, adding ``delay_s`` to every request; stopped (and its sockets closed) on exit."""

    def __init__(self, upstream_host: str, upstream_port: int, delay_s: float):
        self.upstream = (upstream_host, int(upstream_port))
        self.delay_s = float(delay_s)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept() wakes up to see a close
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="latency-proxy", daemon=True)

    def __enter__(self) -> "LatencyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.delay_s), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if delay_s:
                    time.sleep(delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
