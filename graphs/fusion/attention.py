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

Optimum's export (torch's SDPA or transformers' eager attention traced by TorchScript, after graphs/canonical.py)
differs in these places, each accepted here:

    scale split over q and k    (q4 * sqrt(scale)) @ (kT * sqrt(scale))       -> scale = the product
    scale as a division         (q4 @ kT) / sqrt(head_size)                  -> scale = 1 / the divisor
    boolean mask                Add(scores, Where(keep (B, 1, T, P+T), 0, -inf))
    NaN guard                   Where(IsNaN(probs), 0, probs) before probs @ V (rows with every key masked)

MultiHeadAttention takes the boolean form as Where(keep, 0, the dtype's finite minimum): with -inf a row with every
key masked (a left-pad query) would be NaN in the kernel, which has no guard; with the finite minimum it is a
finite average that no real position reads (its keys are masked for every real query), as in transformers' own
eager mask.

The graphs of the other tasks (exporter/heads.py: hidden states, classification, ...) have no cache: there k4 and
v4 are the new heads themselves (no Concat, no present output; the optimizer merges the key's two Transposes into
one, perm 0,2,3,1), and the rewrite is MultiHeadAttention(q3, k3, v3, attention_bias=mask) with one output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._match import (Reject, RuleResult, adopt_output, apply_rule, const_array, const_scalar, int_attr,
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


def _cache(graph: ir.Graph, present: ir.Value, what: str) -> tuple[ir.Value | None, ir.Value]:
    """present = Concat(past graph input, new heads, axis 2) and a graph output; returns (past, x3).

    Without a cache (no Concat: the heads of this step only, used by attention alone), returns (None, x3).
    """
    made = present.producer()
    if made is not None and made.op_type == "Transpose" and present not in graph.outputs:
        if len(present.consumers()) != 1:
            raise Reject(f"{what} heads (no cache) are used outside attention")
        return None, _heads(present, f"{what} (no cache)")
    concat = producer(present, "Concat", f"{what} cache")
    if int_attr(concat, "axis") not in (2, -2) or len(concat.inputs) != 2:
        raise Reject(f"{what} cache: Concat is not (past, new) on the sequence axis")
    past = concat.inputs[0]
    if past not in graph.inputs:
        raise Reject(f"{what} cache: first Concat input {past.name!r} is not a graph input")
    if present not in graph.outputs:
        raise Reject(f"{what} cache: concatenated {what} {present.name!r} is not a graph output")
    return past, _heads(concat.inputs[1], f"new {what}")


def _made_by(value: ir.Value, *ops: str) -> bool:
    node = value.producer()
    return node is not None and node.op_type in ops and node.domain == ""


def _scores(add: ir.Node) -> dict:
    """masked scores = Add(scores, mask): the scaled q @ k^T and the mask, in either of the two forms."""
    first = _made_by(add.inputs[0], "Mul", "Div", "MatMul")
    scores, mask = (add.inputs[0], add.inputs[1]) if first else (add.inputs[1], add.inputs[0])
    node = producer(scores, ("Mul", "Div", "MatMul"), "scaled scores")
    if node.op_type in ("Mul", "Div"):  # (q4 @ kT) * scale, or / sqrt(head_size) (transformers' eager GPT-J)
        qk_first = _made_by(node.inputs[0], "MatMul") or node.op_type == "Div"
        qk, scale_value = (node.inputs[0], node.inputs[1]) if qk_first else (node.inputs[1], node.inputs[0])
        scale = const_scalar(scale_value, "attention scale")
        if node.op_type == "Div":
            scale = 1.0 / scale
        matmul = producer(qk, "MatMul", "q @ k^T")
        q4, k_t_value, private = matmul.inputs[0], matmul.inputs[1], [scores, qk]
    else:  # (q4 * a) @ (kT * b): torch's SDPA scales q and k by sqrt(scale) each
        qk, matmul = scores, node
        q4, a = _scaled(matmul.inputs[0], "scaled query")
        k_t_value, b = _scaled(matmul.inputs[1], "scaled k^T")
        scale, private = a * b, [scores, matmul.inputs[0], matmul.inputs[1]]
    k_t = producer(k_t_value, "Transpose", "k^T")
    if tuple(int_attr(k_t, "perm", ())) != (0, 2, 3, 1):  # that: the no-cache key (see the docstring)
        _perm(k_t, (0, 1, 3, 2), "k^T")
    return dict(mask=mask, scale=scale, matmul=matmul, q4=q4, k_t=k_t, private=private, **_mask_form(mask))


def _scaled(value: ir.Value, what: str) -> tuple[ir.Value, float]:
    """value = Mul(x, constant scalar) -> (x, the constant)."""
    mul = producer(value, "Mul", what)
    for i in (0, 1):
        array = const_array(mul.inputs[i])
        if array is not None and array.size == 1:
            return mul.inputs[1 - i], float(array.reshape(()))
    raise Reject(f"{what}: no constant scalar factor")


def _mask_form(mask: ir.Value) -> dict:
    """Where(keep, 0, -inf) -> the boolean `keep` (MultiHeadAttention gets a finite minimum instead: see the
    docstring); any other additive mask, transformers' finite one included, the kernel takes as it is."""
    node = mask.producer()
    if node is None or node.op_type != "Where" or node.domain != "":
        return {"keep": None}
    zero, masked = const_array(node.inputs[1]), const_array(node.inputs[2])
    if zero is None or masked is None or zero.size != 1 or masked.size != 1 or float(zero.reshape(())) != 0.0 \
            or float(masked.reshape(())) != -np.inf:
        return {"keep": None}
    return {"keep": node.inputs[0], "mask_dtype": node.inputs[2].dtype, "mask_where": node}


def _probabilities(softmax: ir.Node) -> ir.Value:
    """The softmax output, or Where(IsNaN(p), 0, p) (Optimum's guard for rows with every key masked)."""
    probs = softmax.outputs[0]
    users = probs.consumers()
    guard = next((u for u in users if u.op_type == "Where" and u.domain == ""), None)
    if len(users) == 2 and guard is not None and {u.op_type for u in users} == {"IsNaN", "Where"}:
        is_nan = next(u for u in users if u.op_type == "IsNaN")
        zero = const_array(guard.inputs[1])
        if guard.inputs[0] is not is_nan.outputs[0] or guard.inputs[2] is not probs or zero is None or \
                zero.size != 1 or float(zero.reshape(())) != 0.0 or len(is_nan.outputs[0].consumers()) != 1:
            raise Reject("probabilities' Where is not the NaN guard Where(IsNaN(p), 0, p)")
        return guard.outputs[0]
    return probs


def _no_cache_key(graph: ir.Graph, k_t: ir.Node) -> ir.Value | None:
    """k^T = Transpose(Reshape(k3), perm 0,2,3,1): both key Transposes in one, no cache; returns k3, else None."""
    if tuple(int_attr(k_t, "perm", ())) != (0, 2, 3, 1):
        return None
    reshape = producer(k_t.inputs[0], "Reshape", "key head split (no cache)")
    if len(k_t.inputs[0].consumers()) != 1 or k_t.inputs[0] in graph.outputs:
        raise Reject("key heads (no cache) are used outside attention")
    k3 = reshape.inputs[0]
    if k3.shape is not None and len(k3.shape) != 3:
        raise Reject(f"key: projection has rank {len(k3.shape)}, expected 3 (B, T, D)")
    return k3


def _match(graph: ir.Graph, softmax: ir.Node) -> dict:
    if int_attr(softmax, "axis", -1) not in (-1, 3):
        raise Reject(f"Softmax axis {int_attr(softmax, 'axis')} is not the key axis")
    add = producer(softmax.inputs[0], "Add", "masked scores")
    s = _scores(add)
    mask = s["mask"]
    if mask.shape is not None and len(mask.shape) != 4:
        raise Reject(f"mask has rank {len(mask.shape)}, expected 4 (B, 1, T, P+T)")
    probs = _probabilities(softmax)
    users = probs.consumers()
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not probs:
        raise Reject("probabilities are not consumed by exactly one MatMul with values")
    out_users = users[0].outputs[0].consumers()
    if len(out_users) != 1 or out_users[0].op_type != "Transpose":
        raise Reject("attention output is not transposed back to (B, T, nh, hs)")
    _perm(out_users[0], (0, 2, 1, 3), "attention output")
    present_k, present_v = s["k_t"].inputs[0], users[0].inputs[1]
    no_cache_k3 = _no_cache_key(graph, s["k_t"])
    past_k, k3 = (None, no_cache_k3) if no_cache_k3 is not None else _cache(graph, present_k, "key")
    past_v, v3 = _cache(graph, present_v, "value")
    if (past_k is None) != (past_v is None):
        raise Reject("key and value differ: one has a cache, the other not")
    shape_readers = [] if past_k is None else \
        _shape_readers(present_k, s["k_t"], "key") + _shape_readers(present_v, users[0], "value")
    q4 = s["q4"]
    q3 = _heads(q4, "query")
    if q4.shape is None or len(q4.shape) != 4 or not isinstance(q4.shape[1], int) or not isinstance(q4.shape[3], int):
        raise Reject(f"query heads shape {q4.shape} has no static (num_heads, head_size)")
    for value in (*s["private"], add.outputs[0]):
        if len(value.consumers()) != 1:
            raise Reject(f"{value.name} (scores) is used outside attention")
    return dict(q3=q3, k3=k3, v3=v3, mask=mask, keep=s["keep"], mask_dtype=s.get("mask_dtype"),
                mask_where=s.get("mask_where"), past_k=past_k,
                past_v=past_v, present_k=present_k, present_v=present_v, scale=s["scale"], num_heads=q4.shape[1],
                head_size=q4.shape[3], out=out_users[0].outputs[0], anchor=out_users[0], softmax=softmax,
                shape_readers=shape_readers)


def _shape_readers(present: ir.Value, reader: ir.Node, what: str) -> list[ir.Node]:
    """The Shape nodes reading `present` besides attention's own `reader` (Optimum slices its mask to the key
    length, Shape(present.i.key)[2]); any other reader would need the concatenated cache: Reject."""
    others = [u for u in present.consumers() if u is not reader]
    if any(u.op_type != "Shape" or u.domain != "" or u.attributes for u in others):
        raise Reject(f"concatenated {what} {present.name!r} is read outside attention: "
                     f"{sorted({u.op_type for u in others})}")
    return others


def _shape_without_concat(graph: ir.Graph, shape: ir.Node) -> None:
    """Shape(Concat(past, new, axis 2)) = Shape(past) + Shape(new) * [0, 0, 1, 0]: the same numbers without the
    concatenation, which MultiHeadAttention now does (a Shape of its present would make the graph a cycle when
    the mask reads it)."""
    past, new = shape.inputs[0].producer().inputs
    name = "/model/attn_cache/sequence_axis"
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]),
                                            const_value=ir.tensor([0, 0, 1, 0], dtype=ir.DataType.INT64)))
    nodes = [ir.Node("", "Shape", [past], name=f"{shape.name}/past"), ir.Node("", "Shape", [new], name=f"{shape.name}/new")]
    nodes.append(ir.Node("", "Mul", [nodes[1].outputs[0], graph.initializers[name]], name=f"{shape.name}/new_length"))
    nodes.append(ir.Node("", "Add", [nodes[0].outputs[0], nodes[2].outputs[0]], name=f"{shape.name}/total"))
    for node in nodes:
        node.outputs[0].name = f"{node.name}/output_0"
        node.outputs[0].type, node.outputs[0].shape = shape.outputs[0].type, shape.outputs[0].shape
    graph.insert_before(shape, nodes)
    ir.convenience.replace_all_uses_with(shape.outputs[0], nodes[-1].outputs[0])


