"""graphs/canonical.py and the fusion rules on real Optimum exports.

tests/data/optimum/ holds what `optimum-cli export onnx --task text-generation-with-past` wrote for tiny GPT-2 and
GPT-J checkpoints (tests/data/optimum/make_fixtures.py made them; CI cannot run Optimum). Without the canonical
pass the rules fall short on them; with it every rule reaches the count our own trace reaches, and the fused graph
computes what Optimum's does at every real position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto

from fusion_testing import G, session
from gptexport.graphs.canonical import canonicalise, fold_static_shape_slices
from gptexport.graphs.fusion import fuse_matmul_3d
from gptexport.graphs.fusion._match import RuleResult
from gptexport.graphs.pipeline import expected_counts, fuse, shortfalls

DATA = Path(__file__).resolve().parents[1] / "data" / "optimum"
FIXTURES = {"gpt2": "gpt2", "gptj-partial-rotary": "gptj"}  # fixture -> architecture
FACTS = {"num_layers": 2, "num_heads": 4, "head_size": 16}
FUSED_ATOL = 1e-4  # fp32 logits of the fused graph against Optimum's, at real positions


def _outputs(model_bytes: bytes, feeds: dict) -> dict:
    sess = session(model_bytes)
    names = {i.name for i in sess.get_inputs()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feeds.items()
                                                                           if k in names})))


def _padded_feeds(batch: int, new: int, past: int, pads: list[int]) -> dict:
    """Token ids of the tiny vocabulary, a left-padded mask over past + new, positions from it, random pasts."""
    rng = np.random.default_rng(batch * 10 + past)
    mask = np.ones((batch, past + new), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    feeds = {"input_ids": rng.integers(0, 256, (batch, new)).astype(np.int64), "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)[:, -new:]}
    for i in range(FACTS["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (batch, FACTS["num_heads"], past, FACTS["head_size"])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_optimum_export_fuses_fully_and_computes_the_same(fixture):
    path = DATA / fixture / "optimum" / "model.onnx"
    architecture, original = FIXTURES[fixture], path.read_bytes()
    want = expected_counts(architecture, FACTS)
    plain = ir.load(str(path))
    assert shortfalls(fuse(plain, architecture, FACTS), want)  # the rules alone do not read Optimum's form

    model = ir.load(str(path))
    done = canonicalise(model)
    report = fuse(model, architecture, FACTS)
    assert report.counts == want, (report.counts, report.rejections)
    assert done["shaped_values"] > 0 and done["folded_constants"] > 0
    fused = ir.to_proto(model).SerializeToString()
    ops = {n.op_type for n in model.graph}
    assert not ops & {"Softmax", "Gemm", "IsNaN", "Tanh"}, ops  # nothing of the unfused attention/MLP is left
    for batch, new, past, pads in ((2, 5, 0, [0, 3]), (2, 1, 6, [0, 4]), (1, 7, 0, [0])):
        feeds = _padded_feeds(batch, new, past, pads)
        theirs, ours = _outputs(original, feeds), _outputs(fused, feeds)
        real = feeds["attention_mask"][:, -new:].astype(bool)
        assert np.isfinite(ours["logits"]).all()
        worst = np.abs(ours["logits"] - theirs["logits"])[real].max()
        assert worst <= FUSED_ATOL, f"logits: worst {worst:.3g} at batch {batch}, new {new}, past {past}"
        keep = feeds["attention_mask"].astype(bool)  # presents: the slots of real tokens
        for name in (n for n in theirs if n.startswith("present.")):
            diff = np.abs(ours[name] - theirs[name]).transpose(0, 2, 1, 3)[keep].max()
            assert diff <= FUSED_ATOL, f"{name}: worst {diff:.3g}"


def _projection(identity_bias: bool):
    """Optimum's Conv1D: Reshape(x, [-1, K]) - Gemm - Reshape to (Shape(x)[0], Shape(x)[1], N), with symbolic B
    and T, the bias behind an Identity (Optimum's weight dedup) or not."""
    g = G()
    rng = np.random.default_rng(0)
    x = g.input("x", ["batch", "sequence", 8])
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    bias = g.const(rng.standard_normal(6).astype(np.float32))
    if identity_bias:
        bias = g.op("Identity", bias)
    gemm = g.op("Gemm", g.op("Reshape", x, i64(-1, 8)), g.const(rng.standard_normal((8, 6)).astype(np.float32)), bias)
    dims = [g.op("Unsqueeze", g.op("Gather", g.op("Shape", x), g.const(np.int64(k)), axis=0), i64(0)) for k in (0, 1)]
    g.op("Relu", g.op("Reshape", gemm, g.op("Concat", *dims, i64(6), axis=0)), out="y")
    return g.model("y")


def test_canonical_shapes_let_matmul_3d_read_the_shape_arithmetic():
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    before = session(ir.to_proto(_projection(True)).SerializeToString()).run(None, {"x": x})[0]
    model, result = _projection(True), RuleResult()
    assert fuse_matmul_3d(model, result) == 0
    assert "bias is not a constant vector" in result.rejections[0], result.rejections
    model = _projection(False)
    result = RuleResult()
    assert fuse_matmul_3d(model, result) == 0  # onnx's own inference: the restored (B, T) is unknown
    assert "shapes not known" in result.rejections[0] or "do not restore" in result.rejections[0], result.rejections

    model = _projection(True)
    assert canonicalise(model)["identities"] == 1
    result = RuleResult()
    assert fuse_matmul_3d(model, result) == 1, result.rejections
    relu = next(v for v in model.graph.outputs if v.name == "y").producer()
    after = session(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    assert relu.inputs[0].producer().op_type == "Add"  # MatMul + bias on (B, T, K): no Reshape left


def _head_size_scale(symbolic_last: bool):
    """1 / sqrt(Shape(q)[-1]) as torch's SDPA computes its scale; q is (B, T, 16) or (B, T, D) symbolic."""
    g = G()
    q = g.input("q", ["batch", "sequence", "width" if symbolic_last else 16])
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    last = g.op("Slice", g.op("Shape", q), i64(-1), i64(np.iinfo(np.int64).max))
    scale = g.op("Div", g.const(np.float32(1.0)), g.op("Sqrt", g.op("Cast", last, to=TensorProto.FLOAT)))
    g.op("Mul", q, scale, out="y")
    return g.model("y")


def test_static_shape_slices_fold_and_symbolic_ones_stay():
    model = _head_size_scale(symbolic_last=False)
    assert fold_static_shape_slices(model) == 1
    canonicalise(model)
    mul = next(v for v in model.graph.outputs if v.name == "y").producer()
    scale = ir.convenience.get_const_tensor(mul.inputs[1])
    assert scale is not None and np.isclose(float(scale.numpy().reshape(())), 0.25)  # one number, folded

    model = _head_size_scale(symbolic_last=True)
    assert fold_static_shape_slices(model) == 0
