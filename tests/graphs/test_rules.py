"""Unit tests per fusion rule: a graph built in a few lines fuses (and computes the same), and a near miss is
rejected with the right reason."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import TensorProto, helper, numpy_helper

from fusion_testing import session
from gptexport.graphs.fusion import fuse_attention, fuse_gelu, fuse_matmul_3d, fuse_rotary, fuse_skip_layernorm
from gptexport.graphs.fusion.matmul_3d import drop_identity_reshapes
from gptexport.graphs.fusion._match import RuleResult

RULE_ATOL = 1e-5  # fp32, one fused op against the ops it replaces


class G:
    """A tiny graph builder: g.op("Mul", "a", "b") -> output name; constants become initializers."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs, self.n = [], [], [], [], 0

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, array):
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(array), f"c{self.n}"))
        return f"c{self.n}"

    def op(self, op_type, *inputs, out=None, **attrs):
        self.n += 1
        out = out or f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self.n}", **attrs))
        return out

    def model(self, *outputs) -> ir.Model:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _run(model: ir.Model, feeds: dict) -> list:
    return session(ir.to_proto(model).SerializeToString()).run(None, feeds)


def _check(build, rule, feeds, want_count=1):
    before = _run(build(), feeds)
    model, result = build(), RuleResult()
    assert rule(model, result) == want_count, result.rejections
    after = _run(model, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=RULE_ATOL, rtol=0)
    return model


def _rejected(model, rule, reason):
    result = RuleResult()
    assert rule(model, result) == 0
    assert result.rejections and reason in result.rejections[0], result.rejections


# --- gelu -----------------------------------------------------------------------------------------------------
def _gelu(cubic=0.044715):
    g = G()
    x = g.input("x", [1, 2, 8])
    inner = g.op("Add", x, g.op("Mul", g.op("Pow", x, g.const(np.float32(3))), g.const(np.float32(cubic))))
    t = g.op("Tanh", g.op("Mul", inner, g.const(np.float32(math.sqrt(2 / math.pi)))))
    g.op("Mul", g.op("Mul", x, g.const(np.float32(0.5))), g.op("Add", t, g.const(np.float32(1))), out="y")
    return g.model("y")


def test_gelu_fuses():
    model = _check(_gelu, fuse_gelu, {"x": np.random.default_rng(0).standard_normal((1, 2, 8), np.float32)})
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["FastGelu"]


def test_gelu_rejects_other_coefficient():
    _rejected(_gelu(cubic=0.05), fuse_gelu, "cubic coefficient")


# --- matmul_3d ------------------------------------------------------------------------------------------------
def _projection(x_shape=(2, 3, 8), restore=(2, 3, 6), bias=True, trans_b=0):
    """GPT-2 Conv1D as traced: Reshape(-1, K) - Gemm(W (8, 6), c) - Reshape(restore)."""
    g = G()
    rng = np.random.default_rng(0)
    x = g.input("x", list(x_shape))
    flat = g.op("Reshape", x, g.const(np.array([-1, 8], np.int64)))
    w = rng.standard_normal((6, 8) if trans_b else (8, 6)).astype(np.float32)
    inputs = [flat, g.const(w)] + ([g.const(rng.standard_normal(6).astype(np.float32))] if bias else [])
    g.op("Reshape", g.op("Gemm", *inputs, transB=trans_b), g.const(np.array(restore, np.int64)), out="y")
    return g.model("y")


def test_matmul_3d_rewrites_projection():
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    for bias in (True, False):
        model = _check(lambda: _projection(bias=bias), fuse_matmul_3d, {"x": x})
        common.RemoveUnusedNodesPass()(model)
        ops = [n.op_type for n in model.graph]
        assert ops == (["MatMul", "Add"] if bias else ["MatMul"]), ops


def test_matmul_3d_unflattens_4d_context_and_drops_identity_reshape():
    """(B, T, nh, hs) -> Reshape(-1, K): a Reshape(0, 0, -1) is kept, and dropped once it sees rank 3."""
    x = np.random.default_rng(2).standard_normal((2, 3, 2, 4)).astype(np.float32)
    model = _check(lambda: _projection(x_shape=(2, 3, 2, 4)), fuse_matmul_3d, {"x": x})
    assert drop_identity_reshapes(model) == 0  # its input is rank 4: not an identity
    reshape = next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].consumers())
    reshape.inputs[0].shape = ir.Shape([2, 3, 8])  # as after attention fusion: the context is (B, T, D)
    assert drop_identity_reshapes(model) == 1


def test_matmul_3d_rejects_transposed_weight():
    _rejected(_projection(trans_b=1), fuse_matmul_3d, "transA or transB")


def test_matmul_3d_rejects_reshape_that_does_not_restore_leading_dims():
    _rejected(_projection(restore=(3, 2, 6)), fuse_matmul_3d, "do not restore (B, T)")


# --- skip layer norm ------------------------------------------------------------------------------------------
def _sln(skip_shape=(1, 2, 8)):
    g = G()
    a, b = g.input("a", [1, 2, 8]), g.input("b", list(skip_shape))
    total = g.op("Add", a, b)
    rng = np.random.default_rng(0)
    y = g.op("LayerNormalization", total, g.const(rng.standard_normal(8, np.float32)),
             g.const(rng.standard_normal(8, np.float32)), axis=-1, epsilon=1e-5)
    g.op("Add", y, total, out="out")  # the sum feeds the next residual too
    return g.model("out")


