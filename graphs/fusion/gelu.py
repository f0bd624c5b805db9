"""gelu_new (tanh approximation, GPT-2 and GPT-J) -> com.microsoft FastGelu.

    x ─Pow(3)─Mul(0.044715)─Add(x)─Mul(sqrt(2/pi))─Tanh─Add(1)─┐
    x ─Mul(0.5)────────────────────────────────────────────────Mul─▶ y     =>   FastGelu(x[, bias]) ─▶ y

When x = Add(MatMul, constant bias (D,)) used only by the gelu, the bias moves into FastGelu.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._match import (Reject, RuleResult, apply_rule, const_array, const_scalar, expect_close, matmul_bias, ms_node,
                     other_input, producer, scope)

NAME = "gelu"
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _const_operand(node: ir.Node, what: str) -> tuple[ir.Value, float]:
    """For a binary node with one constant scalar operand: (the other operand, the constant)."""
    for i in (0, 1):
        array = const_array(node.inputs[i])
        if array is not None and array.size == 1:
            return node.inputs[1 - i], float(array.reshape(()))
    raise Reject(f"{what}: no constant scalar operand")


def _single_user(value: ir.Value, op_type: str, what: str) -> ir.Node:
    users = value.consumers()
    if len(users) != 1 or users[0].op_type != op_type:
        raise Reject(f"{what}: expected one {op_type} user, got {[u.op_type for u in users]}")
    return users[0]


def _match(tanh: ir.Node) -> dict:
    inner, c = _const_operand(producer(tanh.inputs[0], "Mul", "tanh argument"), "tanh argument")
    expect_close(c, _SQRT_2_OVER_PI, "tanh argument scale")
    add = producer(inner, "Add", "x + 0.044715 x^3")
    for i in (0, 1):
        x, cube_term = add.inputs[i], add.inputs[1 - i]
        cube_node = cube_term.producer()
        if cube_node is not None and cube_node.op_type == "Mul":
            break
    else:
        raise Reject("x + 0.044715 x^3: no Mul operand")
    cube, c = _const_operand(cube_node, "0.044715 x^3")
    expect_close(c, 0.044715, "cubic coefficient")
    pow_node = producer(cube, "Pow", "x^3")
    if pow_node.inputs[0] is not x:
        raise Reject("x^3 is not of the same x")
    expect_close(const_scalar(pow_node.inputs[1], "exponent"), 3.0, "exponent")
    one_plus = _single_user(tanh.outputs[0], "Add", "1 + tanh")
    expect_close(_const_operand(one_plus, "1 + tanh")[1], 1.0, "1 + tanh constant")
    final = _single_user(one_plus.outputs[0], "Mul", "0.5 x (1 + tanh)")
    half = producer(other_input(final, one_plus.outputs[0]), "Mul", "0.5 x")
    half_x, c = _const_operand(half, "0.5 x")
    expect_close(c, 0.5, "half")
    if half_x is not x:
        raise Reject("0.5 x is not of the same x")
    return dict(x=x, out=final.outputs[0], final=final, tanh=tanh, bias=matmul_bias(x))


def _rewrite(graph: ir.Graph, m: dict) -> None:
    prefix = scope(m["tanh"])  # /model/layers.i/mlp/act
    inputs = list(m["bias"]) if m["bias"] is not None else [m["x"]]
    gelu = ms_node("FastGelu", inputs, {}, f"{prefix}/FastGelu")
    gelu.outputs[0].name = f"{prefix}/FastGelu/output_0"
    gelu.outputs[0].type, gelu.outputs[0].shape = m["out"].type, m["out"].shape
    graph.insert_before(m["final"], [gelu])
    ir.convenience.replace_all_uses_with(m["out"], gelu.outputs[0], replace_graph_outputs=True)


def fuse_gelu(model: ir.Model, result: RuleResult | None = None) -> int:
    """Fuse every tanh-approximated gelu into FastGelu.

    Args:
        model: the graph, changed in place.
        result: collects the count and one reason per rejected Tanh.
    Returns:
        The number of FastGelu nodes made.
    """
    return apply_rule(model, result, "Tanh", lambda graph, node: _match(node), _rewrite,
                      label=lambda node: f"{node.name} ({scope(node)})")
