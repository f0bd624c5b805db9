"""Calibration of int8/int4 (exporter/calibrate.py): the statistics, in memory and streamed, and what the export
records; bad calibration input is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from gptexport.exporter import stream
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.calibrate import activation_importance, calibration_tokens
from gptexport.exporter.load import load

TEXT = ("def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n\n" * 40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny_models import make_checkpoint

    d = tmp_path_factory.mktemp("calib-gptj")
    make_checkpoint(d, "gptj-partial-rotary")
    return d


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def test_streamed_statistics_equal_in_memory_ones(ckpt, text_file, monkeypatch):
    """Layer by layer from the checkpoint (empty parameters full of NaN: any value read from them would show)
    gives the in-memory model's statistics, for every weight MatMul of the graph."""
    import torch

    monkeypatch.setattr(stream, "unwritten", lambda shape: torch.full(tuple(shape), float("nan")))
    in_memory, streamed = load(str(ckpt), stream=False), load(str(ckpt), stream=True)
    assert streamed.weights is not None
    tokens, record = calibration_tokens(in_memory, (str(text_file),))
    assert record["source"] == "files" and tokens.shape[0] >= 1
    want, got = activation_importance(in_memory, tokens), activation_importance(streamed, tokens)
    assert sorted(want) == sorted(got) and len(want) == 2 * 6 + 1  # q, k, v, out, fc_in, fc_out per layer; lm_head
    for name in want:
        assert np.isfinite(got[name]).all(), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    assert all(bool(torch.isnan(p).all()) for p in streamed.model.parameters())  # each dropped again after use


def test_streamed_int4_export_with_calibration(ckpt, text_file, tmp_path):
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "a"), stream=True, dtype="int4",
                                  calibration=(str(text_file),)))
    q = result.manifest["passes"]["quantization"]
    assert result.manifest["validation"]["passed"], result.manifest["validation"]
    assert q["calibration"]["source"] == "files" and q["calibration"]["files"] == ["calib.txt"]
    assert q["calibrated_matmuls"] == result.manifest["passes"]["counts"]["int4_matmuls"] == 13
    assert q["symmetric"] and q["kept_8bit"] and list(q["kept_8bit"].values()) == ["lm_head"]
    # GPTQ (the default method) with Hessians made block by block (exporter/layerwise.py), and says so; its weights
    # always go to model.onnx.data (an inline graph would be serialized whole in memory)
    assert q["gptq_matmuls"] == 13 and q["calibration"]["gptq"].startswith("sequential, block by block")
    assert (result.output / "model.onnx.data").is_file()


def test_streamed_without_files_calibrates_on_its_own_samples(ckpt, tmp_path):
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "a"), stream=True, dtype="int4",
                                  validate=False))
    q = result.manifest["passes"]["quantization"]
    assert q["calibration"]["source"] == "self-sampled" and "streamed weights" in q["calibration"]["streamed"]
    assert q["calibrated_matmuls"] == q["gptq_matmuls"] == 13


def test_in_memory_self_calibration_and_block_size(ckpt, tmp_path):
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "a"), dtype="int8", block_size=64,
                                  validate=False))
    q = result.manifest["passes"]["quantization"]
    assert q["calibration"]["source"] == "self-sampled" and q["bits"] == 8 and q["block_size"] == 64
    assert q["calibrated_matmuls"] == result.manifest["passes"]["counts"]["int8_matmuls"]
    assert q["gptq_matmuls"] == q["calibrated_matmuls"] and q["method"].startswith("GPTQ")  # the default, in memory
    nodes = [n for n in onnx.load(str(result.output / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in nodes)


@pytest.mark.parametrize("args,message", [
    (["--int4", "--calibration", "/nonexistent/calib.txt"], "--calibration '/nonexistent/calib.txt': no such file"),
    (["--int4", "--block-size", "48"], "'48' is not one of"),
])
def test_bad_quantization_input_is_one_line(ckpt, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", str(ckpt), "-o", str(tmp_path / "o"),
                           *args], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
