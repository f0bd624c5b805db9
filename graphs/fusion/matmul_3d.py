"""Flattened projections -> one MatMul on the (B, T, K) activation; a Gemm's bias becomes an Add.

GPT-2's Conv1D traces as addmm on a flattened activation:

    x (B, T, K) ─Reshape(-1, K)─Gemm(W (K, N), c)─Reshape(B, T, N)─▶ y
becomes
    x (B, T, K) ─MatMul(W)─Add(c)─▶ y

MatMul takes the 3-D activation as it is, so the two Reshapes (and the Shape/Concat nodes that computed the
second one's target) go: 96 nodes a step for GPT-2 124M, each a kernel launch at batch 1. The bias Add is then
the `Add(MatMul, bias)` that skip_layernorm and gelu move into their kernels, so this rule runs first.

When x is the attention context (B, T, nh, hs) (traced: Transpose, then one Reshape straight to 2-D), the MatMul
reads Reshape(x, [0, 0, -1]); once attention is fused that Reshape sees (B, T, D) and `drop_identity_reshapes`
removes it.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._match import (Reject, RuleResult, adopt_output, apply_rule, const_array, int_attr, producer, same_dims,
                     scope)

NAME = "matmul_3d"
_KEEP_LEADING = [0, 0, -1]  # Reshape target: keep B and T, flatten the rest


def _match(graph: ir.Graph, gemm: ir.Node) -> dict:
    if int_attr(gemm, "transA", 0) or int_attr(gemm, "transB", 0):
        raise Reject("Gemm with transA or transB")
    if int_attr(gemm, "alpha", 1.0) != 1.0 or int_attr(gemm, "beta", 1.0) != 1.0:
        raise Reject("Gemm with alpha or beta != 1")
    w = const_array(gemm.inputs[1])
    if w is None or w.ndim != 2:
        raise Reject("B is not a constant 2-D weight")
    k, n = w.shape
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if bias is not None:
        c = const_array(bias)
        if c is None or c.shape != (n,):
            raise Reject(f"bias is not a constant vector of N={n} values")
    flatten = producer(gemm.inputs[0], "Reshape", "Gemm input")
    if len(flatten.outputs[0].consumers()) != 1:
        raise Reject("the flattened activation has other readers")
    x = flatten.inputs[0]
    users = gemm.outputs[0].consumers()
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].domain != "":
        raise Reject(f"Gemm output is not read by one Reshape: {[u.op_type for u in users]}")
    y = users[0].outputs[0]
    if x.shape is None or y.shape is None or len(x.shape) < 3 or len(y.shape) != 3:
        raise Reject(f"shapes not known as (B, T, ...) -> (B, T, N): {x.shape} -> {y.shape}")
    if not same_dims(x.shape[:2], y.shape[:2]) or str(y.shape[2]) != str(n):
        raise Reject(f"the reshapes do not restore (B, T) of the input: {x.shape} -> {y.shape}")
    inner = x.shape[2:]
    if not all(isinstance(d, int) for d in inner) or math.prod(inner) != k:
        raise Reject(f"input's trailing dims {list(inner)} do not make K={k}")
    return dict(gemm=gemm, x=x, weight=gemm.inputs[1], bias=bias, y=y, flatten=flatten, restore=users[0])


def _rewrite(graph: ir.Graph, m: dict) -> None:
    prefix = scope(m["gemm"])
    new, x = [], m["x"]
    if len(x.shape) > 3:  # attention context (B, T, nh, hs) -> (B, T, D)
        target = ir.Value(name=f"{prefix}/keep_leading", const_value=ir.tensor(_KEEP_LEADING, dtype=ir.DataType.INT64))
        graph.register_initializer(target)
        flat = ir.Node("", "Reshape", [x, target], name=f"{prefix}/Reshape")
        flat.outputs[0].name = f"{prefix}/Reshape/output_0"
        flat.outputs[0].type = x.type
        flat.outputs[0].shape = ir.Shape([*x.shape[:2], math.prod(x.shape[2:])])
        new.append(flat)
        x = flat.outputs[0]
    matmul = ir.Node("", "MatMul", [x, m["weight"]], name=f"{prefix}/MatMul")
    matmul.outputs[0].name = f"{prefix}/MatMul/output_0"
    matmul.outputs[0].type, matmul.outputs[0].shape = m["y"].type, m["y"].shape
    new.append(matmul)
    out = matmul.outputs[0]
    if m["bias"] is not None:
        add = ir.Node("", "Add", [out, m["bias"]], name=f"{prefix}/Add")
        add.outputs[0].name = f"{prefix}/Add/output_0"
        new.append(add)
        out = add.outputs[0]
    graph.insert_before(m["gemm"], new)
    adopt_output(graph, m["y"], out)
    # removed here, not left to the cleanup: a dead Gemm would still read the weight (a later pass quantizing
    # every MatMul/Gemm would see it twice)
    for node in (m["restore"], m["gemm"], m["flatten"]):
        graph.remove(node, safe=True)


def fuse_matmul_3d(model: ir.Model, result: RuleResult | None = None) -> int:
    """Rewrite every Reshape-Gemm-Reshape projection as MatMul (+ Add) on the unflattened activation.

    Args:
        model: the graph, changed in place (the Reshapes and Gemm are removed; their shape computations are left
            for the pipeline's cleanup).
        result: collects the count and one reason per rejected Gemm.
    Returns:
        The number of projections rewritten.
    """
    return apply_rule(model, result, "Gemm", _match, _rewrite)


def drop_identity_reshapes(model: ir.Model) -> int:
    """Bypass every Reshape to [0, 0, -1] whose input is already rank 3 (it changes nothing).

    Returns:
        The number of Reshapes bypassed.
    """
    graph, dropped = model.graph, 0
    for node in [n for n in graph if n.op_type == "Reshape" and n.domain == ""]:
        target, x = const_array(node.inputs[1]), node.inputs[0]
        if target is None or target.tolist() != _KEEP_LEADING or int_attr(node, "allowzero", 0):
            continue
        if x.shape is None or len(x.shape) != 3 or node.outputs[0] in graph.outputs:
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], x)
        dropped += 1
    return dropped
