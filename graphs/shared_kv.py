"""A decode graph whose KV cache is written in place: MultiHeadAttention -> GroupQueryAttention (shared buffer).

The default artifact graph (docs/ARTIFACT.md) concatenates past and new K/V every step, so every decode step
copies the whole cache. This rule rewrites a fused graph into the "shared_kv" variant:

    MultiHeadAttention(q3, k3, v3, bias=mask, past_k, past_v) ─▶ out, present.i.key, present.i.value
becomes
    GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens_k, total_sequence_length) ─▶ out, present.i.key, ...

with the past inputs (batch, num_heads, max_sequence, head_size) buffers that the runtime binds as the presents
too (IO binding, same OrtValue): onnxruntime writes each row's new K/V at slot seqlens_k[b] and nothing else moves.
Rows are right-padded (each row's cache is contiguous from slot 0), so the additive mask is no longer an input
of attention; causality and each row's length come from seqlens_k. And the logits are gathered before lm_head:

    hidden (B, T, D) ─GatherElements(axis 1, logits_index (B*n,) as (B, n, 1) broadcast to (B, n, D))─▶ (B, n, D)
        ─▶ lm_head

so prefill computes the vocabulary projection for one position per row (each row's last real token), and a
speculative decoding step (runtime/speculative.py) for the n positions of its drafts: logits_index holds n
positions per row, row after row (n = 1: one per row, as before).

New graph inputs: seqlens_k int32 (batch,) = each row's total length - 1; total_sequence_length int32 scalar =
the longest row's total length; logits_index int64 (batch * positions,). attention_mask is removed (unused).
"""

from __future__ import annotations

import onnx_ir as ir

from .fusion._match import MS_DOMAIN, Reject, RuleResult, ensure_ms_opset
from .signature import io_spec

NAME = "shared_kv"
KV_LAYOUT = "shared_buffer"  # the manifest's "kv_layout" for this graph (the default graph has no such key)
SEQLENS, TOTAL, LOGITS_INDEX = "seqlens_k", "total_sequence_length", "logits_index"
# logits_index's dimension: n positions per row, flattened (a graph made before it took "batch": one per row)
INDEX_DIM, POSITIONS_DIM = "batch_x_positions", "positions"
_NORMS = {("", "LayerNormalization"), (MS_DOMAIN, "SkipLayerNormalization"), (MS_DOMAIN, "LayerNormalization")}


def _mha_to_gqa(graph: ir.Graph, mha: ir.Node, seqlens: ir.Value, total: ir.Value) -> None:
    q3, k3, v3 = mha.inputs[:3]
    past_k, past_v = (mha.inputs[6], mha.inputs[7]) if len(mha.inputs) > 7 else (None, None)
    if past_k is None or past_k not in graph.inputs or past_v not in graph.inputs:
        raise Reject("past key/value are not graph inputs")
    if any(mha.inputs[i] is not None for i in (3, 4) if i < len(mha.inputs)):
        raise Reject("MultiHeadAttention has a bias or a key padding mask (only an additive mask is replaced)")
    if k3 is None or v3 is None or (k3.shape is not None and len(k3.shape) != 3):
        raise Reject("key/value are not (B, T, D) projections")
    heads = mha.attributes["num_heads"].as_int()
    attrs = [ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", heads)]
    if "scale" in mha.attributes:
        attrs.append(ir.AttrFloat32("scale", mha.attributes["scale"].as_float()))
    gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention", [q3, k3, v3, past_k, past_v, seqlens, total], attrs,
                  num_outputs=3, name=mha.name.replace("MultiHeadAttention", "GroupQueryAttention"))
    graph.insert_before(mha, gqa)
    for old, new in zip(mha.outputs, gqa.outputs):
        name, new.type, new.shape = old.name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_mha", name
    graph.remove(mha, safe=True)


def _lm_head_input(graph: ir.Graph) -> ir.Value:
    """The (B, T, D) value that lm_head reads: the last norm's output, through single-consumer Reshapes."""
    logits = next((o for o in graph.outputs if o.name == "logits"), None)
    if logits is None:
        raise Reject("graph has no logits output")
    norms = [n for n in graph if (n.domain, n.op_type) in _NORMS]
    if not norms:
        raise Reject("no final LayerNormalization before lm_head")
    value = norms[-1].outputs[0]
    while len(value.consumers()) == 1 and value.consumers()[0].op_type == "Reshape":
        value = value.consumers()[0].outputs[0]
    return value


