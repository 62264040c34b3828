"""Run the web app under uvicorn in a thread of the node process.

The socket is bound here, synchronously, before the thread starts: a taken
port fails ``Node.start`` at once (as the DICOM port does), and port 0 gives
the real port immediately.  uvicorn's own access log is off (ours, in
``auth.GuardMiddleware``, logs route templates, never UIDs or headers) and its
signal handlers are not installed (the node owns SIGTERM).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, node):
        import uvicorn

        from dicom_node.web.app import build_app
        from dicom_node.web.auth import load_token

        self.node = node
        w = node.config.web
        token = load_token(node.config)
        self.tls = bool(w.tls.cert)
        family = socket.AF_INET6 if ":" in w.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((w.host, w.port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.set_inheritable(True)
        kwargs = {}
        if self.tls:
            kwargs.update(ssl_certfile=str(node.config.resolve(w.tls.cert)),
                          ssl_keyfile=str(node.config.resolve(w.tls.key)),
                          ssl_version=ssl.PROTOCOL_TLS_SERVER)
        self.config = uvicorn.Config(build_app(node, token=token), log_config=None, access_log=False,
                                     lifespan="off", server_header=False, timeout_keep_alive=15,
                                     h11_max_incomplete_event_size=64 * 1024, **kwargs)
        self.server = uvicorn.Server(self.config)
        self.server.install_signal_handlers = lambda: None  # uvicorn < 0.29
        self._thread: Optional[threading.Thread] = None
        self.auth = token is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="cag-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the web server did not start (see the log)")
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the web server did not start within %.0fs" % timeout)

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except Exception:
            log.exception("web server stopped with an error")

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(1.0)
        try:
            self.sock.close()
        except OSError:
            pass
