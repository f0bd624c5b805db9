"""The exporter's validation on trained checkpoints: good fp32/fp16/int8/int4 exports pass on next-token
distributions; deliberately broken ones (wrong quantization scales, two layers' weights swapped) fail, naming the
check."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer

from gptexport.exporter.artifact import open_session as _session
from gptexport.exporter.validate import validate
from gptexport.graphs.precision import QUALITY_LIMITS
from gptexport.runtime.manifest import checksum_files

QUANTIZED_OPS = ("DynamicQuantizeMatMul", "MatMulNBits", "MatMulInteger", "DequantizeLinear")


@pytest.mark.parametrize("preset,dtype", [("gpt2-ci", "float32"), ("gpt2-ci", "float16"), ("gpt2-ci", "int8"),
                                          ("gpt2-ci", "int4"), ("gptj-ci", "int4")])
def test_good_exports_of_trained_checkpoints_pass(trained_export, preset, dtype):
    _, _, manifest = trained_export(preset, dtype)  # export() raises when validation fails
    v = manifest["validation"]
    d = v["distribution"]
    assert v["passed"] and not v["failed_checks"]
    assert d["text"].startswith("self-generated") and d["tokens"] >= 300
    assert v["limits"]["kl_mean"] == QUALITY_LIMITS[dtype]["kl_mean"]
    assert d["kl_mean"] <= QUALITY_LIMITS[dtype]["kl_mean"] and d["perplexity_torch"] < 1000
    if dtype == "float32":
        assert d["kl_mean"] < 1e-8 and d["top1_agreement_strict"] == 1.0


def _revalidate(ckpt, directory: Path, manifest: dict, texts=None) -> dict:
    """Run the exporter's validation of `directory` (changed after export) against the checkpoint's torch model."""
    import transformers

    manifest = {**manifest, "files": checksum_files(directory)}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return validate(model, manifest["config"], tokenizer, str(directory), _session(directory), manifest["dtype"],
                    manifest["special_tokens"]["eos_token_id"], manifest=manifest, texts=texts)


def _copy(artifact: Path, tmp_path: Path) -> tuple[Path, onnx.ModelProto]:
    target = tmp_path / "broken"
    shutil.copytree(artifact, target)
    return target, onnx.load(str(target / "model.onnx"))


@pytest.mark.parametrize("dtype", ["int8", "int4"])  # both GPTQ-quantized (the default method)
def test_wrong_quantization_scales_fail(trained_export, tmp_path, dtype):
    ckpt, artifact, manifest = trained_export("gpt2-ci", dtype)
    target, proto = _copy(artifact, tmp_path)
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type in QUANTIZED_OPS and "h.0." in n.name + "".join(n.input))
    scale = inits[node.input[2]]  # DynamicQuantizeMatMul and MatMulNBits: input 2 is the weight's scales
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2.0, scale.name))
    onnx.save(proto, str(target / "model.onnx"))
    v = _revalidate(ckpt, target, manifest)
    assert not v["passed"]
    assert any("mean KL divergence" in c for c in v["failed_checks"]), v["failed_checks"]


def test_swapped_layer_weights_fail(trained_export, tmp_path):
    ckpt, artifact, manifest = trained_export("gpt2-ci", "float32")
    target, proto = _copy(artifact, tmp_path)
    inits = {t.name: t for t in proto.graph.initializer}
    swapped = 0
    for name, first in inits.items():
        other = inits.get(name.replace(".h.0.", ".h.1."))
        if ".h.0." in name and other is not None and list(other.dims) == list(first.dims):
            a, b = numpy_helper.to_array(first), numpy_helper.to_array(other)
            first.CopyFrom(numpy_helper.from_array(b, first.name))
            other.CopyFrom(numpy_helper.from_array(a, other.name))
            swapped += 1
    assert swapped >= 4  # the attention and MLP projections at least
    onnx.save(proto, str(target / "model.onnx"))
    v = _revalidate(ckpt, target, manifest)
    assert not v["passed"]
    assert any("mean KL divergence" in c for c in v["failed_checks"]), v["failed_checks"]


def test_validation_on_a_given_text(trained_export, tmp_path):
    ckpt, artifact, manifest = trained_export("gpt2-ci", "float32")
    text = (ckpt / "heldout.txt").read_text(encoding="utf-8")
    v = _revalidate(ckpt, Path(artifact), manifest, texts=[text])
    d = v["distribution"]
    width = min(256, manifest["config"]["max_positions"])  # windows of up to 256 tokens
    assert v["passed"] and d["text"].startswith("the given validation text: 1024 tokens")
    assert d["tokens"] == 1024 - 1024 // width  # each window scored at all its positions but the first


def test_cli_validation_text_unreadable_is_one_line(trained_export, tmp_path):
    ckpt, _, _ = trained_export("gpt2-ci", "float32")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    out = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", str(ckpt), "-o", str(tmp_path / "x"),
                          "--validation-text", str(bad)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith(f"gptexport: error: cannot read --validation-text "
                                                         f"{str(bad)!r}"), out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
