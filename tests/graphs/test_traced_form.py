"""exporter/traced_form.py: numerically identical to eager, restores the model, and the unfused graph is plain ONNX."""

from __future__ import annotations

import onnx
import pytest
import torch

from gptexport.exporter.traced_form import traced_form
from fusion_testing import TINY


def test_unfused_graph_is_standard_onnx(traced):
    model = onnx.load_from_string(traced("gptj-partial-rotary").unfused)
    onnx.checker.check_model(model, full_check=True)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
def test_same_logits_and_restored(traced, name):
    from transformers.models.gptj import modeling_gptj

    t = traced(name)
    rotary, table = modeling_gptj.apply_rotary_pos_emb, modeling_gptj.GPTJRotaryEmbedding.forward
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = t.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with traced_form(t.model, t.facts):
            assert t.model.config._attn_implementation == "gptexport"
            got = t.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])  # bit-identical on real positions
    assert t.model.config._attn_implementation == "eager"
    assert modeling_gptj.apply_rotary_pos_emb is rotary and modeling_gptj.GPTJRotaryEmbedding.forward is table