def _finite_mask(graph: ir.Graph, m: dict, prefix: str) -> tuple[ir.Value, list[ir.Node]]:
    """Where(keep, 0, the mask dtype's finite minimum): the (B, 1, T, P+T) additive bias (see the docstring); the
    mask's own Where when attention is its only reader, else a new one (returned, to insert)."""
    dtype = m["mask_dtype"].numpy()
    name = f"/model/attn_mask/masked_{dtype.name}"  # one for every layer
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(m["mask_dtype"]), shape=ir.Shape([]),
                                            const_value=ir.tensor(np.array(np.finfo(dtype).min, dtype))))
    where = m["mask_where"]
    if len(where.outputs[0].consumers()) == 1:
        where.replace_input_with(2, graph.initializers[name])
        return where.outputs[0], []
    new = ir.Node("", "Where", [m["keep"], where.inputs[1], graph.initializers[name]], name=f"{prefix}/mask_bias")
    new.outputs[0].name = f"{prefix}/mask_bias/output_0"
    new.outputs[0].type, new.outputs[0].shape = ir.TensorType(m["mask_dtype"]), m["mask"].shape
    return new.outputs[0], [new]


def _rewrite(graph: ir.Graph, m: dict) -> None:
    prefix = scope(m["softmax"], m["softmax"].name.rsplit("/", 1)[0] or "/model")
    new, mask = [], m["mask"]
    if m["keep"] is not None:
        mask, made = _finite_mask(graph, m, prefix)
        new += made
    cached = m["past_k"] is not None
    inputs = [m["q3"], m["k3"], m["v3"], None, None, mask] + ([m["past_k"], m["past_v"]] if cached else [])
    mha = ms_node("MultiHeadAttention", inputs, dict(num_heads=m["num_heads"], scale=m["scale"]),
                  f"{prefix}/MultiHeadAttention", num_outputs=3 if cached else 1)
    out3 = mha.outputs[0]
    out3.name = f"{prefix}/MultiHeadAttention/output_0"
    out3.type, out3.shape = m["q3"].type, m["q3"].shape  # (B, T, D): the context, heads merged
    new.append(mha)
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
    for shape in m["shape_readers"]:
        _shape_without_concat(graph, shape)
    if cached:
        adopt_output(graph, m["present_k"], mha.outputs[1])
        adopt_output(graph, m["present_v"], mha.outputs[2])


def fuse_attention(model: ir.Model, result: RuleResult | None = None) -> int:
    """Fuse every self-attention (with past KV, or with no cache at all) into MultiHeadAttention.

    Args:
        model: the graph, changed in place (unused nodes are left for the pipeline's cleanup).
        result: collects the count and one reason per rejected candidate (a Softmax).
    Returns:
        The number of MultiHeadAttention nodes made.
    """
    return apply_rule(model, result, "Softmax", _match, _rewrite)
