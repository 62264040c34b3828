"""The admin HTTP endpoint: ``/healthz`` and ``/metrics`` (Prometheus text).

A tiny ``http.server`` in a daemon thread: no framework to install or patch,
and it serves only two read-only paths.  It binds loopback unless the config
explicitly allows otherwise (checked in ``config.py``).  Port 0 picks a free
port; the bound one is ``AdminServer.port``.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from dicom_node.metrics import NodeMetrics

log = logging.getLogger(__name__)


class AdminServer:
    def __init__(self, host: str, port: int, metrics: NodeMetrics, health: Callable[[], dict]):
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "cag-node"

            def do_GET(self):  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = outer.metrics.render(), outer.metrics.content_type, 200
                elif path == "/healthz":
                    h = outer.health()
                    code = 200 if h.get("status") == "ok" else 503
                    body, ctype = json.dumps(h).encode(), "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # access log only at debug level
                log.debug("admin %s " + fmt, self.client_address[0], *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cag-admin", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
