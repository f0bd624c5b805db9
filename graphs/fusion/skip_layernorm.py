"""Residual Add + LayerNormalization -> com.microsoft SkipLayerNormalization.

    a ─┐                                  a ─┐
       Add ─▶ sum ─LayerNorm─▶ y   =>        SkipLayerNormalization(gamma, beta[, bias]) ─▶ y, sum (output 3)
    b ─┘        └─▶ (next residual)      b ─┘

The sum stays available (output 3) for the next residual. When one addend is Add(MatMul, constant bias) used
only here, the bias moves into the kernel. GPT-2: ln_1 of layer 0 reads wte + wpe, so it fuses too.
"""

from __future__ import annotations

import onnx_ir as ir

from ._match import (Reject, RuleResult, apply_rule, const_array, int_attr, matmul_bias, ms_node, producer,
                     same_dims, scope)

NAME = "skip_layernorm"


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    return same_dims(a.shape, b.shape)


def _bias(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """value = Add(MatMul(...), bias (D,)) used once -> (MatMul output, bias), else None."""
    return matmul_bias(value) if len(value.consumers()) == 1 else None


def _match(ln: ir.Node) -> dict:
    if int_attr(ln, "axis", -1) not in (-1, 2):
        raise Reject(f"LayerNormalization axis {int_attr(ln, 'axis')} is not the hidden axis")
    if len(ln.inputs) < 3 or const_array(ln.inputs[1]) is None or const_array(ln.inputs[2]) is None:
        raise Reject("gamma/beta are not both constants")
    if any(out.consumers() for out in ln.outputs[1:]):
        raise Reject("mean / inverse std outputs are used")
    add = producer(ln.inputs[0], "Add", "LayerNorm input")
    a, b = add.inputs
    if not _same_shape(a, b):
        raise Reject(f"addends are not both (B, T, D) of one shape: {a.shape} and {b.shape}")
    m = dict(ln=ln, add=add, input=a, skip=b, bias=None)
    for name, other in (("input", "skip"), ("skip", "input")):
        found = _bias(m[name])
        if found is not None:
            m[name], m["bias"] = found
            if name == "skip":
                m["input"], m["skip"] = m["skip"], m["input"]
            break
    return m


def _rewrite(graph: ir.Graph, m: dict) -> None:
    ln = m["ln"]
    prefix = scope(ln)
    eps = ln.attributes.get("epsilon")
    inputs = [m["input"], m["skip"], ln.inputs[1], ln.inputs[2]] + ([m["bias"]] if m["bias"] is not None else [])
    sln = ms_node("SkipLayerNormalization", inputs, dict(epsilon=eps.value if eps is not None else 1e-5),
                  f"{prefix}/SkipLayerNorm", num_outputs=4)
    y, mean, inv_std, total = sln.outputs
    mean.name = inv_std.name = ""  # unused; float32 even in a float16 graph
    y.name, total.name = f"{prefix}/SkipLayerNorm/output_0", f"{prefix}/SkipLayerNorm/output_3"
    for value, old in ((y, ln.outputs[0]), (total, m["add"].outputs[0])):
        value.type, value.shape = old.type, old.shape
    graph.insert_before(ln, [sln])
    for value, old in ((y, ln.outputs[0]), (total, m["add"].outputs[0])):
        if old in graph.outputs:  # a graph output keeps its name (a head graph's last_hidden_state is ln_f's)
            name, old.name = old.name, f"{old.name}/replaced"
            value.name = name
        ir.convenience.replace_all_uses_with(old, value, replace_graph_outputs=True)


def fuse_skip_layernorm(model: ir.Model, result: RuleResult | None = None) -> int:
    """Fuse every LayerNormalization of a residual sum into SkipLayerNormalization.

    Args:
        model: the graph, changed in place.
        result: collects the count and one reason per rejected LayerNormalization.
    Returns:
        The number of SkipLayerNormalization nodes made.
    """
    return apply_rule(model, result, "LayerNormalization", lambda graph, node: _match(node), _rewrite,
                      label=lambda node: f"{node.name} ({scope(node)})")
