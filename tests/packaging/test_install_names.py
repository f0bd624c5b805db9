"""The wheel installs one top-level name, `gptexport`, and the commands point into it."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (found,) = out.glob("gptexport-*.whl")
    return found


def test_only_gptexport_at_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"gptexport"}, top
    for sub in ("exporter", "graphs", "graphs/fusion", "graphs/precision", "runtime"):
        assert f"gptexport/{sub}/__init__.py" in names, sub
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/") or "/bench/" in n]


def test_commands_point_into_gptexport(wheel):
    with zipfile.ZipFile(wheel) as z:
        (entry,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        points = configparser.ConfigParser()
        points.read_string(z.read(entry).decode())
    assert dict(points["console_scripts"]) == {"gptexport": "gptexport.exporter.cli:main",
                                               "gptrun": "gptexport.runtime.cli:main"}


def test_bare_names_not_importable_outside_the_checkout(tmp_path):
    """Outside the repository (no checkout on sys.path) only gptexport.* resolves; `runtime` is someone else's."""
    code = ("import importlib.util as u, gptexport.runtime, gptexport.graphs, gptexport.exporter;"
            "print([n for n in ('runtime', 'graphs', 'exporter') if u.find_spec(n)])")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