def _gather_last(graph: ir.Graph, hidden: ir.Value, index: ir.Value) -> None:
    """hidden (B, T, D) -> (B, n, D) at index (B*n,) per row; every reader of hidden reads the gathered value."""
    prefix = "/model/logits_index"

    def const(name, values):
        value = ir.Value(name=f"{prefix}/{name}", const_value=ir.tensor(values, dtype=ir.DataType.INT64))
        graph.register_initializer(value)
        return value

    users = list(hidden.consumers())
    shape = ir.Node("", "Shape", [hidden], name=f"{prefix}/Shape")
    keep = ir.Node("", "Mul", [shape.outputs[0], const("keep", [1, 0, 1])], name=f"{prefix}/Mul")
    one = ir.Node("", "Add", [keep.outputs[0], const("one", [0, 1, 0])], name=f"{prefix}/Add")  # (B, 1, D)
    rows = ir.Node("", "Mul", [shape.outputs[0], const("rows", [1, 0, 0])], name=f"{prefix}/Mul_1")
    col = ir.Node("", "Add", [rows.outputs[0], const("col", [0, -1, 1])], name=f"{prefix}/Add_1")  # [B, -1, 1]
    idx = ir.Node("", "Reshape", [index, col.outputs[0]], name=f"{prefix}/Reshape")  # (B, n, 1)
    wide = ir.Node("", "Expand", [idx.outputs[0], one.outputs[0]], name=f"{prefix}/Expand")  # (B, n, D)
    gather = ir.Node("", "GatherElements", [hidden, wide.outputs[0]], [ir.AttrInt64("axis", 1)],
                     name=f"{prefix}/GatherElements")
    for node in (shape, keep, one, rows, col, idx, wide, gather):
        node.outputs[0].name = f"{node.name}/output_0"  # explicit: auto names could collide with the graph's
    graph.insert_before(users[0], [shape, keep, one, rows, col, idx, wide, gather])
    for user in users:
        for i, value in enumerate(user.inputs):
            if value is hidden:
                user.replace_input_with(i, gather.outputs[0])


def to_shared_kv(model: ir.Model, result: RuleResult | None = None) -> int:
    """Rewrite a fused graph into the shared_kv variant (see the module docstring).

    Args:
        model: a graph fused by graphs.pipeline (every attention a MultiHeadAttention), changed in place.
        result: collects the count and one reason per rejected candidate.
    Returns:
        The number of attentions rewritten.
    Raises:
        Reject: the graph cannot become the variant (no MultiHeadAttention, an attention that does not fit,
            no lm_head input found); nothing is half-rewritten for the attention checks.
    """
    result = result if result is not None else RuleResult()
    graph = model.graph
    mhas = [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]
    pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    if not mhas or 2 * len(mhas) != len(pasts):
        raise Reject(f"{len(mhas)} MultiHeadAttention nodes for {len(pasts)} past inputs: fuse the graph first")
    hidden = _lm_head_input(graph)
    batch = pasts[0].shape[0] if pasts[0].shape is not None else "batch"
    seqlens = ir.Value(name=SEQLENS, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch]))
    total = ir.Value(name=TOTAL, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    index = ir.Value(name=LOGITS_INDEX, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([INDEX_DIM]))
    ensure_ms_opset(model)
    for mha in mhas:
        _mha_to_gqa(graph, mha, seqlens, total)
        result.count += 1
    _gather_last(graph, hidden, index)
    graph.inputs.extend([seqlens, total, index])
    for value in [v for v in graph.inputs if v.name == "attention_mask"]:
        _remove_mask(graph, value)
    for value in graph.inputs:
        if value.name.startswith("past_key_values."):
            value.shape = ir.Shape([batch, value.shape[1], "max_sequence", value.shape[3]])
    for value in graph.outputs:
        if value.name.startswith("present."):
            value.shape = ir.Shape([batch, value.shape[1], "max_sequence", value.shape[3]])
        if value.name == "logits":
            value.shape = ir.Shape([batch, POSITIONS_DIM, value.shape[2]])
    return result.count


def _remove_mask(graph: ir.Graph, mask: ir.Value) -> None:
    """Drop the attention_mask input and the nodes that only computed the additive mask from it."""
    changed = True
    while changed:  # remove nodes none of whose outputs is read, sinks first
        changed = False
        for node in reversed(list(graph)):
            if all(not o.consumers() and o not in graph.outputs for o in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    if not mask.consumers():
        graph.inputs.remove(mask)
    for name, value in list(graph.initializers.items()):
        if not value.consumers() and value not in graph.outputs:
            del graph.initializers[name]


def manifest_facts(model: ir.Model, count: int, num_layers: int) -> dict:
    """What the manifest says about the rewritten graph, as data (the exporter merges it and writes the files).

    Args:
        model: the graph after `to_shared_kv`.
        count: what `to_shared_kv` returned.
        num_layers: the architecture's layers: one GroupQueryAttention each is expected, like the fused attention.
    Returns:
        {"kv_layout", "counts": {NAME: count}, "expected": {NAME: num_layers}, "inputs", "outputs"}.
    """
    return {"kv_layout": KV_LAYOUT, "counts": {NAME: count}, "expected": {NAME: num_layers},
            "inputs": io_spec(model.graph.inputs), "outputs": io_spec(model.graph.outputs)}


def input_names(default: list[str]) -> list[str]:
    """The variant's graph inputs, in order, given the default graph's (docs/ARTIFACT.md)."""
    return [n for n in default if n != "attention_mask"] + [SEQLENS, TOTAL, LOGITS_INDEX]
