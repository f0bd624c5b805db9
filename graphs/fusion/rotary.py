"""GPT-J interleaved partial rotary -> com.microsoft RotaryEmbedding (interleaved=1, rotary_embedding_dim).

Matches the form exporter/traced_form.py traces (one per q and per k):

    x3 (B, T, D) -Reshape-> view (B, T, nh, hs) -Slice[:rd]-> Reshape (B, T, nh, rd/2, 2) -Gather 0 / 1-> even, odd
    table (max_pos, rd) -Gather(position_ids)-> Slice[:rd/2] = sin, Slice[rd/2:] = cos  (each Unsqueeze'd on axis 2)
    stack(even*cos - odd*sin, odd*cos + even*sin) -Reshape-> (B, T, nh, rd) -Concat(view[rd:])-> (B, T, nh, hs)

and rewrites it as

    x3 -RotaryEmbedding(position_ids, cos_cache, sin_cache)-> (B, T, D) -Reshape(view's shape)-> (B, T, nh, hs)

When rd == hs the model may skip the slicing; then there is no Slice and no Concat.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._match import Reject, RuleResult, const_array, const_scalar, ensure_ms_opset, int_attr, ms_node, producer, scope

NAME = "rotary"


def _mul_pair(value: ir.Value, what: str) -> tuple[ir.Value, ir.Value]:
    node = producer(value, "Mul", what)
    return node.inputs[0], node.inputs[1]


def _terms(node: ir.Node, what: str) -> list[tuple[ir.Value, ir.Value]]:
    return [_mul_pair(node.inputs[0], what), _mul_pair(node.inputs[1], what)]


def _select(value: ir.Value, what: str) -> tuple[ir.Value, int]:
    """value = Gather(pairs, k, axis=-1) with a scalar k; returns (pairs, k)."""
    node = producer(value, "Gather", what)
    axis = int_attr(node, "axis", 0)
    if axis not in (-1, 4):
        raise Reject(f"{what}: Gather on axis {axis}, expected the last (pair) axis")
    return node.inputs[0], int(const_scalar(node.inputs[1], f"{what} index"))


def _slice_bounds(node: ir.Node, what: str) -> tuple[int, int, int]:
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None or starts.size != 1 or (axes is not None and axes.size != 1):
        raise Reject(f"{what}: slice bounds are not constant single-axis")
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        raise Reject(f"{what}: slice step is not 1")
    axis = -1 if axes is None else int(axes.reshape(-1)[0])
    return axis, int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


class _SinCos:
    """sin / cos = Unsqueeze(Slice(Gather(table, position_ids), half), axis 2)."""

    def __init__(self, value: ir.Value, what: str):
        unsq = producer(value, "Unsqueeze", what)
        sl = producer(unsq.inputs[0], "Slice", f"{what} half")
        gather = producer(sl.inputs[0], "Gather", f"{what} table lookup")
        self.table, self.position_ids = gather.inputs[0], gather.inputs[1]
        table = const_array(self.table)
        if table is None or table.ndim != 2:
            raise Reject(f"{what}: position table is not a constant (max_positions, rotary_dim)")
        half = table.shape[1] // 2
        axis, start, end = _slice_bounds(sl, what)
        self.half_index = {(0, half): 0, (half, table.shape[1]): 1}.get((start, min(end, table.shape[1])))
        if axis not in (-1, 2) or self.half_index is None:
            raise Reject(f"{what}: slice [{start}:{end}] is not a half of the {table.shape[1]}-wide table")
        self.array = table


def _match(graph: ir.Graph, stack: ir.Node) -> dict:
    if int_attr(stack, "axis") not in (-1, 5) or len(stack.inputs) != 2:
        raise Reject("Concat is not a two-way stack on the last axis")
    diff = producer(producer(stack.inputs[0], "Unsqueeze", "first stacked").inputs[0], "Sub", "first stacked")
    summ = producer(producer(stack.inputs[1], "Unsqueeze", "second stacked").inputs[0], "Add", "second stacked")
    (e1, c1), (o1, s1) = _terms(diff, "even*cos - odd*sin")
    p_even, k_even = _select(e1, "even")
    p_odd, k_odd = _select(o1, "odd")
    if p_even is not p_odd or (k_even, k_odd) != (0, 1):
        raise Reject("even/odd are not channels 0/1 of the same pairs tensor")
    terms = _terms(summ, "odd*cos + even*sin")
    flat = {frozenset((id(a), id(b))) for a, b in terms}
    if flat != {frozenset((id(o1), id(c1))), frozenset((id(e1), id(s1)))}:
        raise Reject("second stacked term is not odd*cos + even*sin with the same operands")
    sin, cos = _SinCos(s1, "sin"), _SinCos(c1, "cos")
    if (sin.half_index, cos.half_index) != (0, 1) or sin.table is not cos.table:
        raise Reject("sin/cos are not the first/second half of one position table")
    if sin.position_ids is not cos.position_ids:
        raise Reject("sin and cos use different position ids")
    pairs = producer(p_even, "Reshape", "pairs")
    return dict(stack=stack, pairs=pairs, table=sin.array, table_value=sin.table, position_ids=sin.position_ids)


def _source(graph: ir.Graph, m: dict) -> None:
    """Find view (B, T, nh, hs) and x3 (B, T, D) behind the pairs, and the value the rotary result replaces."""
    rotated = m["pairs"].inputs[0]
    flat_users = m["stack"].outputs[0].consumers()
    if len(flat_users) != 1 or flat_users[0].op_type != "Reshape":
        raise Reject("stacked pairs are not flattened by one Reshape")
    out = flat_users[0].outputs[0]  # (B, T, nh, rd)
    rd = m["table"].shape[1]
    sliced = rotated.producer()
    if sliced is not None and sliced.op_type == "Slice":
        axis, start, end = _slice_bounds(sliced, "rotary slice")
        if axis not in (-1, 3) or start != 0 or end < rd:
            raise Reject(f"rotary input slice [{start}:{end}] on axis {axis} is not [:{rd}] of the head axis")
        view = sliced.inputs[0]
        users = out.consumers()
        if len(users) != 1 or users[0].op_type != "Concat" or int_attr(users[0], "axis") not in (-1, 3):
            raise Reject("rotated part is not concatenated back with the pass-through channels")
        cat = users[0]
        passthrough = producer(cat.inputs[1], "Slice", "pass-through") if len(cat.inputs) == 2 else None
        if passthrough is None or passthrough.inputs[0] is not view or cat.inputs[0] is not out:
            raise Reject("Concat does not join [rotated, view[rd:]] of the same view")
        if _slice_bounds(passthrough, "pass-through")[1] != min(end, rd):
            raise Reject("pass-through slice does not start at rotary_dim")
        m["replaces"] = cat.outputs[0]
    else:
        view, m["replaces"] = rotated, out
    reshape = producer(view, "Reshape", "head split")
    x3 = reshape.inputs[0]
    shape = view.shape
    if x3.shape is None or len(x3.shape) != 3 or shape is None or len(shape) != 4:
        raise Reject("rotary input is not Reshape((B, T, D) -> (B, T, nh, hs))")
    if not isinstance(shape[2], int) or not isinstance(shape[3], int):
        raise Reject(f"head axes of {shape} are not static")
    m.update(x3=x3, head_shape=reshape.inputs[1], num_heads=shape[2], head_size=shape[3], rotary_dim=rd)


def _caches(graph: ir.Graph, m: dict, made: dict) -> tuple[ir.Value, ir.Value]:
    """cos_cache and sin_cache (max_pos, rd/2), made once per position table."""
    key = id(m["table_value"])
    if key not in made:
        table, half = m["table"], m["table"].shape[1] // 2
        values = []
        for part, array in (("cos", table[:, half:]), ("sin", table[:, :half])):
            value = ir.Value(name=f"/model/rotary/{part}_cache", const_value=ir.tensor(np.ascontiguousarray(array)))
            value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(value)
            values.append(value)
        made[key] = tuple(values)
    return made[key]


def _rewrite(graph: ir.Graph, m: dict, caches) -> None:
    proj = scope(m["x3"].producer(), "")  # e.g. /model/layers.0/attn/q_proj
    which = "q" if proj.endswith("q_proj") else "k" if proj.endswith("k_proj") else "qk"
    prefix = f"{scope(m['stack'])}/{which}_rotary"
    rot = ms_node("RotaryEmbedding", [m["x3"], m["position_ids"], *caches],
                  dict(interleaved=1, num_heads=m["num_heads"], rotary_embedding_dim=m["rotary_dim"]),
                  f"{prefix}/RotaryEmbedding")
    rot.outputs[0].name = f"{prefix}/RotaryEmbedding/output_0"
    back = ir.Node("", "Reshape", [rot.outputs[0], m["head_shape"]], name=f"{prefix}/Reshape")
    anchor = m["replaces"].producer()
    graph.insert_before(anchor, [rot, back])
    back.outputs[0].shape, back.outputs[0].type = m["replaces"].shape, m["replaces"].type
    ir.convenience.replace_all_uses_with(m["replaces"], back.outputs[0], replace_graph_outputs=True)


def _is_candidate(node: ir.Node) -> bool:
    """A Concat stacking an unsqueezed Sub: the shape of a rotation, worth a reason if it does not match."""
    first = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    inner = first.inputs[0].producer() if first is not None and first.op_type == "Unsqueeze" else None
    return inner is not None and inner.op_type == "Sub"


def fuse_rotary(model: ir.Model, result: RuleResult | None = None) -> int:
    """Fuse every interleaved rotary (q and k per layer) into RotaryEmbedding.

    Args:
        model: the graph, changed in place.
        result: collects the count and one reason per rejected candidate (a stack Concat).
    Returns:
        The number of RotaryEmbedding nodes made.
    """
    result = result if result is not None else RuleResult()
    graph, made = model.graph, {}
    for node in [n for n in graph if n.op_type == "Concat" and n.domain == ""]:
        try:
            if not _is_candidate(node):
                continue
            m = _match(graph, node)
            _source(graph, m)
        except Reject as reason:
            result.rejections.append(f"{node.name}: {reason}")
            continue
        ensure_ms_opset(model)
        _rewrite(graph, m, _caches(graph, m, made))
        result.count += 1
    return result.count
