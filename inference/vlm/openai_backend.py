"""Remote backend: an OpenAI-compatible chat-completions endpoint (e.g. vLLM serving
Gemma3 with a LoRA adapter).  Standard library only (urllib): no torch, no extra deps.

Only pixels leave the node: frames are re-encoded as metadata-free PNG data URLs and
the prompt carries no patient data.  Retries with exponential backoff on connection
errors, timeouts, 429 and 5xx; the API key comes from the environment variable named
by ``vlm.api_key_env``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

import numpy as np

from inference.types import ModelInfo
from inference.vlm.base import ReportBackend, ReportError, ReportTimeout, to_png

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def chat_url(url: str) -> str:
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if not u.endswith("/v1"):
        u += "/v1"
    return u + "/chat/completions"


def image_part(image: np.ndarray) -> dict:
    b64 = base64.b64encode(to_png(image)).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}


class OpenAIBackend(ReportBackend):
    def __init__(self, url: str, model: Optional[str] = None, api_key_env: Optional[str] = None,
                 max_new_tokens: int = 256, max_images: int = 4, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.5, model_info: Optional[ModelInfo] = None,
                 max_concurrent: Optional[int] = None):
        """``max_concurrent``: at most this many requests of this process in flight at once (the
        rest wait their turn before their timeout starts); None: one per processing worker.  Size
        it with the server: every node's limit summed stays within vLLM's ``--max-num-seqs``."""
        if not url:
            raise ReportError("vlm.url is required for the openai backend")
        self.url = chat_url(url)
        self.model = model or "default"
        self.api_key_env = api_key_env
        self.max_new_tokens = int(max_new_tokens)
        self.max_images = int(max_images)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.model_info = model_info or ModelInfo(name=self.model, version="", device_uid="",
                                                  vlm=f"openai:{self.model}", adapter="")
        self.attempts = 0  # requests sent (for tests and metrics)
        self.max_concurrent = int(max_concurrent) if max_concurrent else None
        self._slots = threading.BoundedSemaphore(self.max_concurrent) if self.max_concurrent else None

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ReportError(f"vlm.api_key_env: environment variable {self.api_key_env} is not set")
            h["Authorization"] = f"Bearer {key}"
        return h

    def request_body(self, images: list[np.ndarray], prompt: str) -> dict:
        content = [image_part(im) for im in images] + [{"type": "text", "text": prompt}]
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "n": 1,
            "stream": False,
        }

    def generate_text(self, images: list[np.ndarray], prompt: str) -> str:
        if self._slots is None:
            return self._generate_text(images, prompt)
        with self._slots:
            return self._generate_text(images, prompt)

    def _generate_text(self, images: list[np.ndarray], prompt: str) -> str:
        body = json.dumps(self.request_body(images, prompt)).encode("utf-8")
        headers = self._headers()
        deadline = time.monotonic() + self.timeout_s * (self.retries + 1)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_s * (2 ** (attempt - 1)), 30.0)
                if time.monotonic() + delay > deadline:
                    break
                time.sleep(delay)
            self.attempts += 1
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return _content(data)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                last = ReportError(f"VLM server {self.url}: HTTP {exc.code}: {detail}")
                if exc.code not in RETRY_STATUS:
                    raise last from None
                log.warning("VLM server HTTP %s (attempt %d/%d)", exc.code, attempt + 1, self.retries + 1)
            except (TimeoutError, socket.timeout) as exc:
                last = ReportTimeout(f"VLM server {self.url}: no answer within {self.timeout_s:.1f} s")
                log.warning("VLM server timeout (attempt %d/%d)", attempt + 1, self.retries + 1)
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    last = ReportTimeout(f"VLM server {self.url}: no answer within {self.timeout_s:.1f} s")
                else:
                    last = ReportError(f"VLM server {self.url}: {exc.reason}")
                log.warning("VLM server error %s (attempt %d/%d)", exc.reason, attempt + 1, self.retries + 1)
            except (ConnectionError, json.JSONDecodeError, ValueError) as exc:
                last = ReportError(f"VLM server {self.url}: {exc}")
        assert last is not None
        raise last


def _content(data: dict) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"unexpected chat-completions answer: {str(data)[:200]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return (content or "").strip()
