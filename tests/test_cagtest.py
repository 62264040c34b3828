"""The test-support package itself: the quick bundle's cache key."""

from __future__ import annotations

import shutil

import pytest

from cagtest.bundle import BUNDLE_SOURCES, ROOT, sources_hash


def test_cache_key_covers_the_repository_sources():
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "training" / "demo.py").is_file()
    assert len(sources_hash()) == 16


def test_cache_key_changes_when_a_source_file_changes(tmp_path):
    for pkg in BUNDLE_SOURCES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = sources_hash(tmp_path)
    assert before == sources_hash(ROOT)  # the same files give the same key
    src = tmp_path / "inference" / "frames.py"
    src.write_text(src.read_text() + "\n# changed\n")
    assert sources_hash(tmp_path) != before
    (tmp_path / "training" / "new_module.py").write_text("X = 1\n")  # a new file counts too
    assert len({before, sources_hash(tmp_path)}) == 2


def test_cache_key_refuses_a_root_without_sources(tmp_path):
    with pytest.raises(ValueError, match="no bundle source"):
        sources_hash(tmp_path)
