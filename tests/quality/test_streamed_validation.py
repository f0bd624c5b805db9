"""A streamed export (a model too large to hold twice: GPT-J-6B) is validated itself, against a torch reference
that reads one transformer block's weights at a time from the checkpoint: here on tiny checkpoints through the
same streaming path."""

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from gptexport.exporter import stream
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.load import load
from gptexport.exporter.validate import StreamedReference, streamed_full_check
from gptexport.runtime.manifest import checksum_files

IDS = np.array([15496, 995, 11, 314, 716, 257, 3797, 286])


class Recording:
    """A weight source that records every tensor read."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def read(self, name):
        self.reads.append(name)
        return self.source.read(name)


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
def test_streamed_reference_is_torch_one_block_at_a_time(tiny_checkpoint, hf_model, name, monkeypatch):
    monkeypatch.setattr(stream, "unwritten", lambda shape: torch.full(tuple(shape), float("nan")))
    ckpt = tiny_checkpoint(name)
    full = hf_model(ckpt)
    weights = Recording(stream.SafetensorsWeights(ckpt))
    reference = StreamedReference(stream.empty_model(type(full), full.config), weights)
    got = reference.logits(IDS)
    with torch.no_grad():
        want = full(input_ids=torch.as_tensor(IDS)[None]).logits[0]
    assert torch.equal(got, want)  # nothing came from the (NaN) empty parameters
    # each block's tensors are read together, once, in order: only one block is ever resident
    layer = [int(n.split(".h.")[1].split(".")[0]) if ".h." in f".{n}" else None for n in weights.reads]
    blocks = [i for i in layer if i is not None]
    assert blocks == sorted(blocks) and len(weights.reads) == len(set(weights.reads))
    assert all(p.isnan().all() for p in reference.model.parameters())  # restored: nothing stays resident


@pytest.mark.parametrize("name,dtype", [("gpt2", "int4"), ("gptj-partial-rotary", "float16")])
def test_streamed_export_validates_the_artifact_itself(tiny_checkpoint, tmp_path, name, dtype):
    result = export(ExportOptions(model=str(tiny_checkpoint(name)), output=str(tmp_path / "out"), stream=True,
                                  dtype=dtype))
    full = result.manifest["validation"]["full_artifact"]
    assert result.manifest["validation"]["passed"] and full["passed"] and full["tokens"] >= 20
    assert full["method"].startswith("this artifact against torch fp32 streamed block by block")
    assert "full_artifact" in result.manifest["validation"]["method"]


def test_streamed_full_check_fails_on_a_broken_artifact(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("gpt2")
    artifact = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "out"), stream=True,
                                    external_data_threshold=0, validate=False)).output
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    head = next(t for t in proto.graph.initializer if t.name.endswith("lm_head.weight") or "wte" in t.name)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 50.0, head.name))  # sharpen every logit
    onnx.save(proto, str(broken / "model.onnx"))
    manifest = {**result_manifest(artifact), "files": checksum_files(broken)}
    loaded = load(str(ckpt), stream=True)
    check = streamed_full_check(loaded, broken, manifest, "float32")
    assert not check["passed"] and any("full artifact: mean KL divergence" in c for c in check["failed_checks"])


def result_manifest(artifact):
    import json

    return json.loads((artifact / "manifest.json").read_text())
