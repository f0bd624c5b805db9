"""Trace a transformers GPT-2 / GPT-J into one ONNX decoder graph with past-key-value inputs.

The model is wrapped so that its interface is flat tensors with the ecosystem's names (the ones Optimum and
onnxruntime-genai use), then exported with torch.export (dynamo) with dynamic batch, sequence and past axes.

    input_ids (B, T) ─┐
    attention_mask (B, P+T) ─┤   ┌──────────────┐   logits (B, T, V)
    position_ids (B, T) ─────┼──▶│ HF model     │──▶ present.{i}.key|value (B, nh, P+T, hs)
    past_key_values.{i}.key|value (B, nh, P, hs) ─┘   └──────────────┘
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
# Example sizes for the trace: all >= 2 so torch.export does not specialise an axis to 0 or 1.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 4


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


class FlatDecoder(torch.nn.Module):
    """The HF causal LM behind flat tensor inputs: (ids, mask, positions, *pasts) -> (logits, *presents)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]  # each (B, nh, P+T, hs)
        return (out.logits, *presents)


def example_inputs(facts: dict, batch=_EXAMPLE_BATCH, seq=_EXAMPLE_SEQ, past=_EXAMPLE_PAST, dtype=torch.float32):
    """Inputs of the traced shapes; also used by validation. Left-pads the first row by one token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, facts["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, past:]
    kv_shape = (batch, facts["num_heads"], past, facts["head_size"])
    pasts = tuple(torch.randn(kv_shape, generator=g).to(dtype) for _ in range(2 * facts["num_layers"]))
    return (ids, mask, positions, *pasts)


def trace(model: torch.nn.Module, facts: dict, weights=None):
    """Export the model with torch.export and return the ONNX graph as an `onnx_ir.Model`.

    Args:
        model: a transformers GPT-2 / GPT-J causal LM in eval mode with eager attention.
        facts: the architecture facts (`Architecture.facts`).
        weights: where the weights are when `model` has empty parameters (exporter/stream.py); the graph's
            initializers then read from it when saved.
    Returns:
        onnx_ir.Model with inputs/outputs named per docs/ARTIFACT.md and named dynamic axes.
    Raises:
        KeyError: `weights` lacks a parameter of the model, or has it in another shape.
    """
    layers = facts["num_layers"]
    wrapper = FlatDecoder(model).eval()
    args = example_inputs(facts, dtype=next(model.parameters()).dtype)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past = torch.export.Dim("past_sequence")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for _ in range(2 * layers)))
    from .traced_form import traced_form

    with torch.no_grad(), traced_form(model, facts), _quiet():
        program = torch.onnx.export(
            wrapper, args, dynamo=True, dynamic_shapes=dynamic, optimize=False, verbose=False,
            input_names=input_names(layers), output_names=output_names(layers),
        )
    from .stream import attach_weights, fold_weight_transposes

    if weights is not None:
        # before the optimizer: constant folding must read the real weights, never the empty parameters
        attach_weights(program.model, model, weights)
    with _quiet(), _weights_not_folded():
        program.optimize()  # what optimize=True runs, minus the eager Transpose(weight) folding
    ir_model = program.model
    fold_weight_transposes(ir_model)
    _name_total_axis(ir_model)
    return ir_model


@contextlib.contextmanager
def _weights_not_folded():
    """Keep torch.onnx's optimizer from computing Transpose(weight) into new initializers.

    It would read every weight (all of GPT-J-6B in memory, twice) and give the result a name (val_123) that no
    longer says which parameter it is; stream.fold_weight_transposes does the same fold lazily, keeping the name.
    """
    from onnxscript.optimizer import _constant_folding as folding

    blacklist, always = folding.DEFAULT_CONSTANT_FOLD_BLACKLIST, folding._DEFAULT_ALWAYS_FOLD_OPS
    folding.DEFAULT_CONSTANT_FOLD_BLACKLIST = [*blacklist, "Transpose"]
    folding._DEFAULT_ALWAYS_FOLD_OPS = frozenset()
    try:
        yield
    finally:
        folding.DEFAULT_CONSTANT_FOLD_BLACKLIST, folding._DEFAULT_ALWAYS_FOLD_OPS = blacklist, always


@contextlib.contextmanager
def _quiet():
    """torch.export's warnings and log lines (torchvision ops, dim renames) say nothing to our users."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _name_total_axis(ir_model) -> None:
    """Give the attention mask's second axis a readable name (torch.export calls it s<N>)."""
    import onnx_ir as ir

    mask = next(v for v in ir_model.graph.inputs if v.name == ATTENTION_MASK)
    dims = list(mask.shape)
    dims[1] = ir.SymbolicDim("total_sequence")
    mask.shape = ir.Shape(dims)
