"""GPT-J interleaved partial rotary -> com.microsoft RotaryEmbedding (interleaved=1, rotary_embedding_dim).

Matches the form exporter/traced_form.py traces (one per q and per k):

    x3 (B, T, D) -Reshape-> view (B, T, nh, hs) -Slice[:rd]-> Reshape (B, T, nh, rd/2, 2) -Gather 0 / 1-> even, odd
    table (max_pos, rd) -Gather(position_ids)-> Slice[:rd/2] = sin, Slice[rd/2:] = cos  (each Unsqueeze'd on axis 2)
    stack(even*cos - odd*sin, odd*cos + even*sin) -Reshape-> (B, T, nh, rd) -Concat(view[rd:])-> (B, T, nh, hs)

and rewrites it as

    x3 -RotaryEmbedding(position_ids, cos_cache, sin_cache)-> (B, T, D) -Reshape(view's shape)-> (B, T, nh, hs)

When rd == hs the model may skip the slicing; then there is no Slice and no Concat.

Optimum's export (transformers' own GPT-J attention, traced by TorchScript, after graphs/canonical.py) writes the
same rotation as `x * cos + rotate_every_two(x) * sin` with the halves repeated per pair:

    view -Slice[:rd]-> x (B, T, nh, rd)
    rotate_every_two(x) = Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., ::2], -1)), (.., rd))
    table (max_pos, rd) -GatherElements(position_ids, axis 1)-> Split(sin, cos)
    sin/cos (B, T, rd/2) -Unsqueeze(2)-Unsqueeze(-1)-Tile(1,1,1,1,2)-Reshape-> (B, T, 1, rd)  (repeat_interleave 2)
    x * cos + rotate_every_two(x) * sin -Concat(view[rd:])-> (B, T, nh, hs)

which is the same interleaved rotation, anchored on the Add and rewritten the same way.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._match import (Reject, RuleResult, const_array, const_scalar, ensure_ms_opset, int_attr, ms_node, other_input,
                     producer, scope)

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


def _slice_steps(node: ir.Node, what: str) -> tuple[int, int, int, int]:
    """A constant single-axis Slice -> (axis, start, end, step)."""
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None or starts.size != 1 or (axes is not None and axes.size != 1):
        raise Reject(f"{what}: slice bounds are not constant single-axis")
    axis = -1 if axes is None else int(axes.reshape(-1)[0])
    step = 1 if steps is None else int(steps.reshape(-1)[0])
    return axis, int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step


def _slice_bounds(node: ir.Node, what: str) -> tuple[int, int, int]:
    axis, start, end, step = _slice_steps(node, what)
    if step != 1:
        raise Reject(f"{what}: slice step is not 1")
    return axis, start, end


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
    flat_users = stack.outputs[0].consumers()
    if len(flat_users) != 1 or flat_users[0].op_type != "Reshape":
        raise Reject("stacked pairs are not flattened by one Reshape")
    return dict(stack=stack, input=pairs.inputs[0], out=flat_users[0].outputs[0], table=sin.array,
                table_value=sin.table, position_ids=sin.position_ids)


def _every_two_candidate(node: ir.Node) -> bool:
    """Add(Mul, Mul) with a Mul reading rotate_every_two's shape: worth a reason if it does not match."""
    muls = [v.producer() for v in node.inputs if v is not None]
    return any(m is not None and m.op_type == "Mul" and any(_looks_every_two(v) for v in m.inputs) for m in muls)


def _looks_every_two(value: ir.Value) -> bool:
    """Reshape(Concat(Unsqueeze(Neg(...)), ...)): the outline only; _rotate_every_two checks the details."""
    node = value.producer()
    for op in ("Reshape", "Concat", "Unsqueeze", "Neg"):
        if node is None or node.op_type != op or node.domain != "":
            return False
        node = node.inputs[0].producer() if op != "Neg" else None
    return True


