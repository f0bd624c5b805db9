"""Self-attention with past KV -> com.microsoft MultiHeadAttention (one per layer).

Matches what exporter/traced_form.py's attention function traces (GPT-2 and GPT-J alike):

    q3 ─Reshape─Transpose(0,2,1,3)──────────────────────────────▶ q4 (B, nh, T, hs)
    k3 ─Reshape─Transpose─┐
    past_key_values.i.key ┴Concat(axis 2)─▶ present.i.key ─Transpose(0,1,3,2)─▶ kT
    q4 @ kT ─Mul(scale)─Add(mask (B, 1, T, P+T))─Softmax(-1)─┐
    v3 ─Reshape─Transpose─┐                                  │
    past_key_values.i.value ┴Concat(axis 2)─▶ present.i.value ─MatMul─Transpose(0,2,1,3)─▶ (B, T, nh, hs)

and rewrites it as

    MultiHeadAttention(q3, k3, v3, attention_bias=mask, past_key, past_value; num_heads, scale)
        ─▶ output (B, T, D), present.i.key, present.i.value   (same names and shapes as before)

The additive mask carries causality and left padding as transformers computed it, so any padding works; the
graph's inputs and outputs do not change.
"""

from __future__ import annotations

import onnx_ir as ir

from ._match import (Reject, RuleResult, adopt_output, apply_rule, const_scalar, int_attr,
                     ms_node, producer, scope)

NAME = "attention"


def _perm(node: ir.Node, want: tuple[int, ...], what: str) -> None:
    perm = tuple(int_attr(node, "perm", ()))
    if perm != want:
        raise Reject(f"{what}: Transpose perm {perm}, expected {want}")


def _heads(value: ir.Value, what: str) -> ir.Value:
    """value = Transpose(Reshape(x3 (B, T, D)), perm 0,2,1,3); returns x3."""
    transpose = producer(value, "Transpose", what)
    _perm(transpose, (0, 2, 1, 3), what)
    x3 = producer(transpose.inputs[0], "Reshape", f"{what} head split").inputs[0]
    if x3.shape is not None and len(x3.shape) != 3:
        raise Reject(f"{what}: projection has rank {len(x3.shape)}, expected 3 (B, T, D)")
    return x3


def _cache(graph: ir.Graph, present: ir.Value, what: str) -> tuple[ir.Value, ir.Value]:
    """present = Concat(past graph input, new heads, axis 2) and a graph output; returns (past, x3)."""
    concat = producer(present, "Concat", f"{what} cache")
    if int_attr(concat, "axis") not in (2, -2) or len(concat.inputs) != 2:
        raise Reject(f"{what} cache: Concat is not (past, new) on the sequence axis")
    past = concat.inputs[0]
    if past not in graph.inputs:
        raise Reject(f"{what} cache: first Concat input {past.name!r} is not a graph input")
    if present not in graph.outputs:
        raise Reject(f"{what} cache: concatenated {what} {present.name!r} is not a graph output")
    return past, _heads(concat.inputs[1], f"new {what}")


