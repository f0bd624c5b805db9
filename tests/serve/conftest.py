"""Fixtures for the server tests: tiny shared_buffer artifacts and servers stopped at the end of the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # serve_helpers, beside these tests

from serve_helpers import Server, launch, wait_ready  # noqa: E402


@pytest.fixture(scope="session")
def serve_artifacts(tiny_export, tmp_path_factory):
    """name -> (concat artifact, shared_buffer artifact) of a tiny checkpoint."""
    from gptexport.exporter.artifact import convert_to_shared_buffer

    made = {}

    def get(name: str):
        if name not in made:
            _, artifact, _ = tiny_export(name)
            target = tmp_path_factory.mktemp(f"{name}-serve") / "artifact"
            convert_to_shared_buffer(artifact, target)
            made[name] = (artifact, target)
        return made[name]

    return get


@pytest.fixture(scope="session")
def start_server():
    """start(artifact, *args, env=None) -> Server; all are stopped at the end of the session."""
    servers = []

    def start(artifact, *args, env=None) -> Server:
        server = wait_ready(launch(artifact, *args, env=env))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
