"""The streaming export (models larger than memory) on tiny models: the same numbers as the in-memory path.

GPT-J-6B takes this path on a 24 GiB machine (bench/gptj_6b.sh measures it); here every piece of it runs on
checkpoints of a few MB: empty-parameter trace, lazy weights from safetensors or a seeded generator, fp16 and int4
converted when written, external data, the reduced-config validation and the structural check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptexport.exporter import stream
from gptexport.exporter.artifact import ECOSYSTEM_FILES
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.validate import logits_check
from gptexport.graphs.precision import LOGITS_ATOL


def _session(directory):
    import onnxruntime as ort

    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture
def nan_parameters(monkeypatch):
    """Empty parameters full of NaN instead of whatever memory held: any value read from them shows up."""
    import torch

    monkeypatch.setattr(stream, "unwritten", lambda shape: torch.full(tuple(shape), float("nan")))


@pytest.mark.parametrize("name", ["gptj-partial-rotary", "gpt2"])
def test_streamed_fp32_matches_torch_and_in_memory_export(tiny_checkpoint, hf_model, tmp_path, name, nan_parameters):
    """Weights read lazily from safetensors give the graph the in-memory export has, bit for bit; nothing in
    the graph comes from the empty parameters (they hold NaN here)."""
    ckpt = tiny_checkpoint(name)
    streamed = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "s"), stream=True, validate=False))
    in_memory = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "m"), stream=False, validate=False))
    assert streamed.manifest["streamed"] and "streamed" not in in_memory.manifest
    model = hf_model(ckpt)
    facts = streamed.manifest["config"]
    check = logits_check(model, facts, _session(streamed.output))
    assert check["logits_max_abs_diff"] <= LOGITS_ATOL["float32"], check
    from gptexport.exporter.trace import example_inputs, input_names

    feed = {n: a.numpy() for n, a in zip(input_names(facts["num_layers"]), example_inputs(facts))}
    for a, b in zip(_session(streamed.output).run(None, feed), _session(in_memory.output).run(None, feed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float16", "int4"])
def test_streamed_export_validates_by_reduced_config(tiny_checkpoint, tmp_path, dtype, nan_parameters):
    """fp16 and int4 written tensor by tensor; validation says how it was done, and the structural check passes."""
    from gptexport import runtime
    ckpt = tiny_checkpoint("gptj-partial-rotary")
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "a"), stream=True, dtype=dtype))
    v = result.manifest["validation"]
    assert v["passed"], v
    assert v["method"].startswith("reduced:")
    assert v["structural"]["passed"] and v["structural"]["problems"] == []
    weights = v["structural"]["initializer_bytes_by_dtype"]
    assert ("float16" if dtype == "float16" else "uint8") in weights
    assert runtime.load(str(result.output)).generate("Hello", max_new_tokens=4, min_new_tokens=4)


def test_streamed_shared_buffer_validates_the_reduced_variant(tiny_checkpoint, tmp_path, nan_parameters):
    """--kv-layout reaches the reduced-config re-export: the variant is validated, and its I/O checked."""
    ckpt = tiny_checkpoint("gpt2")
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "a"), stream=True, kv_layout="shared_buffer"))
    v = result.manifest["validation"]
    assert v["passed"], v
    assert result.manifest["kv_layout"] == "shared_buffer" and result.manifest["streamed"]
    assert all("shared_buffer" in case for case in v["logits_cases"])  # the reduced export is the variant too
    assert v["structural"]["passed"] and v["structural"]["fusion_counts"]["shared_kv"] == 2


def test_streamed_external_data_threshold_cli(tiny_checkpoint, tmp_path):
    """The > 2 GB path on the streaming writer: a threshold of 0 puts every weight in model.onnx.data."""
    from gptexport import runtime
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", str(tiny_checkpoint("gpt2")), "-o", str(out),
                           "--stream", "--fp16", "--external-data-threshold", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "model.onnx", "model.onnx.data",
                                                           "tokenizer.json", *ECOSYSTEM_FILES])
    assert 10 * (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["streamed"]
    # the printed line says which validation ran, not only the manifest (issue 17, item 4)
    assert ("validation (reduced 2-layer config against torch, structural check of the full artifact): passed"
            in proc.stdout), proc.stdout
    # and the check of the artifact itself, against torch streamed block by block, with its own figures
    assert "full artifact (against torch streamed block by block, " in proc.stdout, proc.stdout
    assert runtime.load(str(out)).generate("Hello", max_new_tokens=4, min_new_tokens=4)


def test_random_weights_streamed_preset_has_no_transposed_copy(tmp_path):
    """A preset with --random-weights streams generated tensors; GPT-2's tied lm_head is stored once."""
    import onnx

    result = export(ExportOptions(model="distilgpt2", output=str(tmp_path / "a"), random_weights=True,
                                  stream=True, validate=False))
    proto = onnx.load(str(result.output / "model.onnx"), load_external_data=False)
    vocab_sized = [t.name for t in proto.graph.initializer if 50257 in t.dims]
    assert vocab_sized == ["model.lm_head.weight"], vocab_sized  # the tied wte/lm_head, read by Gather and MatMul


