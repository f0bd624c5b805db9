"""One real-size export in CI: GPT-2 124M with random weights, validated with greedy parity against torch."""

from __future__ import annotations

import pytest

from gptexport import runtime
from gptexport.exporter.build import ExportOptions, export


@pytest.mark.slow
def test_gpt2_124m_random_weights_end_to_end(tmp_path):
    result = export(ExportOptions(model="gpt2", random_weights=True, output=str(tmp_path / "gpt2")))
    m = result.manifest
    assert m["config"] == {"num_layers": 12, "num_heads": 12, "head_size": 64, "hidden_size": 768,
                           "vocab_size": 50257, "max_positions": 1024, "rotary_dim": None}
    v = m["validation"]
    assert v["passed"] and v["greedy_agreement_strict"] == 1.0, v
    assert v["logits_max_abs_diff"] <= v["logits_tolerance"]
    assert m["files"]["model.onnx"]["size"] > 400e6  # 124M fp32 weights are inside the graph (< 2 GB)
    model = runtime.load(str(result.output))
    text = model.generate("Hello, my name is", max_new_tokens=8, min_new_tokens=8)
    assert isinstance(text, str) and text
    assert model.tokenizer.encode("Hello world").ids == [15496, 995]
