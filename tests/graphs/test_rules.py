"""Unit tests per fusion rule: a graph built in a few lines fuses (and computes the same), and a near miss is
rejected with the right reason."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import TensorProto

from fusion_testing import G, session
from gptexport.graphs.fusion import fuse_attention, fuse_gelu, fuse_matmul_3d, fuse_rotary, fuse_skip_layernorm
from gptexport.graphs.fusion.matmul_3d import drop_identity_reshapes
from gptexport.graphs.fusion._match import RuleResult

RULE_ATOL = 1e-5  # fp32, one fused op against the ops it replaces


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


# --- attention, Optimum's form (torch's SDPA traced by TorchScript) --------------------------------------------
def _sdpa_attention(guard=True, guard_value=0.0, split_scale=True, extra_reader=False):
    """B=2, T=2, P=3, nh=2, hs=4: the scale split over q and k (or a Div), Where(keep, 0, -inf) sliced to the key
    length Shape(present.0.key)[2], and the NaN guard after the softmax."""
    g = G()
    q3, k3, v3 = (g.input(n, [2, 2, 8]) for n in ("q", "k", "v"))
    past_k, past_v = g.input("past_key_values.0.key", [2, 2, 3, 4]), g.input("past_key_values.0.value", [2, 2, 3, 4])
    keep = g.input("keep", [2, 1, 2, 5], TensorProto.BOOL)
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    heads = lambda x: g.op("Transpose", g.op("Reshape", x, i64(2, 2, 2, 4)), perm=[0, 2, 1, 3])  # noqa: E731
    present_k = g.op("Concat", past_k, heads(k3), axis=-2, out="present.0.key")
    present_v = g.op("Concat", past_v, heads(v3), axis=-2, out="present.0.value")
    kv_len = g.op("Unsqueeze", g.op("Gather", g.op("Shape", present_k), g.const(np.int64(2)), axis=0), i64(0))
    bias = g.op("Where", g.op("Slice", keep, i64(0), kv_len, i64(3)), g.const(np.float32(0)),
                g.const(np.float32(-np.inf)))
    k_t = g.op("Transpose", present_k, perm=[0, 1, 3, 2])
    if split_scale:  # sqrt(0.5) each: scale 0.5
        root = g.const(np.float32(math.sqrt(0.5)))
        scores = g.op("MatMul", g.op("Mul", heads(q3), root), g.op("Mul", k_t, root))
    else:
        scores = g.op("Div", g.op("MatMul", heads(q3), k_t), g.const(np.float32(2.0)))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    if guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(np.float32(guard_value)), probs)
    out = g.op("Transpose", g.op("MatMul", probs, present_v), perm=[0, 2, 1, 3])
    g.op("Reshape", out, i64(2, 2, 8), out="y")
    extra = [g.op("ReduceSum", present_k, out="extra")] if extra_reader else []
    return g.model("y", "present.0.key", "present.0.value", *extra)


def _sdpa_feeds():
    rng = np.random.default_rng(4)
    feeds = {n: rng.standard_normal((2, 2, 8), np.float32) for n in ("q", "k", "v")}
    feeds |= {f"past_key_values.0.{kv}": rng.standard_normal((2, 2, 3, 4), np.float32) for kv in ("key", "value")}
    keep = np.tril(np.ones((2, 5), bool), k=3)[None, None].repeat(2, 0)  # causal over past 3 + new 2
    keep[1, 0, :, :4] = False  # row 1 left-padded over 4 slots: its first query sees no key at all
    return feeds | {"keep": keep}


def test_attention_fuses_optimum_form_and_a_fully_masked_row_stays_finite():
    """Real positions equal the unfused graph's; the query with every key masked (a left pad, which Optimum's NaN
    guard zeroes) is finite, not NaN, because -inf became the dtype's finite minimum."""
    feeds = _sdpa_feeds()
    for split_scale in (True, False):
        before = _run(_sdpa_attention(split_scale=split_scale), feeds)
        model, result = _sdpa_attention(split_scale=split_scale), RuleResult()
        assert fuse_attention(model, result) == 1, result.rejections
        common.RemoveUnusedNodesPass()(model)
        assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
        assert not [n for n in model.graph if n.op_type in ("Softmax", "IsNaN")]  # the unfused nodes are gone
        after = _run(model, feeds)
        real = np.ones((2, 2), bool)
        real[1, 0] = False  # (row, query) pairs that see a key
        np.testing.assert_allclose(after[0].reshape(2, 2, 8)[real], before[0].reshape(2, 2, 8)[real],
                                   atol=RULE_ATOL, rtol=0)
        for a, b in zip(after[1:], before[1:]):  # presents
            np.testing.assert_allclose(a, b, atol=RULE_ATOL, rtol=0)
        assert np.isfinite(after[0]).all()
    masked = model.graph.initializers["/model/attn_mask/masked_float32"]
    masked.const_value = ir.tensor(np.array(-np.inf, np.float32))  # what keeping -inf would give: NaN
    assert np.isnan(_run(model, feeds)[0].reshape(2, 2, 8)[1, 0]).all()


def test_attention_rejects_a_guard_that_is_not_the_nan_guard():
    """Where(IsNaN(p), 1, p) changes what fully masked rows give: not Optimum's guard, not droppable."""
    _rejected(_sdpa_attention(guard_value=1.0), fuse_attention, "is not the NaN guard")