def test_random_weights_are_per_tensor_and_order_free():
    shapes = {"h.0.mlp.weight": (8, 4), "h.0.ln_1.weight": (4,), "h.0.ln_1.bias": (4,)}
    a = stream.RandomWeights(shapes, layernorms={"h.0.ln_1"}, seed=3)
    b = stream.RandomWeights(dict(reversed(shapes.items())), layernorms={"h.0.ln_1"}, seed=3)
    np.testing.assert_array_equal(a.read("h.0.mlp.weight"), b.read("h.0.mlp.weight"))
    assert not np.array_equal(a.read("h.0.mlp.weight"), stream.RandomWeights(shapes, set(), 4).read("h.0.mlp.weight"))
    assert 0.005 < a.read("h.0.mlp.weight").std() < 0.05
    np.testing.assert_array_equal(a.read("h.0.ln_1.weight"), np.ones(4, np.float32))
    np.testing.assert_array_equal(a.read("h.0.ln_1.bias"), np.zeros(4, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_safetensors_reader_matches_safetensors(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(5, 3).to(getattr(torch, dtype)), "b.bias": torch.randn(7).to(getattr(torch, dtype))}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = stream.SafetensorsWeights(tmp_path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(reader.read(name), tensor.float().numpy())
        assert reader.shape(name) == tuple(tensor.shape)


def test_write_safetensors_round_trips(tmp_path):
    source = stream.RandomWeights({"x.weight": (6, 4), "y.weight": (3,)}, set(), seed=0)
    stream.write_safetensors(tmp_path / "model.safetensors", source, ["x.weight", "y.weight"])
    reader = stream.SafetensorsWeights(tmp_path)
    np.testing.assert_array_equal(reader.read("x.weight"), source.read("x.weight").astype(np.float16))


def test_fits_in_memory_decides_the_path():
    gptj_6b, gpt2_xl = 6_050_882_784, 1_557_611_200
    assert not stream.fits_in_memory(gptj_6b, available=24 * 1024**3)
    assert stream.fits_in_memory(gpt2_xl, available=24 * 1024**3)


def test_missing_tensor_is_one_clear_error(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    from gptexport.exporter.presets import ExportError

    src = tiny_checkpoint("gpt2")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (broken / f).write_bytes((src / f).read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    del weights[next(k for k in weights if k.endswith("ln_f.bias"))]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ExportError, match="ln_f.bias"):
        export(ExportOptions(model=str(broken), output=str(tmp_path / "out"), stream=True, validate=False))


# ---- truncated or corrupt checkpoints (issue 17, item 2) ----------------------------------------------------------

def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def _rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's header, keeping its data bytes as they are."""
    import struct

    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + length:])


def _largest(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("stream_", [True, False], ids=["streamed", "in-memory"])
def test_truncated_checkpoint_is_refused_naming_file_and_tensor(tiny_checkpoint, tmp_path, stream_):
    """A checkpoint cut by 2,000 bytes used to stream in silently (np.empty garbage for the missing bytes)."""
    from gptexport.exporter.presets import ExportError

    ckpt = _copy_checkpoint(tiny_checkpoint("gpt2"), tmp_path / "cut")
    blob = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(blob[:-2000])
    with pytest.raises(ExportError) as err:
        export(ExportOptions(model=str(ckpt), output=str(tmp_path / "out"), stream=stream_, validate=False))
    message = str(err.value)
    assert "\n" not in message
    assert "model.safetensors" in message and "'transformer.wte.weight'" in message, message
    assert "truncated by 2000 bytes" in message, message
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("corruption, expected", [
    ("shape", "needs"),  # data_offsets no longer match shape x dtype
    ("overlap", "overlaps the tensor before it"),
    ("gap", "leaves a gap"),
    ("dtype", "unknown dtype"),
])
def test_corrupt_safetensors_header_is_refused(tiny_checkpoint, tmp_path, corruption, expected):
    from gptexport.exporter.presets import ExportError

    ckpt = _copy_checkpoint(tiny_checkpoint("gpt2"), tmp_path / "bad")

    def edit(header):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        first, second = header[names[0]], header[names[1]]
        if corruption == "shape":
            first["shape"] = [first["shape"][0] + 1, *first["shape"][1:]]
        elif corruption == "overlap":
            second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]
        elif corruption == "gap":
            second["data_offsets"] = [second["data_offsets"][0] + 4, second["data_offsets"][1] + 4]
        else:
            first["dtype"] = "F12"

    _rewrite_header(ckpt / "model.safetensors", edit)
    with pytest.raises(ExportError, match=expected) as err:
        export(ExportOptions(model=str(ckpt), output=str(tmp_path / "out"), stream=True, validate=False))
    assert "model.safetensors: tensor '" in str(err.value)
    _assert_nothing_written(tmp_path)


def test_reader_counts_the_bytes_it_reads(tiny_checkpoint, tmp_path):
    """A file that shrinks after its header was checked is caught at the read, not filled with garbage."""
    ckpt = _copy_checkpoint(tiny_checkpoint("gpt2"), tmp_path / "ckpt")
    reader = stream.SafetensorsWeights(ckpt)
    path = ckpt / "model.safetensors"
    last = max(reader.names(), key=lambda n: reader.entries[n][3])
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"'{last}' is truncated: read \d+ of its \d+ bytes"):
        reader.read(last)


def test_failed_validation_names_the_check_that_failed(tiny_checkpoint, tmp_path, monkeypatch):
    """A streamed export whose structural check fails used to print only the reduced export's figures (all within
    their limits) as "validation failed: ..."; now the failed check and its problem are named."""
    from gptexport.exporter import validate
    from gptexport.exporter.presets import ExportError

    real = validate.structural_check

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result["problems"] = ["model.transformer.h.0.mlp.c_fc.weight: 12 bytes in the data file, its shape needs 64"]
        result["passed"] = False
        return result

    monkeypatch.setattr(validate, "structural_check", broken)
    with pytest.raises(ExportError) as err:
        export(ExportOptions(model=str(tiny_checkpoint("gpt2")), output=str(tmp_path / "out"), stream=True))
    message = str(err.value)
    assert message.startswith("validation failed: structural check of the artifact: model.transformer.h.0"), message
    assert "logits max abs diff" not in message and "greedy agreement" not in message, message
    _assert_nothing_written(tmp_path)
