"""The int8 "token" kernel (graphs/precision/quantize.py): activations quantized per row in the graph, weights per
output column, MatMulIntegerToFloat. Its math against numpy, its batch invariance against the per-tensor
"dynamic" kernel, the nodes it shares, and what it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gptexport.graphs.precision import NBitsSummary, quantize_int8
from gptexport.graphs.precision.quantize import TOKEN_MIN_SCALE, TOKEN_OPSET

RNG = np.random.default_rng(0)
# The kernel against numpy's int64 sums scaled in the same float32 order (per column, then per row): only the
# float32 rounding of those two products can differ, and measured it does not (0.0 on this CPU).
TOKEN_RTOL = 1e-6


def _model(k: int, widths: tuple[int, ...], *, bias: bool = True, shared_x: bool = False,
           opset: int = 20) -> tuple[ir.Model, list[np.ndarray], list[np.ndarray]]:
    """x (batch, seq, K) -> MatMul(+bias) -> Relu -> MatMul ... ; `shared_x`: a second MatMul also reads x."""
    weights, biases, inits, nodes, last, width = [], [], [], [], "x", k
    for i, n in enumerate(widths):
        w = (RNG.standard_normal((width, n)) * 0.1).astype(np.float32)
        weights.append(w)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"], name=f"/layers.{i}/MatMul"))
        out = f"m{i}"
        if bias:
            b = RNG.standard_normal(n).astype(np.float32)
            biases.append(b)
            inits.append(onnx.numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("Add", [out, f"b{i}"], [f"a{i}"]))
            out = f"a{i}"
        if i < len(widths) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        last, width = out, n
    outputs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", "seq", width])]
    if shared_x:
        w = (RNG.standard_normal((k, 8)) * 0.1).astype(np.float32)
        weights.append(w)
        inits.append(onnx.numpy_helper.from_array(w, "wx"))
        nodes.append(helper.make_node("MatMul", ["x", "wx"], ["side"], name="/side/MatMul"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["batch", "seq", 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
                              outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto)), weights, biases


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_token_kernel_matches_numpy_integer_sums():
    model, (w,), (b,) = _model(64, (48,))
    assert quantize_int8(model, kernel="token", method="rtn") == 1
    x = (RNG.standard_normal((3, 5, 64)) * 4).astype(np.float32)
    got = _session(model).run(None, {"x": x})[0]
    # the graph's own int8 weights and scales, so the comparison isolates the activation side and the sums
    q = model.graph.initializers["w0_int8"].const_value.numpy().astype(np.int64)
    scale_w = model.graph.initializers["w0_scale"].const_value.numpy()
    peak = np.abs(x).max(axis=-1, keepdims=True)
    scale_x = np.maximum(peak * np.float32(1 / 127), np.float32(TOKEN_MIN_SCALE)).astype(np.float32)
    codes = np.clip(np.rint(x / scale_x), -128, 127).astype(np.int64)
    want = (codes @ q).astype(np.float32) * scale_w * scale_x + b
    np.testing.assert_allclose(got, want, rtol=TOKEN_RTOL, atol=0)
    # the weights: one scale per output column, each within half a step of w (round to nearest)
    assert scale_w.shape == (48,) and q.shape == (64, 48)
    assert np.all(np.abs(q * scale_w - w) <= np.abs(scale_w) / 2 + 1e-6)
    fp32 = x @ w + b
    assert np.abs(got - fp32).max() < 0.02 * np.abs(fp32).max()  # int8: within 2 % of the largest output


def test_zero_rows_give_the_bias_not_nan():
    model, _, (b,) = _model(32, (16,))
    quantize_int8(model, kernel="token", method="rtn")
    x = RNG.standard_normal((2, 3, 32)).astype(np.float32)
    x[1, 2] = 0.0
    y = _session(model).run(None, {"x": x})[0]
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1, 2], b)


@pytest.mark.parametrize("kernel", ["token", "nbits"])
def test_each_row_alone_gives_the_same_bits_as_in_a_batch(kernel):
    """The positive case: a row's output does not depend on the rows batched with it, bit for bit."""
    model, _, _ = _model(64, (96, 32))
    quantize_int8(model, kernel=kernel, method="rtn")
    session = _session(model)
    x = (RNG.standard_normal((4, 6, 64)) * np.array([0.1, 1, 10, 100], np.float32)[:, None, None]).astype(np.float32)
    together = session.run(None, {"x": x})[0]
    for i in range(4):
        for j in range(6):
            alone = session.run(None, {"x": x[i:i + 1, j:j + 1]})[0]
            np.testing.assert_array_equal(alone[0, 0], together[i, j], err_msg=f"{kernel}: row {i} position {j}")


