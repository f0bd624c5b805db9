"""Control of the traced form: what the model looks like while torch.export runs.

Fusion is deterministic only if the traced graph has a known shape, so during the trace the model runs code we own
instead of whatever transformers ships this month:

- attention: a registered attention function ("gptexport") with eager's exact arithmetic and eager's additive mask;
  it traces into MatMul -> Mul(scale) -> Add(mask) -> Softmax -> MatMul -> Transpose, which graphs/fusion/attention.py
  matches.
- GPT-J rotary: the sin/cos lookup becomes one Gather on the position table, and the interleaved rotation is written
  on explicit (even, odd) pairs; graphs/fusion/rotary.py matches that form. Bit-identical to transformers' version:
  x*cos + rotate_every_two(x)*sin computes even*cos + (-odd)*sin and odd*cos + even*sin, the same products and sums.

Everything is plain torch, so the unfused graph stays standard ONNX. The model and transformers are restored on exit.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

IMPLEMENTATION = "gptexport"


def _scores(query, key, scaling, upcast: bool):
    if upcast:  # GPT-J: scores in fp32 so fp16 does not overflow (as transformers' eager does)
        query, key = query.to(torch.float32), key.to(torch.float32)
    return torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, P+T)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention. query (B, nh, T, hs); key, value (B, nh, P+T, hs) with the past already concatenated."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = _scores(query, key, scaling, upcast=hasattr(module, "rotary_dim"))
    if attention_mask is not None:
        scores = scores + attention_mask  # additive (B, 1, T, P+T): 0 or dtype min
    probs = torch.nn.functional.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, nh, T, hs)
    return out.transpose(1, 2), probs  # (B, T, nh, hs)


def _rotary_interleaved(tensor, sin, cos):
    """GPT-J rotary on channel pairs (2i, 2i+1). tensor (B, T, nh, rd); sin, cos (B, T, rd/2)."""
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # (B, T, 1, rd/2)
    pairs = tensor.unflatten(-1, (-1, 2))  # (B, T, nh, rd/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (B, T, nh, rd/2)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # (B, T, nh, rd/2, 2)
    return rotated.flatten(-2)  # (B, T, nh, rd)


def _rotary_table_forward(self, x, position_ids):
    """GPTJRotaryEmbedding.forward as one Gather: sincos (B, T, rd) = table[position_ids], split into sin | cos."""
    sincos = torch.nn.functional.embedding(position_ids, self.embed_positions).to(x.dtype)  # (B, T, rd)
    half = sincos.shape[-1] // 2
    return sincos[..., :half], sincos[..., half:]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextmanager
def _patched(obj, name: str, replacement):
    original = getattr(obj, name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _supported(config) -> bool:
    # GPT-2's reorder_and_upcast_attn bypasses the attention interface; leave such models as they are (the fusion
    # report then says attention was not fused).
    return not getattr(config, "reorder_and_upcast_attn", False)


@contextmanager
def traced_form(model, facts: dict):
    """Trace `model` with our attention function (and GPT-J's rotary in our form); restore everything on exit."""
    config = model.config
    if not _supported(config):
        yield model
        return
    _register()
    with ExitStack() as stack:
        stack.enter_context(_patched(config, "_attn_implementation", IMPLEMENTATION))
        if facts.get("rotary_dim") is not None or config.model_type == "gptj":
            from transformers.models.gptj import modeling_gptj

            stack.enter_context(_patched(modeling_gptj, "apply_rotary_pos_emb", _rotary_interleaved))
            stack.enter_context(_patched(modeling_gptj.GPTJRotaryEmbedding, "forward", _rotary_table_forward))
        yield model
