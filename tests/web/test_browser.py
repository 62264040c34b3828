"""A real browser: headless Chromium loads the studies page and a processed study's page;
the DOM it built is checked, and screenshots are kept as test artefacts
(build/test-artefacts/web/, or $CAG_WEB_ARTEFACTS)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh installs it)")


def _chromium(tmp_path, *args, timeout=90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HOME": str(tmp_path)})


def _screenshot(tmp_path, url, out, size="1400,1100"):
    r = _chromium(tmp_path, f"--screenshot={out}", f"--window-size={size}", "--virtual-time-budget=5000", url)
    assert out.is_file(), r.stderr[-2000:]
    im = Image.open(out)
    assert im.size == tuple(int(x) for x in size.split(","))
    assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 8, "blank screenshot"
    return out


@needs_chromium
def test_studies_page_in_chromium(processed, artefacts, tmp_path):
    url, uid = processed["url"], processed["study_uid"]
    r = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=3000", url + "/studies")
    dom = r.stdout
    assert '<table id="studies">' in dom, r.stderr[-2000:]
    assert f'href="/studies/{uid}"' in dom
    assert 'class="study" data-state="sent"' in dom or 'data-state="reported"' in dom
    assert "pacs: sent 2/2" in dom or processed["pacs"] is None
    _screenshot(tmp_path, url + "/studies", artefacts / "studies.png", "1400,600")


@needs_chromium
def test_processed_study_page_in_chromium(processed, artefacts, tmp_path):
    url, uid = processed["url"], processed["study_uid"]
    page = f"{url}/studies/{uid}"
    dom = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", page).stdout
    assert 'id="runs"' in dom and 'class="keyframe"' in dom
    assert 'id="report-en"' in dom and 'id="report-ja"' in dom and "所見" in dom
    assert 'id="delivery"' in dom and '<form method="post"' in dom and 'name="csrf"' in dom
    shot = _screenshot(tmp_path, page, artefacts / "study.png", "1400,1800")
    # the key-frame thumbnails were loaded and painted (not broken-image boxes): the
    # screenshot has many grey levels where a text page would have a handful
    assert len(np.unique(np.asarray(Image.open(shot).convert("L")))) > 64
    _screenshot(tmp_path, url + "/health", artefacts / "health.png", "1400,700")
