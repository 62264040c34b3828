"""A small real OpenAI-compatible HTTP server (``POST /v1/chat/completions``) that answers by
running a local ``TransformersBackend`` - what vLLM does for Gemma3, at toy scale.

Knobs for tests: ``fail_first`` (answer that many requests with 503), ``delay_s`` (sleep
before answering), ``api_key`` (require ``Authorization: Bearer``); ``requests`` records the
JSON bodies received, ``max_in_flight`` the most requests answered at once.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def _decode_image(url: str) -> np.ndarray:
    from PIL import Image

    assert url.startswith("data:image/png;base64,"), url[:40]
    raw = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


class ChatServer:
    def __init__(self, backend, host: str = "127.0.0.1", port: int = 0):
        self.backend = backend
        self.fail_first = 0
        self.delay_s = 0.0
        self.api_key = None
        self.requests: list[dict] = []
        self.in_flight = 0  # requests being answered now, and the most at once
        self.max_in_flight = 0
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, obj: dict):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                data = json.loads(self.rfile.read(n))
                with server._lock:
                    server.requests.append(data)
                    server.headers.append(dict(self.headers))
                    fail = server.fail_first > 0
                    if fail:
                        server.fail_first -= 1
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "bad key"}})
                if fail:
                    return self._send(503, {"error": {"message": "loading"}})
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                msg = data["messages"][-1]["content"]
                images = [_decode_image(p["image_url"]["url"]) for p in msg if p["type"] == "image_url"]
                prompt = "".join(p["text"] for p in msg if p["type"] == "text")
                saved = server.backend.max_new_tokens
                server.backend.max_new_tokens = int(data.get("max_tokens") or saved)
                try:
                    text = server.backend.generate_text(images, prompt)
                finally:
                    server.backend.max_new_tokens = saved
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": data.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                })

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
