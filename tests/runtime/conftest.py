"""Fixtures for runtime unit tests: fake artifacts (no exporter, no torch) and an isolated verify cache."""

import shutil
import sys
from pathlib import Path

import pytest

# tests/runtime is not a package (the name would shadow the real `runtime`), so put the helper on the path.
sys.path.insert(0, str(Path(__file__).parent))
import fake_artifact as fa  # noqa: E402

from fake_artifact import CONTINUATION  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test gets its own verification cache, so none reads the user's ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("GPTEXPORT_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def _built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifact")
    fa.build(directory, next_map=fa.chain("a", CONTINUATION))
    return directory


@pytest.fixture
def artifact(_built, tmp_path):
    """A fresh copy of the fake artifact that a test may modify."""
    directory = tmp_path / "artifact"
    shutil.copytree(_built, directory)
    return directory


@pytest.fixture(scope="session")
def model(_built):
    """The fake artifact, loaded once (read-only use)."""
    from gptexport import runtime
    return runtime.load(_built, verify="full")
