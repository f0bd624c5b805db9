"""A SIGKILLed export never leaves anything that looks complete.

`python -m exporter.cli` runs on a tiny local checkpoint and is killed (SIGKILL: no cleanup handler runs) at a
series of points: as soon as its hidden staging directory appears (found by polling, no hooks), and, made
deterministic by a hook that pauses the child, right after the graph is written and right after the first
manifest.json is written into the staging directory. Afterwards the target must not exist and no leftover
hidden staging directory may hold a manifest.json (the runtime would accept it as a finished artifact).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptexport import runtime
from gptexport.runtime.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]

# Runs `python -m exporter.cli ARGS`, but first wraps one exporter function ("module.function") so that, once it has
# returned, the child prints a marker and sleeps until it is killed.
HOOKED = """
import importlib, runpy, sys, time
module, point = sys.argv.pop(1).split(".")
module = importlib.import_module("gptexport.exporter." + module)
real = getattr(module, point)
def paused(*args, **kwargs):
    result = real(*args, **kwargs)
    print("PAUSED", flush=True)
    time.sleep(600)
    return result
setattr(module, point, paused)
sys.argv[0] = "gptexport"
runpy.run_module("gptexport.exporter.cli", run_name="__main__")
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_models import make_checkpoint

    ckpt = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(ckpt, "gpt2")
    return ckpt


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _staging_dirs(parent: Path, name: str) -> list:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.is_dir()]


def _assert_nothing_complete(parent: Path, target: Path) -> list:
    assert not target.exists(), f"{target} exists after a killed export"
    visible = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    assert visible == [], visible
    leftovers = _staging_dirs(parent, target.name)
    for staging in leftovers:
        assert not (staging / "manifest.json").exists(), \
            f"killed export left {staging.name}/manifest.json: the runtime would load it as complete"
        with pytest.raises(ArtifactError, match="not a complete gptexport artifact"):
            runtime.load(staging)
    return leftovers


def test_sigkill_as_soon_as_staging_appears(checkpoint, tmp_path):
    target = tmp_path / "artifact"
    child = subprocess.Popen([sys.executable, "-m", "gptexport.exporter.cli", str(checkpoint), "-o", str(target)], cwd=ROOT,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _staging_dirs(tmp_path, target.name):
            assert child.poll() is None, "the export ended before its staging directory was seen"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    assert len(_assert_nothing_complete(tmp_path, target)) == 1


@pytest.mark.parametrize("point", [
    "artifact.save_graph",
    "build._validate",  # the staged artifact is loaded by the runtime here, yet has no manifest.json
    "artifact.write_manifest_file",  # the manifest is written, but beside the staging dir, moved in after the rename
])
def test_sigkill_mid_export(checkpoint, tmp_path, point):
    target = tmp_path / "artifact"
    child = subprocess.Popen([sys.executable, "-c", HOOKED, point, str(checkpoint), "-o", str(target)], cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # blocks until the hook pauses the child (or it dies)
        assert line.strip() == "PAUSED", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    leftovers = _assert_nothing_complete(tmp_path, target)
    assert len(leftovers) == 1 and (leftovers[0] / "model.onnx").exists()  # it really was killed mid-way


def test_next_export_removes_what_a_killed_one_left(checkpoint, tmp_path):
    """Stale staging dirs and pending manifests of the same target go; a fresh (possibly live) one stays."""
    from gptexport.exporter.build import STALE_SECONDS, ExportOptions, export

    target = tmp_path / "artifact"
    stale_dir, stale_file = tmp_path / ".artifact.partial-dead", tmp_path / ".artifact.manifest-123.json"
    fresh_dir, other = tmp_path / ".artifact.partial-live", tmp_path / ".unrelated.partial-x"
    for d in (stale_dir, fresh_dir, other):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"half")
    stale_file.write_text("{}")
    old = time.time() - STALE_SECONDS - 10
    for p in (stale_dir, stale_file, other):
        os.utime(p, (old, old))
    export(ExportOptions(model=str(checkpoint), output=str(target)))
    assert (target / "manifest.json").exists()
    assert not stale_dir.exists() and not stale_file.exists()
    assert fresh_dir.exists() and other.exists()
