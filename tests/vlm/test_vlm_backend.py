"""The in-process and remote backends on the tiny model; load_backend / report_study contract."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference.types import ReportText

ROOT = Path(__file__).resolve().parents[2]


def test_no_torch_for_remote_backend():
    code = ("import sys, inference.vlm, inference.vlm.openai_backend;"
            "from inference.vlm import load_backend;"
            "b = load_backend({'backend': 'openai', 'url': 'http://127.0.0.1:9/v1', 'model': 'm'});"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json;" + code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_generate_deterministic_and_parsed(tiny_backend, frames_standin):
    from inference.vlm import report_study

    imgs = frames_standin["LCA"] + frames_standin["RCA"]
    a = tiny_backend.generate(imgs, "en", sides=["LCA", "LCA", "RCA", "RCA"])
    b = tiny_backend.generate(imgs, "en", sides=["LCA", "LCA", "RCA", "RCA"])
    assert isinstance(a, ReportText) and a == b
    assert a.format_ok, a  # the trained tiny model follows the template
    rep = report_study(tiny_backend, frames_standin, languages=("en", "ja"))
    assert set(rep) == {"en", "ja"}
    assert rep["en"].findings and rep["ja"].findings
    assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in rep["ja"].findings)


def test_deterministic_across_loads(tiny_bundle, tiny_backend, frames_standin):
    from inference.bundle import Bundle
    from inference.vlm import load_backend

    again = load_backend({"backend": "transformers", "path": str(Path(tiny_bundle) / "vlm"), "device": "cpu",
                          "max_new_tokens": 96}, Bundle.load(tiny_bundle))
    imgs = frames_standin["LCA"][:1]
    assert again.generate(imgs, "ja", ["LCA"]) == tiny_backend.generate(imgs, "ja", ["LCA"])
    assert again.model_info.vlm.endswith("vlm")  # names the local path it came from


def test_model_info_from_bundle(tiny_bundle, tiny_backend):
    from inference.bundle import Bundle

    info = tiny_backend.model_info
    b = Bundle.load(tiny_bundle)
    assert info.device_uid == b.device_uid and info.vlm.startswith("gemma3 ")


def test_timeout_honoured(tiny_bundle, frames_standin):
    from inference.bundle import Bundle
    from inference.vlm import ReportTimeout, load_backend

    b = load_backend({"backend": "bundle", "device": "cpu", "max_new_tokens": 100000, "timeout_s": 0.05},
                     Bundle.load(tiny_bundle))
    b.model.generation_config.eos_token_id = None  # never stop by itself
    b.model.generation_config.max_length = None
    t0 = time.monotonic()
    with pytest.raises(ReportTimeout):
        b.generate(frames_standin["LCA"], "en", ["LCA", "LCA"])
    assert time.monotonic() - t0 < 5


def test_load_backend_errors(tmp_path):
    from inference.vlm import ReportError, load_backend

    with pytest.raises(ReportError):
        load_backend({"backend": "none"}, None)
    with pytest.raises(ReportError):
        load_backend({"backend": "bundle"}, None)
    with pytest.raises(ReportError):
        load_backend({"backend": "transformers", "path": str(tmp_path)}, None)
    with pytest.raises(ReportError):
        load_backend({"backend": "openai", "url": None}, None)


# ---------------------------------------------------------------- OpenAI-compatible server

@pytest.fixture()
def server(tiny_backend):
    from cagtest.chat_server import ChatServer

    with ChatServer(tiny_backend) as s:
        yield s


def _remote(server, **kw):
    from inference.vlm import load_backend

    cfg = {"backend": "openai", "url": server.url, "model": "cag-vlm-lora", "max_new_tokens": 96,
           "timeout_s": 30, "retries": 3, **kw}
    b = load_backend(cfg, None)
    b.backoff_s = 0.05
    return b


def test_openai_backend_matches_in_process(server, tiny_backend, frames_standin, monkeypatch):
    monkeypatch.setenv("CAG_TEST_KEY", "s3cret")
    server.api_key = "s3cret"
    remote = _remote(server, api_key_env="CAG_TEST_KEY")
    imgs = frames_standin["LCA"] + frames_standin["RCA"][:1]
    sides = ["LCA", "LCA", "RCA"]
    assert remote.generate(imgs, "en", sides) == tiny_backend.generate(imgs, "en", sides)
    assert remote.generate(imgs, "ja", sides) == tiny_backend.generate(imgs, "ja", sides)
    body = server.requests[-1]
    assert server.headers[-1]["Authorization"] == "Bearer s3cret"
    assert body["model"] == "cag-vlm-lora" and body["temperature"] == 0.0 and body["max_tokens"] == 96
    # no PHI: one user message, only PNG data URLs and the fixed prompt text
    (msg,) = body["messages"]
    kinds = [p["type"] for p in msg["content"]]
    assert kinds == ["image_url"] * 3 + ["text"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in msg["content"][:3])
    assert set(body) == {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stream"}


def test_openai_retries_on_503(server, frames_standin):
    server.fail_first = 2
    remote = _remote(server)
    rep = remote.generate(frames_standin["LCA"][:1], "en", ["LCA"])
    assert rep.findings
    assert remote.attempts == 3 and len(server.requests) == 3


def test_openai_gives_up_after_retries(server, frames_standin):
    from inference.vlm import ReportError

    server.fail_first = 10
    remote = _remote(server, retries=1)
    with pytest.raises(ReportError, match="503"):
        remote.generate(frames_standin["LCA"][:1], "en", ["LCA"])
    assert remote.attempts == 2


def test_openai_timeout_honoured(server, frames_standin):
    from inference.vlm import ReportTimeout

    server.delay_s = 2.0
    remote = _remote(server, timeout_s=0.3, retries=0)
    t0 = time.monotonic()
    with pytest.raises(ReportTimeout):
        remote.generate(frames_standin["LCA"][:1], "en", ["LCA"])
    assert time.monotonic() - t0 < 1.5


def test_openai_missing_key_env(server, frames_standin, monkeypatch):
    from inference.vlm import ReportError

    monkeypatch.delenv("CAG_NO_SUCH_KEY", raising=False)
    with pytest.raises(ReportError, match="CAG_NO_SUCH_KEY"):
        _remote(server, api_key_env="CAG_NO_SUCH_KEY").generate(frames_standin["LCA"][:1], "en")


@pytest.mark.parametrize("limit, want", [(1, 1), (None, 3)])
def test_openai_max_concurrent_bounds_requests_in_flight(server, frames_standin, limit, want):
    import threading

    server.delay_s = 0.4
    remote = _remote(server, max_concurrent=limit)
    errors: list = []

    def one():
        try:
            remote.generate_text(frames_standin["LCA"][:1], "describe")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(server.requests) == 3
    assert server.max_in_flight == want