def _match(graph: ir.Graph, softmax: ir.Node) -> dict:
    if int_attr(softmax, "axis", -1) not in (-1, 3):
        raise Reject(f"Softmax axis {int_attr(softmax, 'axis')} is not the key axis")
    add = producer(softmax.inputs[0], "Add", "masked scores")
    mul_first = add.inputs[0].producer() is not None and add.inputs[0].producer().op_type == "Mul"
    scores, mask = (add.inputs[0], add.inputs[1]) if mul_first else (add.inputs[1], add.inputs[0])
    mul = producer(scores, "Mul", "scaled scores")
    qk_first = mul.inputs[0].producer() is not None and mul.inputs[0].producer().op_type == "MatMul"
    qk, scale_value = (mul.inputs[0], mul.inputs[1]) if qk_first else (mul.inputs[1], mul.inputs[0])
    scale = const_scalar(scale_value, "attention scale")
    matmul = producer(qk, "MatMul", "q @ k^T")
    k_t = producer(matmul.inputs[1], "Transpose", "k^T")
    _perm(k_t, (0, 1, 3, 2), "k^T")
    if mask.shape is not None and len(mask.shape) != 4:
        raise Reject(f"mask has rank {len(mask.shape)}, expected 4 (B, 1, T, P+T)")
    users = softmax.outputs[0].consumers()
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not softmax.outputs[0]:
        raise Reject("probabilities are not consumed by exactly one MatMul with values")
    out_users = users[0].outputs[0].consumers()
    if len(out_users) != 1 or out_users[0].op_type != "Transpose":
        raise Reject("attention output is not transposed back to (B, T, nh, hs)")
    _perm(out_users[0], (0, 2, 1, 3), "attention output")
    present_k, present_v = k_t.inputs[0], users[0].inputs[1]
    past_k, k3 = _cache(graph, present_k, "key")
    past_v, v3 = _cache(graph, present_v, "value")
    q3 = _heads(matmul.inputs[0], "query")
    q4 = matmul.inputs[0]
    if q4.shape is None or len(q4.shape) != 4 or not isinstance(q4.shape[1], int) or not isinstance(q4.shape[3], int):
        raise Reject(f"query heads shape {q4.shape} has no static (num_heads, head_size)")
    for value, name in ((scores, "scores"), (qk, "q @ k^T"), (add.outputs[0], "masked scores")):
        if len(value.consumers()) != 1:
            raise Reject(f"{name} are used outside attention")
    return dict(q3=q3, k3=k3, v3=v3, mask=mask, past_k=past_k, past_v=past_v, present_k=present_k,
                present_v=present_v, scale=scale, num_heads=q4.shape[1], head_size=q4.shape[3],
                out=out_users[0].outputs[0], anchor=out_users[0], softmax=softmax)


def _rewrite(graph: ir.Graph, m: dict) -> None:
    prefix = scope(m["softmax"])
    mha = ms_node("MultiHeadAttention",
                  [m["q3"], m["k3"], m["v3"], None, None, m["mask"], m["past_k"], m["past_v"]],
                  dict(num_heads=m["num_heads"], scale=m["scale"]), f"{prefix}/MultiHeadAttention", num_outputs=3)
    out3, present_k, present_v = mha.outputs
    out3.name = f"{prefix}/MultiHeadAttention/output_0"
    out3.type, out3.shape = m["q3"].type, m["q3"].shape  # (B, T, D): the context, heads merged
    new = [mha]
    out = m["out"]  # (B, T, nh, hs): reshapes of it read the same memory from (B, T, D)
    if all(u.op_type == "Reshape" and u.inputs[0] is out for u in out.consumers()):
        for user in out.consumers():
            user.replace_input_with(0, out3)
    else:
        shape = ir.Value(name=f"{prefix}/heads_shape",
                         const_value=ir.tensor([0, 0, m["num_heads"], m["head_size"]], dtype=ir.DataType.INT64))
        graph.register_initializer(shape)
        back = ir.Node("", "Reshape", [out3, shape], name=f"{prefix}/Reshape")
        new.append(back)
        ir.convenience.replace_all_uses_with(out, back.outputs[0])
    graph.insert_before(m["anchor"], new)
    adopt_output(graph, m["present_k"], present_k)
    adopt_output(graph, m["present_v"], present_v)


def fuse_attention(model: ir.Model, result: RuleResult | None = None) -> int:
    """Fuse every self-attention with past KV into MultiHeadAttention.

    Args:
        model: the graph, changed in place (unused nodes are left for the pipeline's cleanup).
        result: collects the count and one reason per rejected candidate (a Softmax).
    Returns:
        The number of MultiHeadAttention nodes made.
    """
    return apply_rule(model, result, "Softmax", _match, _rewrite)