def _rotate_every_two(value: ir.Value) -> ir.Value:
    """value = rotate_every_two(x) (see the module docstring); returns x."""
    cat = producer(producer(value, "Reshape", "rotate_every_two").inputs[0], "Concat", "rotate_every_two pairs")
    if int_attr(cat, "axis") not in (-1, 4) or len(cat.inputs) != 2:
        raise Reject("rotate_every_two: Concat is not a two-way stack on the last axis")
    neg = producer(producer(cat.inputs[0], "Unsqueeze", "-x_odd").inputs[0], "Neg", "-x_odd")
    odd = producer(neg.inputs[0], "Slice", "x_odd")
    even = producer(producer(cat.inputs[1], "Unsqueeze", "x_even").inputs[0], "Slice", "x_even")
    if odd.inputs[0] is not even.inputs[0]:
        raise Reject("rotate_every_two: odd and even channels are not of the same x")
    for node, start, what in ((even, 0, "x_even"), (odd, 1, "x_odd")):
        axis, got, _, step = _slice_steps(node, what)
        if axis not in (-1, 3) or got != start or step != 2:
            raise Reject(f"{what}: slice [{got}::{step}] on axis {axis} is not [{start}::2] of the last axis")
    return even.inputs[0]


def _repeated_half(value: ir.Value, what: str) -> tuple[ir.Node, int]:
    """value = repeat_interleave(half[:, :, None, :], 2, -1) as Unsqueeze-Unsqueeze-Tile-Reshape, half a Split
    output; returns (the Split, which output)."""
    tile = producer(producer(value, "Reshape", what).inputs[0], "Tile", f"{what} repeat")
    repeats = const_array(tile.inputs[1])
    if repeats is None or repeats.tolist() != [1, 1, 1, 1, 2]:
        raise Reject(f"{what}: Tile repeats {None if repeats is None else repeats.tolist()}, expected [1, 1, 1, 1, 2]")
    pair_axis = producer(tile.inputs[0], "Unsqueeze", f"{what} pair axis")
    head_axis = producer(pair_axis.inputs[0], "Unsqueeze", f"{what} head axis")
    for node, want in ((pair_axis, (4, -1)), (head_axis, (2, -2))):
        axes = const_array(node.inputs[1])
        if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in want:
            raise Reject(f"{what}: Unsqueeze axes {None if axes is None else axes.tolist()}, expected {want[0]}")
    split = producer(head_axis.inputs[0], "Split", f"{what} half")
    return split, list(split.outputs).index(head_axis.inputs[0])


def _through(value: ir.Value, ops: tuple[str, ...]) -> ir.Value:
    """Follow the first input back through nodes of `ops` (broadcasts: Expand, Tile, Unsqueeze)."""
    node = value.producer()
    while node is not None and node.op_type in ops and node.domain == "":
        value, node = node.inputs[0], node.inputs[0].producer()
    return value


