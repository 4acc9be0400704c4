"""The HTTP listener for `/metrics` (Prometheus text format) and `/healthz` (what container
health checks and load balancers ask: 200 when ready, 503 otherwise, with a one-line JSON).
Its own threads; a request reads the parts through the functions it is given, nothing else."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

from edge_agent.errors import ConfigError
from edge_agent.log import get_logger
from edge_agent.settings.model import listen_address

log = get_logger("metrics")
Health = Callable[[], tuple[bool, str]]  # (healthy, state)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart binds at once, not after TIME_WAIT

    def __init__(self, address: tuple[str, int], scrape: Callable[[], bytes], health: Health) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.scrape, self.health = scrape, health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                self._send(200, CONTENT_TYPE_LATEST, self.server.scrape())
            except Exception:  # noqa: BLE001 - a failed scrape is a 500, never a dead listener
                log.exception("metrics.scrape_failed")
                self._send(500, "text/plain; charset=utf-8", b"scrape failed\n")
        elif path == "/healthz":
            healthy, state = self.server.health()
            body = json.dumps({"state": state}).encode() + b"\n"
            self._send(200 if healthy else 503, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: /metrics and /healthz are here\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
        return


class MetricsListener:
    """Bound when made (a port in use is a settings error naming it), served once started."""

    def __init__(self, listen: str, scrape: Callable[[], bytes], health: Health) -> None:
        self.listen = listen
        try:
            self._server = _Server(listen_address(listen), scrape, health)
        except OSError as exc:
            raise ConfigError([f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}"]) from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics.listening", listen=self.listen, port=self.port)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
