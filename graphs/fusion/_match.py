"""Small helpers shared by the fusion rules: walking producers, reading constants, rejecting with a reason.

A rule's matcher raises `Reject(reason)` at the first thing that does not fit; the rule records the reason and
moves on, so every anchor that was not fused says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
_LAYER_PATH = re.compile(r"/h/(\d+)(?=/|$)")


class Reject(Exception):
    """A near miss: the anchor node does not form the pattern; the message is the reason."""


@dataclass
class RuleResult:
    """What one rule did: how many rewrites and the reason of every rejected anchor."""

    count: int = 0
    rejections: list[str] = field(default_factory=list)


def producer(value: ir.Value | None, op_type: str | tuple[str, ...], what: str) -> ir.Node:
    """The node of type `op_type` producing `value`, else Reject naming `what` was expected."""
    ops = (op_type,) if isinstance(op_type, str) else op_type
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        got = "a graph input or constant" if node is None else node.op_type
        raise Reject(f"{what}: expected {'/'.join(ops)}, got {got}")
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node), or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_scalar(value: ir.Value | None, what: str) -> float:
    """A constant holding a single number, else Reject."""
    array = const_array(value)
    if array is None or array.size != 1:
        raise Reject(f"{what}: expected a constant scalar")
    return float(array.reshape(()))


def expect_close(got: float, want: float, what: str, rtol: float = 1e-4) -> None:
    if not np.isclose(got, want, rtol=rtol, atol=0.0):
        raise Reject(f"{what}: constant {got:.6g}, expected {want:.6g}")


def int_attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def is_graph_input(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and value in graph.inputs


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def matmul_bias(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """value = Add(MatMul(...), constant bias (D,)) -> (MatMul output, bias), else None: a bias a kernel can take."""
    node = value.producer()
    if node is None or node.op_type != "Add":
        return None
    for i in (0, 1):
        src, bias = node.inputs[i], node.inputs[1 - i]
        array = const_array(bias)
        if src.producer() is not None and src.producer().op_type == "MatMul" and array is not None and array.ndim == 1:
            return src, bias
    return None


def same_dims(a, b) -> bool:
    """Two shapes (or slices of shapes) with the same dims, symbolic ones compared by name."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def other_input(node: ir.Node, value: ir.Value) -> ir.Value:
    """For a binary node with `value` as one input, the other input."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a


def scope(node: ir.Node | None, fallback: str = "/model") -> str:
    """Hierarchical name of the module a traced node came from: model.transformer.h.3.attn -> /model/layers.3/attn.

    Read from the exporter's `pkg.torch.onnx.name_scopes` metadata; `fallback` when there is none.
    """
    scopes = (node.metadata_props.get("pkg.torch.onnx.name_scopes") if node is not None else None) or ""
    paths = re.findall(r"'([\w.]+)'", scopes)
    modules = [p for p in paths[:-1] if p.startswith("model")]  # the last entry is the op itself
    if not modules:
        return fallback
    path = modules[-1].removeprefix("model.transformer").removeprefix("model")
    return "/model" + _LAYER_PATH.sub(r"/layers.\1", path.replace(".", "/"))


def ms_node(op_type: str, inputs, attributes: dict, name: str, num_outputs: int = 1) -> ir.Node:
    """A com.microsoft node with int/float attributes given as a plain dict."""
    attrs = [ir.AttrInt64(k, v) if isinstance(v, (int, np.integer)) else ir.AttrFloat32(k, float(v))
             for k, v in attributes.items()]
    return ir.Node(MS_DOMAIN, op_type, inputs, attrs, num_outputs=num_outputs, name=name)


def ensure_ms_opset(model: ir.Model) -> None:
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    model.graph.opset_imports.setdefault(MS_DOMAIN, 1)


def adopt_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Let `new` replace `old` everywhere, including as a graph output under the same name, type and shape."""
    name = old.name
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None if name is None else f"{name}_unfused"
    new.name = name


def apply_rule(model: ir.Model, result: "RuleResult | None", op_type: str, match, rewrite, label=None) -> int:
    """The driver every single-anchor rule shares: match each `op_type` node, rewrite it or record why not.

    Args:
        model: the graph, changed in place.
        result: collects the count and one reason per rejected anchor (a new one if None).
        op_type: the standard-domain op each match starts from.
        match: (graph, node) -> match dict; raises Reject with the reason.
        rewrite: (graph, match) -> None.
        label: node -> how a rejection names its anchor (default: the node name).
    Returns:
        The number of rewrites made.
    """
    result = result if result is not None else RuleResult()
    graph = model.graph
    label = label or (lambda node: node.name)
    for node in [n for n in graph if n.op_type == op_type and n.domain == ""]:
        try:
            m = match(graph, node)
        except Reject as reason:
            result.rejections.append(f"{label(node)}: {reason}")
            continue
        ensure_ms_opset(model)
        rewrite(graph, m)
        result.count += 1
    return result.count
