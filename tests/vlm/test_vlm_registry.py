"""Names select code: VLM backends by registry; the bundle manifest is strict."""

from __future__ import annotations

import json
import shutil

import pytest

import inference.vlm as vlm
from dicom_node.config import ConfigError, parse_config
from inference.bundle import Bundle, BundleError
from inference.types import ReportText


class _Canned(vlm.ReportBackend):
    def generate_text(self, images, prompt):
        return "unused"

    def generate(self, images, language="en", sides=None, source=None, concepts=None):
        return ReportText(findings=f"{len(images)} image(s)", impression="-", recommendation="-")


@pytest.fixture
def canned_backend():
    @vlm.register_backend("canned-test")
    def make(cfg, bundle, info, common):
        b = _Canned()
        b.max_images = common["max_images"]
        return b

    yield "canned-test"
    del vlm._BACKENDS["canned-test"]


def test_a_registered_backend_is_selected_by_its_name(canned_backend, tmp_path):
    cfg = parse_config({"vlm": {"backend": canned_backend, "max_images": 2}}, base_dir=tmp_path)
    backend = vlm.load_backend(cfg.vlm)
    assert isinstance(backend, _Canned) and backend.max_images == 2
    assert canned_backend in vlm.backend_names()
    assert {"bundle", "transformers", "openai"} <= set(vlm.backend_names())
    with pytest.raises(ValueError, match="already registered"):
        vlm.register_backend(canned_backend)(lambda *a: None)


def test_an_unknown_backend_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"vlm\.backend.*unknown VLM backend 'nope'.*openai"):
        parse_config({"vlm": {"backend": "nope"}}, base_dir=tmp_path)
    with pytest.raises(vlm.ReportError, match="unknown backend 'nope'"):
        vlm.load_backend({"backend": "nope"})


@pytest.mark.parametrize("where", ["top", "selector", "preprocessing"])
def test_the_manifest_is_strict(quick_bundle, tmp_path, where):
    b = tmp_path / "b"
    shutil.copytree(quick_bundle, b)
    Bundle.load(b)  # as built: valid
    m = json.loads((b / "manifest.json").read_text())
    target = {"top": m, "selector": m["selector"], "preprocessing": m["selector"]["preprocessing"]}[where]
    target["gamma_boost"] = 2.0  # a step this code would not apply
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="gamma_boost"):
        Bundle.load(b)