def test_attention_rejects_a_concatenated_cache_read_elsewhere():
    _rejected(_sdpa_attention(extra_reader=True), fuse_attention, "is read outside attention")


# --- rotary, Optimum's form (transformers' GPT-J: x * cos + rotate_every_two(x) * sin) ---------------------------
def _rotary_every_two(negate_even=False):
    """(B=1, T=2, nh=2, hs=8), rotary_dim 4, table (16, 4) = [sin | cos], looked up as transformers' GPT-J does."""
    g = G()
    x3, pos = g.input("x", [1, 2, 16]), g.input("position_ids", [1, 2], TensorProto.INT64)
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    end = np.iinfo(np.int64).max
    view = g.op("Reshape", x3, i64(1, 2, 2, 8))
    x, passthrough = g.op("Slice", view, i64(0), i64(4), i64(3)), g.op("Slice", view, i64(4), i64(end), i64(3))
    angles = np.arange(16, dtype=np.float32)[:, None] * np.array([1.0, 0.1], np.float32)
    table = g.const(np.concatenate([np.sin(angles), np.cos(angles)], 1))  # (16, 4)
    data = g.op("Tile", g.op("Expand", table, i64(1, 1, 1)), i64(1, 1, 1))  # (B, 16, 4)
    index = g.op("Tile", g.op("Unsqueeze", pos, i64(-1)), i64(1, 1, 4))  # (B, T, 4)
    sin, cos = g.ops("Split", g.op("GatherElements", data, index, axis=1), i64(2, 2), outputs=2, axis=-1)

    def repeated(half):  # repeat_interleave(half[:, :, None, :], 2, -1) -> (B, T, 1, 4)
        pairs = g.op("Tile", g.op("Unsqueeze", g.op("Unsqueeze", half, i64(2)), i64(4)), i64(1, 1, 1, 1, 2))
        return g.op("Reshape", pairs, i64(1, 2, 1, 4))

    even, odd = g.op("Slice", x, i64(0), i64(end), i64(3), i64(2)), g.op("Slice", x, i64(1), i64(end), i64(3), i64(2))
    first, second = (even, odd) if negate_even else (odd, even)
    stacked = g.op("Concat", g.op("Unsqueeze", g.op("Neg", first), i64(-1)), g.op("Unsqueeze", second, i64(-1)),
                   axis=-1)
    rot = g.op("Reshape", stacked, i64(1, 2, 2, 4))
    rotated = g.op("Add", g.op("Mul", x, repeated(cos)), g.op("Mul", rot, repeated(sin)))
    g.op("Concat", rotated, passthrough, axis=-1, out="y")
    return g.model("y")


def test_rotary_fuses_optimum_form():
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 2, 16), np.float32),
             "position_ids": np.array([[3, 9]], np.int64)}
    model = _check(_rotary_every_two, fuse_rotary, feeds)
    (node,) = [n for n in model.graph if n.domain == "com.microsoft"]
    assert {k: a.value for k, a in node.attributes.items()} == {"interleaved": 1, "num_heads": 2,
                                                                 "rotary_embedding_dim": 4}


def test_rotary_rejects_optimum_form_with_the_wrong_rotation():
    _rejected(_rotary_every_two(negate_even=True), fuse_rotary, "is not [0::2] of the last axis")


def _attention_no_cache(key_used_outside=False):
    """The graphs of exporter/heads.py (no cache): the optimizer merged the key's two Transposes into one
    (perm 0,2,3,1); B=1, T=3, nh=2, hs=4."""
    g = G()
    q3, k3, v3 = (g.input(n, [1, 3, 8]) for n in ("q", "k", "v"))
    mask = g.input("mask", [1, 1, 3, 3])
    split = lambda x: g.op("Reshape", x, g.const(np.array([1, 3, 2, 4])))  # noqa: E731
    heads = lambda x: g.op("Transpose", split(x), perm=[0, 2, 1, 3])  # noqa: E731
    k_split = split(k3)
    k_t = g.op("Transpose", k_split, perm=[0, 2, 3, 1])
    scores = g.op("Mul", g.op("MatMul", heads(q3), k_t), g.const(np.float32(0.5)))
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    out = g.op("Transpose", g.op("MatMul", probs, heads(v3)), perm=[0, 2, 1, 3])
    g.op("Reshape", out, g.const(np.array([1, 3, 8])), out="y")
    if key_used_outside:
        g.op("Identity", k_split, out="k_heads")
    return g.model("y", *(["k_heads"] if key_used_outside else []))


def test_attention_fuses_without_a_cache():
    rng = np.random.default_rng(4)
    feeds = {n: rng.standard_normal((1, 3, 8), np.float32) for n in ("q", "k", "v")}
    mask = np.triu(np.full((3, 3), np.finfo(np.float32).min, np.float32), 1)[None, None]
    mask[..., 0] = np.finfo(np.float32).min  # a left pad
    mask[..., 0, 0] = 0.0
    model = _check(_attention_no_cache, fuse_attention, feeds | {"mask": mask})
    (mha,) = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mha.inputs) == 6 and len(mha.outputs) == 1  # no past, no present


def test_attention_without_a_cache_rejects_keys_used_elsewhere():
    _rejected(_attention_no_cache(key_used_outside=True), fuse_attention, "used outside attention")
