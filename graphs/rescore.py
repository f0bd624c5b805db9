"""Exact rescoring of a quantized tied lm_head's top candidates: top-1 as the float32 model has it, at small cost.

GPT-2 ties its lm_head to the token embedding: logits = h @ wte^T, and the artifact keeps wte in float32 for the
input Gather (graphs/precision/quantize.py leaves embedding tables alone). An int8 lm_head computes every logit
approximately (its activations are quantized too, which is what costs int8 its last tenth of a percent of top-1
agreement, BENCHMARKS.md). This pass recomputes the k largest logits of each row exactly from the float table:

```
 hidden (B, T, D) ─┬─ lm_head (int8 / 8-bit) ──▶ approx (B, T, V) ─┬─ TopK(k, axis -1) ─▶ idx (B, T, k) ─┐
                   │                                                 │                                  │
                   │     wte (V, D) float32 ── Gather(idx) ──▶ rows (B, T, k, D)                         │
                   └─ Unsqueeze(-1) (B, T, D, 1) ─ MatMul(rows, ·) ─ Squeeze(-1) ─▶ exact (B, T, k) ─┐  │
                                                     ScatterElements(approx, idx, exact; axis -1) ──▶ logits
```

The k rescored entries equal float32's h @ wte^T (the same dot products, summed in another order); the others keep
the quantized values, so the top-1 is exact unless float32's top-1 falls outside the quantized top-k (it never did
in BENCHMARKS.md's held-out text at k = 16). The pass reads the value lm_head reads, so it composes with
logits_to_keep (graphs/last_logits.py) and the in-place graph's logits_index gather (graphs/shared_kv.py) in either
order, and with any positions per row (a speculative verify step's 1 + K).

It runs in two steps because the quantizers replace the float lm_head and drop its transposed weight:

    head = find_tied_lm_head(model)      # before quantization: the lm_head reads the Gather's own table
    quantize_int8(model, ...)
    rescore_top_k(model, head, k=16)     # after: TopK ... ScatterElements on the quantized logits

An untied lm_head (GPT-J's own weight and bias) has no float copy in the artifact: find_tied_lm_head refuses it
with the reason, and the graph is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .fusion._match import Reject
from .precision.quantize import Skip, lm_head_node, weight_matmul

NAME = "rescore_top_k"
DEFAULT_TOP_K = 16  # candidates rescored per row (BENCHMARKS.md: the top-1 agreement and the cost per k)
_PREFIX = "/model/lm_head/rescore"


@dataclass
class TiedHead:
    """A float lm_head that reads the embedding table: its input (B, T, D) and the table (V, D)."""

    hidden: ir.Value
    table: ir.Value

    @property
    def vocab(self) -> int:
        return int(self.table.const_value.shape[0])


def find_tied_lm_head(model: ir.Model) -> TiedHead:
    """The float lm_head whose weight is the (transposed) table an embedding Gather reads.

    Returns:
        TiedHead(hidden, table).
    Raises:
        Reject: no lm_head, a lm_head already quantized or with a bias, or one that does not read an embedding
            table (an untied lm_head), with the reason.
    """
    graph = model.graph
    node = lm_head_node(graph)
    if node is None:
        raise Reject("no float MatMul computes the logits output (already quantized, or no lm_head)")
    try:
        site = weight_matmul(node)
    except Skip as reason:
        raise Reject(f"the lm_head is not a weight MatMul: {reason}") from None
    table = graph.initializers.get(site.source_name)
    gathers = [] if table is None else [n for n in table.consumers() if n.op_type == "Gather"
                                        and n.inputs[0] is table and _attr(n, "axis", 0) == 0]
    if not gathers:
        raise Reject(f"the lm_head's weight {site.source_name!r} is not an embedding table any Gather reads "
                     f"(an untied lm_head: no float copy to rescore from)")
    if not site.transposed or table.const_value.dtype != ir.DataType.FLOAT:
        raise Reject(f"the table {site.source_name!r} is not a float32 (vocab, hidden) matrix the lm_head "
                     f"reads transposed")
    if site.bias is not None or _adds_bias(node):
        raise Reject("the lm_head adds a bias, which an embedding table does not hold")
    return TiedHead(hidden=site.x, table=table)


def rescore_top_k(model: ir.Model, head: TiedHead, k: int = DEFAULT_TOP_K) -> int:
    """Recompute each row's k largest logits exactly from the float table (module docstring).

    Args:
        model: changed in place; its lm_head (quantized or not) reads head.hidden and writes the output "logits".
        head: what find_tied_lm_head found before the lm_head was quantized.
        k: candidates per row (at most the vocabulary).
    Returns:
        1 when the nodes were added.
    Raises:
        ValueError: k < 1.
        Reject: the graph has no logits output, or the table or hidden value is no longer in it.
    """
    if k < 1:
        raise ValueError(f"rescore top-k {k}: expected at least 1 candidate per row")
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None or logits.producer() is None:
        raise Reject("graph has no logits output computed by a node")
    if head.table.name not in graph.initializers or head.hidden.producer() is None and head.hidden not in graph.inputs:
        raise Reject("the embedding table or the lm_head's input is no longer in the graph")
    k = min(k, head.vocab)

    def const(name, values):
        value = ir.Value(name=f"{_PREFIX}/{name}", const_value=ir.tensor(np.array(values, dtype=np.int64)))
        graph.register_initializer(value)
        return value

    top = ir.Node("", "TopK", [logits, const("k", [k])], [ir.AttrInt64("axis", -1), ir.AttrInt64("sorted", 0)],
                  num_outputs=2, name=f"{_PREFIX}/TopK")  # (B, T, k) values (unused), indices
    rows = ir.Node("", "Gather", [head.table, top.outputs[1]], [ir.AttrInt64("axis", 0)],
                   name=f"{_PREFIX}/Gather")  # (B, T, k, D)
    column = ir.Node("", "Unsqueeze", [head.hidden, const("last", [-1])], name=f"{_PREFIX}/Unsqueeze")  # (B, T, D, 1)
    dots = ir.Node("", "MatMul", [rows.outputs[0], column.outputs[0]], name=f"{_PREFIX}/MatMul")  # (B, T, k, 1)
    exact = ir.Node("", "Squeeze", [dots.outputs[0], const("squeeze", [-1])], name=f"{_PREFIX}/Squeeze")  # (B, T, k)
    scatter = ir.Node("", "ScatterElements", [logits, top.outputs[1], exact.outputs[0]], [ir.AttrInt64("axis", -1)],
                      name=f"{_PREFIX}/ScatterElements")  # (B, T, V)
    for node in (top, rows, column, dots, exact, scatter):
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}/output_{i}"  # explicit: auto names could collide with the graph's
    graph.insert_after(logits.producer(), [top, rows, column, dots, exact, scatter])
    new = scatter.outputs[0]
    new.type, new.shape = logits.type, logits.shape
    graph.outputs[graph.outputs.index(logits)] = new
    logits.name, new.name = f"{_PREFIX}/approx_logits", "logits"
    return 1


def _attr(node: ir.Node, name: str, default):
    return node.attributes[name].value if name in node.attributes else default


def _adds_bias(node: ir.Node) -> bool:
    """An Add with a constant between the lm_head's MatMul and the logits output (GPT-J's lm_head bias)."""
    value = node.outputs[0]
    while value.consumers():
        user = value.consumers()[0]
        if user.op_type == "Add" and any(ir.convenience.get_const_tensor(v) is not None for v in user.inputs):
            return True
        if len(value.consumers()) != 1 or not user.outputs:
            return False
        value = user.outputs[0]
    return False