def test_skip_layernorm_fuses():
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((1, 2, 8), np.float32), "b": rng.standard_normal((1, 2, 8), np.float32)}
    model = _check(_sln, fuse_skip_layernorm, feeds)
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["SkipLayerNormalization"]


def test_skip_layernorm_rejects_broadcast_addend():
    _rejected(_sln(skip_shape=(8,)), fuse_skip_layernorm, "addends are not both (B, T, D)")


# --- rotary ---------------------------------------------------------------------------------------------------
def _rotary(swap=False):
    """The traced form of exporter/traced_form.py: (B=1, T=2, nh=2, hs=4), rotary_dim 2, table (16, 2)."""
    g = G()
    x3, pos = g.input("x", [1, 2, 8]), g.input("position_ids", [1, 2], TensorProto.INT64)
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    view = g.op("Reshape", x3, i64(1, 2, 2, 4))
    rot_in, passthrough = g.op("Slice", view, i64(0), i64(2), i64(3)), g.op("Slice", view, i64(2), i64(4), i64(3))
    pairs = g.op("Reshape", rot_in, i64(1, 2, 2, 1, 2))
    even, odd = (g.op("Gather", pairs, g.const(np.int64(k)), axis=4) for k in (0, 1))
    angles = np.arange(16, dtype=np.float32)[:, None] * 1.0
    sincos = g.op("Gather", g.const(np.concatenate([np.sin(angles), np.cos(angles)], 1)), pos, axis=0)
    sin = g.op("Unsqueeze", g.op("Slice", sincos, i64(0), i64(1), i64(-1)), i64(2))
    cos = g.op("Unsqueeze", g.op("Slice", sincos, i64(1), i64(2), i64(-1)), i64(2))
    first = g.op("Sub", g.op("Mul", even, cos), g.op("Mul", odd, sin))
    a, b = (even, odd) if swap else (odd, even)
    second = g.op("Add", g.op("Mul", a, cos), g.op("Mul", b, sin))
    stacked = g.op("Concat", g.op("Unsqueeze", first, i64(-1)), g.op("Unsqueeze", second, i64(-1)), axis=-1)
    g.op("Concat", g.op("Reshape", stacked, i64(1, 2, 2, 2)), passthrough, axis=-1, out="y")
    return g.model("y")


def test_rotary_fuses():
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 2, 8), np.float32),
             "position_ids": np.array([[3, 4]], np.int64)}
    model = _check(_rotary, fuse_rotary, feeds)
    (node,) = [n for n in model.graph if n.domain == "com.microsoft"]
    assert node.op_type == "RotaryEmbedding"
    assert {k: a.value for k, a in node.attributes.items()} == {"interleaved": 1, "num_heads": 2,
                                                                 "rotary_embedding_dim": 2}


def test_rotary_rejects_wrong_rotation():
    _rejected(_rotary(swap=True), fuse_rotary, "second stacked term is not odd*cos + even*sin")


# --- attention ------------------------------------------------------------------------------------------------
def _attention(cache_outputs=True):
    """The traced form of exporter/traced_form.py's attention: B=1, T=2, P=3, nh=2, hs=4."""
    g = G()
    q3, k3, v3 = (g.input(n, [1, 2, 8]) for n in ("q", "k", "v"))
    past_k, past_v = g.input("past_key_values.0.key", [1, 2, 3, 4]), g.input("past_key_values.0.value", [1, 2, 3, 4])
    mask = g.input("mask", [1, 1, 2, 5])
    heads = lambda x: g.op("Transpose", g.op("Reshape", x, g.const(np.array([1, 2, 2, 4]))), perm=[0, 2, 1, 3])  # noqa: E731
    present_k = g.op("Concat", past_k, heads(k3), axis=2, out="present.0.key")
    present_v = g.op("Concat", past_v, heads(v3), axis=2, out="present.0.value")
    scores = g.op("Mul", g.op("MatMul", heads(q3), g.op("Transpose", present_k, perm=[0, 1, 3, 2])),
                  g.const(np.float32(0.5)))
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    out = g.op("Transpose", g.op("MatMul", probs, present_v), perm=[0, 2, 1, 3])
    g.op("Reshape", out, g.const(np.array([1, 2, 8])), out="y")
    return g.model("y", *(["present.0.key", "present.0.value"] if cache_outputs else []))


def test_attention_fuses_with_padding_mask():
    rng = np.random.default_rng(3)
    feeds = {n: rng.standard_normal((1, 2, 8), np.float32) for n in ("q", "k", "v")}
    feeds |= {f"past_key_values.0.{kv}": rng.standard_normal((1, 2, 3, 4), np.float32) for kv in ("key", "value")}
    mask = np.zeros((1, 1, 2, 5), np.float32)
    mask[..., 0] = np.finfo(np.float32).min  # a left pad
    mask[0, 0, 0, 4] = np.finfo(np.float32).min  # causal
    model = _check(_attention, fuse_attention, feeds | {"mask": mask})
    assert [o.name for o in model.graph.outputs] == ["y", "present.0.key", "present.0.value"]


def test_attention_rejects_without_cache_outputs():
    _rejected(_attention(cache_outputs=False), fuse_attention, "is not a graph output")