def test_dynamic_kernel_is_not_batch_invariant():
    """The negative case: DynamicQuantizeMatMul quantizes with one scale for the whole tensor, so a row's output
    moves when a row of larger values joins it."""
    model, _, _ = _model(64, (96, 32))
    quantize_int8(model, kernel="dynamic")
    session = _session(model)
    x = (RNG.standard_normal((2, 1, 64)) * np.array([1, 100], np.float32)[:, None, None]).astype(np.float32)
    together = session.run(None, {"x": x})[0]
    alone = session.run(None, {"x": x[:1]})[0]
    moved = np.abs(alone[0] - together[0]).max()
    assert moved > 0.05 * np.abs(alone).std(), f"dynamic kernel: row moved by only {moved:.3g} next to a 100x row"


def test_one_quantization_per_activation():
    model, _, _ = _model(64, (96, 32), shared_x=True)
    assert quantize_int8(model, kernel="token", method="rtn") == 3
    ops = [n.op_type for n in model.graph]
    # x feeds two MatMuls (one quantization), Relu's output a third
    assert ops.count("MatMulIntegerToFloat") == 3
    assert ops.count("QuantizeLinear") == ops.count("ConstantOfShape") == 2
    assert "MatMul" not in ops
    assert model.opset_imports[""] == TOKEN_OPSET
    names = [n.name for n in model.graph if n.op_type == "QuantizeLinear"]
    assert names == ["/layers.0/token_quant/QuantizeLinear", "/layers.1/token_quant/QuantizeLinear"]


def test_token_kernel_records_gptq_and_calibration_in_the_summary():
    model, weights, _ = _model(64, (32,))
    x = RNG.standard_normal((256, 64)).astype(np.float32)
    summary = NBitsSummary()
    quantize_int8(model, kernel="token", method="gptq", hessians={"w0": x.T @ x / len(x)},
                  importance={"w0": (x ** 2).mean(0)}, summary=summary)
    assert summary.gptq == ["/layers.0/MatMul"] and summary.calibrated == ["/layers.0/MatMul"]
    assert summary.record()["matmuls_by_bits"] == {"8": 1}


def test_gptq_lowers_the_output_error_of_the_token_kernel():
    """GPTQ with one block of K per column (the token kernel's weight layout) beats round to nearest on the
    calibration activations' outputs."""
    k, n = 128, 64
    x = RNG.standard_normal((512, k)).astype(np.float32)
    x[:, :8] *= 20  # a few heavy channels, as LayerNorm outputs have
    errors = {}
    for method in ("rtn", "gptq"):
        model, (w,), _ = _model(k, (n,), bias=False)
        quantize_int8(model, kernel="token", method=method, hessians={"w0": x.T @ x / len(x)})
        q = model.graph.initializers["w0_int8"].const_value.numpy().astype(np.float32)
        scale = model.graph.initializers["w0_scale"].const_value.numpy()
        errors[method] = float(np.square(x @ (q * scale) - x @ w).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_token_kernel_keeps_float_and_skips_what_it_cannot_quantize():
    model, _, _ = _model(64, (32,))
    report: dict = {}
    assert quantize_int8(model, report, kernel="token", keep_float=("w0",)) == 0
    assert report == {"/layers.0/MatMul": "kept float32 by the keep_float rule"}
    assert model.opset_imports[""] == 20  # nothing quantized: the graph's opset is left alone


def test_token_kernel_refuses_a_graph_whose_ops_changed_meaning_in_opset_21():
    model, _, _ = _model(64, (32,))
    scale = ir.Value(name="gn_scale", const_value=ir.tensor(np.ones(1, np.float32)))
    model.graph.register_initializer(scale)
    out = model.graph.outputs[0]
    gn = ir.Node("", "GroupNormalization", [out, scale, scale], [ir.AttrInt64("num_groups", 1)], name="gn")
    model.graph.append(gn)
    model.graph.outputs[0] = gn.outputs[0]
    with pytest.raises(ValueError, match="GroupNormalization changed meaning"):
        quantize_int8(model, kernel="token", method="rtn")


def test_hybrid_kernel_puts_the_lm_head_alone_on_matmulnbits(traced):
    """kernel="hybrid": the token kernel everywhere but the lm_head (found by the logits output), which gets
    MatMulNBits; the negative case: a graph without a logits output has no lm_head, so every MatMul gets the token
    kernel."""
    from gptexport.graphs.precision.quantize import lm_head_node

    model = ir.from_proto(onnx.load_from_string(traced("gpt2").fused))
    head = lm_head_node(model.graph).name
    summary = NBitsSummary()
    count = quantize_int8(model, kernel="hybrid", block_size=16, method="rtn", summary=summary)
    ops = {n.name: n.op_type for n in model.graph}
    assert ops[f"{head}/MatMulNBits"] == "MatMulNBits"
    assert sum(op == "MatMulNBits" for op in ops.values()) == 1
    assert sum(op == "MatMulIntegerToFloat" for op in ops.values()) == count - 1 == 4 * 2  # 4 per layer
    assert summary.bits[head] == 8
    plain, _, _ = _model(32, (16, 8))
    quantize_int8(plain, kernel="hybrid", method="rtn")
    assert {n.op_type for n in plain.graph} >= {"MatMulIntegerToFloat"}
    assert "MatMulNBits" not in {n.op_type for n in plain.graph}
