"""Fixtures for the reliability tests: the fake artifact helper on the path and an isolated verify cache."""

import sys
from pathlib import Path

import pytest

# tests/runtime is not a package (its name would shadow the real `runtime`), so put its helper on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test gets its own verification cache, so none reads the user's ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("GPTEXPORT_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def fake_built(tmp_path_factory):
    """The runtime tests' fake artifact (greedy "xa" -> CONTINUATION), built once."""
    import fake_artifact as fa

    directory = tmp_path_factory.mktemp("fake")
    fa.build(directory, next_map=fa.chain("a", fa.CONTINUATION))
    return directory


@pytest.fixture(scope="session")
def fake_model(fake_built):
    """The fake artifact loaded once (read-only use)."""
    from gptexport import runtime
    return runtime.load(fake_built, verify="full")
