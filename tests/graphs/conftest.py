"""Fixtures for the graph tests: tiny traced models, each traced and fused once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # fusion_testing, the helpers beside these tests

from fusion_testing import Traced  # noqa: E402


@pytest.fixture(scope="session")
def traced():
    """name -> Traced, each traced and fused once per session."""
    cache: dict[str, Traced] = {}

    def get(name: str) -> Traced:
        if name not in cache:
            cache[name] = Traced(name)
        return cache[name]

    return get