def _table_lookup(split: ir.Node) -> tuple[np.ndarray, ir.Value, ir.Value]:
    """Split(GatherElements(Tile(table), Tile(position_ids[..., None]), axis 1), two halves, last axis): the
    lookup table[position_ids] as transformers' GPT-J writes it; returns (table, its value, position_ids)."""
    axis, sizes = int_attr(split, "axis", 0), const_array(split.inputs[1]) if len(split.inputs) > 1 else None
    gather = producer(split.inputs[0], "GatherElements", "sin/cos table lookup")
    table_value = _through(gather.inputs[0], ("Expand", "Tile"))
    table = const_array(table_value)
    if table is None or table.ndim != 2:
        raise Reject("sin/cos: position table is not a constant (max_positions, rotary_dim)")
    if axis not in (-1, 2) or sizes is None or sizes.tolist() != [table.shape[1] // 2] * 2 or len(split.outputs) != 2:
        raise Reject("sin/cos: Split is not the table's two halves on the last axis")
    data = gather.inputs[0].shape
    if int_attr(gather, "axis", 0) != 1 or data is None or len(data) != 3 or list(data[1:]) != list(table.shape):
        raise Reject(f"sin/cos: GatherElements is not on the position axis of (B, {table.shape[0]}, "
                     f"{table.shape[1]}) tables")
    index = _through(gather.inputs[1], ("Expand", "Tile"))
    unsq = producer(index, "Unsqueeze", "position index")
    axes = const_array(unsq.inputs[1])
    if axes is None or axes.reshape(-1).tolist() not in ([-1], [2]):
        raise Reject("position index: Unsqueeze is not on the last axis")
    return table, table_value, unsq.inputs[0]


def _match_every_two(graph: ir.Graph, add: ir.Node) -> dict:
    """add = x * cos + rotate_every_two(x) * sin (Optimum's GPT-J form; see the module docstring)."""
    terms = [producer(v, "Mul", "rotary term") for v in add.inputs]
    for plain, rotated in (terms, terms[::-1]):
        for k in (0, 1):
            if _looks_every_two(rotated.inputs[k]):
                x, sin_value = _rotate_every_two(rotated.inputs[k]), rotated.inputs[1 - k]
                break
        else:
            continue
        break
    else:
        raise Reject("no term is rotate_every_two(x) * sin")
    if x not in plain.inputs:
        raise Reject("x * cos is not of the same x as rotate_every_two(x)")
    cos_value = other_input(plain, x)
    (sin_split, sin_k), (cos_split, cos_k) = _repeated_half(sin_value, "sin"), _repeated_half(cos_value, "cos")
    if sin_split is not cos_split or (sin_k, cos_k) != (0, 1):
        raise Reject("sin/cos are not the first/second half of one position table")
    table, table_value, position_ids = _table_lookup(sin_split)
    if x.shape is None or x.shape[-1] != table.shape[1]:
        raise Reject(f"rotary input {x.shape} does not end in the table's rotary_dim {table.shape[1]}")
    return dict(stack=add, input=x, out=add.outputs[0], table=table, table_value=table_value,
                position_ids=position_ids)


def _source(graph: ir.Graph, m: dict) -> None:
    """Find view (B, T, nh, hs) and x3 (B, T, D) behind the rotary input, and the value the result replaces."""
    rotated, out = m["input"], m["out"]  # out: (B, T, nh, rd)
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
        suffix = f"_{len(made)}" if made else ""  # an export from elsewhere may hold one table per layer
        for part, array in (("cos", table[:, half:]), ("sin", table[:, :half])):
            value = ir.Value(name=f"/model/rotary/{part}_cache{suffix}",
                             const_value=ir.tensor(np.ascontiguousarray(array)))
            value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(value)
            values.append(value)
        made[key] = tuple(values)
    return made[key]


def _rewrite(graph: ir.Graph, m: dict, caches) -> None:
    made_by = m["x3"].producer()
    proj = scope(made_by, made_by.name if made_by is not None and made_by.name else "")  # e.g. .../attn/q_proj
    which = "q" if "q_proj" in proj else "k" if "k_proj" in proj else "qk"
    prefix = f"{scope(m['stack'], m['stack'].name.rsplit('/', 1)[0] or '/model')}/{which}_rotary"
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
    candidates = [(n, _match) for n in graph if n.op_type == "Concat" and n.domain == "" and _is_candidate(n)]
    candidates += [(n, _match_every_two) for n in graph
                   if n.op_type == "Add" and n.domain == "" and _every_two_candidate(n)]
    for node, match in candidates:
        try:
            m = match(graph, node)
            _source(graph, m)
        except Reject as reason:
            result.rejections.append(f"{node.name}: {reason}")
            continue
        ensure_ms_opset(model)
        _rewrite(graph, m, _caches(graph, m, made))
        result.count += 1
    return result.count
