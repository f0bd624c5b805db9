"""Real wheels, installed as a user installs them (slow tier; CI runs it).

`python -m build` makes an sdist and, from it, a wheel. The wheel (not editable) goes into fresh virtual
environments without system site packages, installed offline from a wheelhouse (tests/wheelhouse.py):
one with only the runtime's dependencies (torch, transformers and onnx are not importable there) generates from an
artifact; one with the `export` extra (and torch==2.13.0) exports a checkpoint and generates from it. The runtime
environment's size on disk is printed per package (BENCHMARKS.md records it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from wheelhouse import DEFAULT, MARKER, TORCH, fill, requirements

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """GPTEXPORT_WHEELHOUSE (what .ci/run filled), else build/wheelhouse, filled here once when run locally."""
    given = os.environ.get("GPTEXPORT_WHEELHOUSE")
    directory = Path(given) if given else DEFAULT
    marker = directory / MARKER
    if not marker.is_file() or marker.read_text() != "\n".join(requirements()) + "\n":  # missing, or stale
        if given or os.environ.get("CI"):
            pytest.fail(f"wheelhouse {directory} is missing or incomplete (no {MARKER}): .ci/run fills it with "
                        f"`python tests/wheelhouse.py {directory}` before pytest; tests install offline")
        fill(directory)
    return directory


def _offline(wheelhouse: Path) -> dict:
    # pip reads PIP_* before its config files: no index, only the wheelhouse (also for build's isolated env)
    return dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1")


def _run(args, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def dist(wheelhouse, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, ROOT], env=_offline(wheelhouse))  # sdist, then its wheel
    return out


def _venv(path: Path, wheelhouse: Path, *requirements) -> Path:
    _run([sys.executable, "-m", "venv", path])  # no system site packages
    _run([path / "bin" / "python", "-m", "pip", "install", "--quiet", *requirements], env=_offline(wheelhouse))
    return path / "bin"


def test_sdist_and_wheel_hold_every_module(dist):
    (sdist,) = dist.glob("gptexport-*.tar.gz")
    (wheel,) = dist.glob("gptexport-*.whl")
    modules = {f"gptexport/{p.relative_to(ROOT).as_posix()}" for folder in ("exporter", "graphs", "runtime")
               for p in (ROOT / folder).rglob("*.py")} | {"gptexport/__init__.py"}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert modules <= in_wheel, sorted(modules - in_wheel)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for folder in ("exporter", "graphs", "runtime", "gptexport"):
        wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
        assert wanted <= names, sorted(wanted - names)
    assert {"pyproject.toml", "README.md"} <= names


def _site_sizes(venv_bin: Path) -> dict[str, int]:
    """Bytes on disk per installed distribution (from its RECORD), plus the total of site-packages."""
    code = """
import json, os, sys, importlib.metadata as md
site = next(p for p in sys.path if p.endswith("site-packages"))
sizes = {}
for dist in md.distributions():
    files = [dist.locate_file(f) for f in (dist.files or [])]
    sizes[dist.metadata["Name"]] = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(site) for f in fs)
print(json.dumps({"packages": sizes, "site_packages": total}))
"""
    import json

    return json.loads(_run([venv_bin / "python", "-c", code]).stdout)


def test_runtime_install_generates_without_torch(dist, wheelhouse, tiny_export, tmp_path):
    (wheel,) = dist.glob("gptexport-*.whl")
    bin_ = _venv(tmp_path / "venv", wheelhouse, wheel)
    for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript"):
        probe = subprocess.run([bin_ / "python", "-c", f"import {name}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{name} is importable in the runtime-only install"
    _, artifact, _ = tiny_export("gpt2")
    from gptexport import runtime

    expected = runtime.load(artifact).generate(PROMPT, max_new_tokens=8, min_new_tokens=8)
    done = _run([bin_ / "gptrun", "generate", artifact, PROMPT, "--max-new-tokens", 8, "--min-new-tokens", 8],
                cwd=tmp_path)
    assert done.stdout == expected + "\n"
    code = ("import sys; from gptexport import runtime; "
            f"print(runtime.generate(sys.argv[1], {PROMPT!r}, max_new_tokens=8, min_new_tokens=8))")
    assert _run([bin_ / "python", "-c", code, artifact], cwd=tmp_path).stdout == expected + "\n"
    refused = subprocess.run([bin_ / "gptexport", "gpt2", "--random-weights", "-o", tmp_path / "x"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs the 'export' extra" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()
    version = _run([bin_ / "gptrun", "--version"]).stdout
    assert version.startswith("gptrun (gptexport) ") and "unknown" not in version
    sizes = _site_sizes(bin_)
    rows = sorted(sizes["packages"].items(), key=lambda kv: -kv[1])
    print("\nruntime install, site-packages by distribution (MiB):")
    for name, size in rows:
        print(f"  {name:<24} {size / 2**20:8.1f}")
    print(f"  {'site-packages total':<24} {sizes['site_packages'] / 2**20:8.1f}")


def test_export_extra_installs_and_exports(dist, wheelhouse, tmp_path):
    from tiny_models import make_checkpoint

    (wheel,) = dist.glob("gptexport-*.whl")
    bin_ = _venv(tmp_path / "venv", wheelhouse, TORCH, f"gptexport[export] @ {wheel.as_uri()}")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = _run([bin_ / "gptexport", ckpt, "-o", tmp_path / "artifact"], env=env, cwd=tmp_path)
    assert "validation (full: this artifact against its torch model): passed" in done.stdout, done.stdout
    out = _run([bin_ / "gptrun", "generate", tmp_path / "artifact", PROMPT, "--max-new-tokens", 4], cwd=tmp_path)
    assert out.stdout.strip()
