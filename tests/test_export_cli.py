"""gptexport's bad inputs: one clear line on stderr, exit code 2, no traceback, nothing left half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptexport.exporter.artifact import ECOSYSTEM_FILES
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.presets import PRESETS, ExportError

ARTIFACT_FILES = ("tokenizer.json", *ECOSYSTEM_FILES)  # beside model.onnx[.data] and manifest.json


def gptexport(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptexport: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_model_lists_presets(tmp_path):
    proc = gptexport("gpt3-davinci", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "'gpt3-davinci'", *PRESETS)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(tmp_path):
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 32,
                                                  "vocab_size": 100}))
    proc = gptexport(str(ckpt), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "unsupported architecture 'llama'", "gpt2", "gptj")


def test_hub_id_offline_says_how_to_pass_a_local_dir(tmp_path):
    proc = gptexport("EleutherAI/gpt-j-6B", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "'EleutherAI/gpt-j-6B'", "local directory")


def test_preset_without_random_weights_offline_points_to_the_flag(tmp_path):
    proc = gptexport("gpt2", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "--random-weights")
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path):
    proc = gptexport(str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "config.json")


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = gptexport("distilgpt2", "--random-weights", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    """A failure after files were written (here: in validation) publishes nothing and cleans its staging dir."""
    import gptexport.exporter.validate
    from gptexport import exporter

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash half-way")

    monkeypatch.setattr(exporter.validate, "validate", broken)
    from tiny_models import make_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    with pytest.raises(RuntimeError, match="simulated"):
        export(ExportOptions(model=str(ckpt), output=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_force_replaces_and_external_data_threshold(tmp_path):
    """--force replaces an existing dir; a threshold of 0 puts the weights in model.onnx.data (the >2 GB path)."""
    from tiny_models import make_checkpoint

    from gptexport import runtime
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gptj-partial-rotary")
    out = tmp_path / "out"
    out.mkdir()
    result = export(ExportOptions(model=str(ckpt), output=str(out), force=True, external_data_threshold=0))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["manifest.json", "model.onnx", "model.onnx.data", *ARTIFACT_FILES])
    assert 10 * (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert result.manifest["validation"]["passed"]
    assert set(result.manifest["files"]) == {"model.onnx", "model.onnx.data", *ARTIFACT_FILES}
    assert runtime.load(str(out)).generate("Hello", max_new_tokens=4, min_new_tokens=4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_error_is_a_gptexport_error():
    from gptexport.runtime.errors import GptexportError

    assert issubclass(ExportError, GptexportError)
    with pytest.raises(ExportError, match="unknown model"):
        export(ExportOptions(model="nope", output="/tmp/never-created"))
    assert not Path("/tmp/never-created").exists()


# ---- --force replaces only what is ours (issue 17, item 1) --------------------------------------------------------

def _user_files(directory: Path) -> dict:
    (directory / "notes.txt").write_text("mine")
    (directory / "src").mkdir()
    (directory / "src" / "main.py").write_text("print('mine')")
    return {"notes.txt": "mine", "src/main.py": "print('mine')"}


def _intact(directory: Path, files: dict) -> None:
    for name, text in files.items():
        assert (directory / name).read_text() == text, name


@pytest.mark.parametrize("output", [".", "~"])
def test_force_never_removes_the_current_or_home_directory(tmp_path, output):
    """`gptexport MODEL -o . --force` / `-o ~ --force` used to rename the directory away and delete it."""
    home = tmp_path / "home"
    home.mkdir()
    files = _user_files(home)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", "distilgpt2", "--random-weights",
                           "--no-validate", "-o", output, "--force"], capture_output=True, text=True, env=env,
                          cwd=home, timeout=300)
    assert_one_line_error(proc, "--force replaces only", str(home), "nothing was touched")
    _intact(home, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no staging or .old dirs beside it


def test_force_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = _user_files(out)
    proc = gptexport("distilgpt2", "--random-weights", "--no-validate", "-o", str(out), "--force")
    assert_one_line_error(proc, str(out), "no readable manifest.json")
    _intact(out, files)
    (out / "manifest.json").write_text('{"producer": {"name": "another-tool"}, "files": {}}')
    proc = gptexport("distilgpt2", "--random-weights", "--no-validate", "-o", str(out), "--force")
    assert_one_line_error(proc, str(out), "not a gptexport artifact")
    _intact(out, files)


def test_force_replaces_an_artifact_but_not_the_files_a_user_added_to_it(tmp_path):
    from tiny_models import make_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    out = tmp_path / "out"
    first = export(ExportOptions(model=str(ckpt), output=str(out), validate=False))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"also holds files its manifest does not list \(notes.txt\)"):
        export(ExportOptions(model=str(ckpt), output=str(out), validate=False, force=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["files"] == first.manifest["files"]
    (out / "notes.txt").unlink()
    (out / "model.onnx").write_bytes(b"damaged")  # a broken artifact of ours is still ours to replace
    second = export(ExportOptions(model=str(ckpt), output=str(out), validate=False, force=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "model.onnx", *ARTIFACT_FILES])
    assert second.manifest["files"]["model.onnx"] == first.manifest["files"]["model.onnx"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
