"""Unit tests of the precision passes on graphs built in a few lines: the math, the kernels, the negatives."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gptexport.graphs.precision import NBitsSummary, nbits, quantize_int4, quantize_int8, to_fp16
from gptexport.graphs.precision.quantize import dequantize_int8, fitting_block, lm_head_node, quantize_int8_columns

RNG = np.random.default_rng(0)
# Quantized kernels vs our numpy reference: our dequantized weights, and the activation quantized as the kernel
# does it (DynamicQuantizeMatMul: uint8 per tensor; MatMulNBits accuracy_level 4: int8 per block). What is left is
# float32 summation order.
KERNEL_ATOL = 1e-4


def _dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's rounding of x (per tensor, asymmetric uint8), dequantized."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def _blockwise_int8(x: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits accuracy_level 4's rounding of A (symmetric int8 per block along K), dequantized."""
    m, k = x.shape
    padded = np.zeros((m, -(-k // block) * block), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(m, -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1)
    return (np.rint(blocks / scale) * scale).reshape(m, -1)[:, :k]


def _matmul_model(k: int, n: int, *, gemm: bool = False, trans_b: bool = False, bias: bool = False,
                  b_input: bool = False) -> tuple[ir.Model, np.ndarray]:
    w = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])]
    inits = [] if b_input else [onnx.numpy_helper.from_array(w, "w")]
    if b_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    names = ["x", "w"]
    if bias:
        inits.append(onnx.numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "c"))
        names.append("c")
    node = (helper.make_node("Gemm", names, ["y"], transB=int(trans_b)) if gemm
            else helper.make_node("MatMul", names[:2], ["y"]))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return ir.from_proto(model), w


def _run(model: ir.Model, **feeds) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _assert_close(got, want, atol, what):
    err = np.abs(got.astype(np.float32) - want)
    assert err.max() <= atol, f"{what}: worst |diff| {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


# ---- int4 / int8 MatMulNBits ------------------------------------------------------------------------------------

def _heavy_activations(k: int, m: int = 512) -> np.ndarray:
    """Activations with a few channels 30x the rest, as trained transformers have (LayerNorm outputs)."""
    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[:, RNG.choice(k, max(1, k // 16), replace=False)] *= 30.0
    return x


def test_nibbles_layout_even_element_low():
    codes = RNG.integers(-8, 8, (5, 3, 32)).astype(np.int16)
    packed = nbits.pack(codes, 4)
    assert packed.shape == (5, 3, 16)
    assert packed[0, 0, 0] == (codes[0, 0, 0] + 8) | ((codes[0, 0, 1] + 8) << 4)  # the even element in the low nibble
    np.testing.assert_array_equal(nbits.unpack(packed, 4).astype(np.int16) - 8, codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_bytes_equal_onnxruntime_quantizer(bits):
    """Our symmetric RTN is onnxruntime's MatMulNBitsQuantizer's, byte for byte: same layout, same scales."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model, w = _matmul_model(64, 24)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits)
    theirs = MatMulNBitsQuantizer(ir.to_proto(model), algo_config=config)
    theirs.process()
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.model.model.graph.initializer}
    packed, scales = nbits.quantize_blocks(w, bits, 32, "rtn")
    np.testing.assert_array_equal(arrays[f"w_Q{bits}"], packed)
    np.testing.assert_array_equal(arrays["w_scales"].reshape(-1), scales)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: K not a whole number of blocks, padded
def test_blocks_round_trip_within_one_step(bits, k):
    w = RNG.standard_normal((k, 24)).astype(np.float32)
    for method in nbits.METHODS:
        packed, scales = nbits.quantize_blocks(w, bits, 32, method)
        blocks = -(-k // 32)
        assert packed.shape == (24, blocks, 32 * bits // 8) and scales.shape == (24 * blocks,)
        back = nbits.dequantize_blocks(packed, scales, bits, k)
        step = np.abs(np.repeat(scales.reshape(24, blocks), 32, axis=1)[:, :k].T)
        assert np.all(np.abs(back - w) <= step + 1e-6), method  # half a step, a whole one at the clipped end


@pytest.mark.parametrize("bits", [4, 8])
def test_search_beats_round_to_nearest(bits):
    """The positive case: the scale search lowers the weight error, and weighted by calibration activations it
    lowers the output error, which is what the model sees."""
    k, n = 256, 64
    w = RNG.standard_normal((k, n)).astype(np.float32)
    x = _heavy_activations(k)
    errors = {}
    for name, method, importance in [("rtn", "rtn", None), ("search", "search", None),
                                     ("weighted", "search", (x ** 2).mean(0))]:
        back = nbits.dequantize_blocks(*nbits.quantize_blocks(w, bits, 32, method, importance), bits, k)
        errors[name] = (float(((back - w) ** 2).mean()), float(((x @ back - x @ w) ** 2).mean()))
    assert errors["search"][0] < errors["rtn"][0], errors
    assert errors["weighted"][1] < 0.8 * errors["rtn"][1], errors
    assert errors["weighted"][1] < errors["search"][1], errors


def test_quantize_blocks_refuses_bad_arguments():
    w = RNG.standard_normal((64, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="bits 3"):
        nbits.quantize_blocks(w, 3, 32)
    with pytest.raises(ValueError, match="method 'gptq'"):
        nbits.quantize_blocks(w, 4, 32, "gptq")
    with pytest.raises(ValueError, match="64 finite non-negative"):
        nbits.quantize_blocks(w, 4, 32, "search", np.ones(63))
    with pytest.raises(ValueError, match="64 finite non-negative"):
        nbits.quantize_blocks(w, 4, 32, "search", -np.ones(64))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("k", [64, 80])
def test_matmulnbits_matches_numpy_dequantized(bits, level, k):
    model, w = _matmul_model(k, 48)
    importance = {"w": RNG.random(k).astype(np.float32)}
    quantize = quantize_int4 if bits == 4 else quantize_int8
    assert quantize(model, block_size=32, accuracy_level=level, importance=importance) == 1
    node = next(iter(model.graph))
    attrs = {a: node.attributes[a].value for a in ("accuracy_level", "K", "bits")}
    assert (node.op_type, attrs) == ("MatMulNBits", {"accuracy_level": level, "K": k, "bits": bits})
    assert len(node.inputs) == 3  # no zero points: symmetric (onnxruntime issue 29853, see nbits.py)
    x = RNG.standard_normal((3, k)).astype(np.float32)
    want = nbits.dequantize_blocks(*nbits.quantize_blocks(w, bits, 32, "search", importance["w"]), bits, k)
    a = _blockwise_int8(x, 32) if level == 4 else x
    _assert_close(_run(model, x=x), a @ want, KERNEL_ATOL * (1 + np.abs(a @ want).max()), "MatMulNBits")


def test_int4_gemm_transposed_with_bias():
    model, w = _matmul_model(64, 32, gemm=True, trans_b=True, bias=True)
    c = model.graph.initializers["c"].const_value.numpy()
    assert quantize_int4(model, accuracy_level=0) == 1
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    want = nbits.dequantize_blocks(*nbits.quantize_blocks(w.T, 4, 32, "search"), 4, 64)
    _assert_close(_run(model, x=x), x @ want + c, KERNEL_ATOL, "MatMulNBits+bias")
    assert "w" not in model.graph.initializers  # the float weight is gone


def _two_matmuls_to_logits() -> ir.Model:
    """x -MatMul(w1)- h -MatMul(head)- Add(bias) -> logits: a body MatMul and an lm_head with a bias."""
    inits = [onnx.numpy_helper.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "model.h.0.mlp.w"),
             onnx.numpy_helper.from_array(RNG.standard_normal((64, 96)).astype(np.float32), "model.lm_head.weight"),
             onnx.numpy_helper.from_array(RNG.standard_normal(96).astype(np.float32), "model.lm_head.bias")]
    nodes = [helper.make_node("MatMul", ["x", "model.h.0.mlp.w"], ["h"], name="/model/layers.0/mlp/MatMul"),
             helper.make_node("MatMul", ["h", "model.lm_head.weight"], ["z"], name="/model/lm_head/MatMul"),
             helper.make_node("Add", ["z", "model.lm_head.bias"], ["logits"], name="/model/lm_head/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))  # h's dtype: the kernels take float32 only


def test_lm_head_kept_at_8_bits_and_recorded():
    model = _two_matmuls_to_logits()
    assert lm_head_node(model.graph).name == "/model/lm_head/MatMul"
    summary = NBitsSummary()
    assert quantize_int4(model, summary=summary) == 2
    bits = {n.name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert bits == {"/model/layers.0/mlp/MatMul/MatMulNBits": 4, "/model/lm_head/MatMul/MatMulNBits": 8}
    assert summary.kept_8bit == {"/model/lm_head/MatMul": "lm_head"}
    assert summary.record()["matmuls_by_bits"] == {"4": 1, "8": 1}


def test_keep_8bit_patterns_match_weight_names_only_where_they_match():
    model = _two_matmuls_to_logits()
    summary = NBitsSummary()
    quantize_int4(model, keep_8bit=("*h.0.mlp*",), summary=summary)  # a layer by pattern, not the lm_head
    assert summary.bits == {"/model/layers.0/mlp/MatMul": 8, "/model/lm_head/MatMul": 4}
    model, summary = _two_matmuls_to_logits(), NBitsSummary()
    quantize_int4(model, keep_8bit=(), summary=summary)  # no rule: every MatMul at 4 bits
    assert set(summary.bits.values()) == {4} and not summary.kept_8bit


def test_no_logits_output_no_lm_head():
    model, _ = _matmul_model(64, 32)  # its output is "y"
    assert lm_head_node(model.graph) is None
    summary = NBitsSummary()
    quantize_int4(model, summary=summary)
    assert summary.bits == {next(iter(summary.bits)): 4}


def test_int4_k_below_block_gets_a_smaller_block():
    model, w = _matmul_model(96, 32)  # K=96 at block 128: block 64, the second one half padding
    summary = NBitsSummary()
    assert quantize_int4(model, block_size=128, accuracy_level=0, summary=summary) == 1
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert node.attributes["block_size"].value == 64 and list(summary.record()["smaller_blocks"].values()) == [64]
    x = RNG.standard_normal((3, 96)).astype(np.float32)
    want = x @ nbits.dequantize_blocks(*nbits.quantize_blocks(w, 4, 64, "search"), 4, 96)
    _assert_close(_run(model, x=x), want, KERNEL_ATOL * (1 + np.abs(want).max()), "MatMulNBits")
    assert fitting_block(4096, 128) == 128 and fitting_block(64, 128) == 64 and fitting_block(16, 32) == 16


def test_int4_skips_k_below_smallest_block_and_activation_b():
    report = {}
    small, _ = _matmul_model(8, 32)
    assert quantize_int4(small, block_size=32, report=report) == 0
    assert "smaller than one block (16)" in next(iter(report.values()))
    report.clear()
    activation, _ = _matmul_model(64, 32, b_input=True)
    assert quantize_int4(activation, report=report) == 0
    assert "is an activation" in next(iter(report.values()))


def test_int4_refuses_bad_block_size_and_method():
    model, _ = _matmul_model(64, 32)
    with pytest.raises(ValueError, match="block_size 24"):
        quantize_int4(model, block_size=24)
    with pytest.raises(ValueError, match="method 'awq'"):
        quantize_int4(model, method="awq")
    with pytest.raises(ValueError, match="kernel 'qdq'"):
        quantize_int8(model, kernel="qdq")


# ---- int8 ---------------------------------------------------------------------------------------------------------

def test_int8_columns_round_trip():
    w = RNG.standard_normal((64, 16)).astype(np.float32) * np.linspace(0.01, 10, 16, dtype=np.float32)
    q, scale = quantize_int8_columns(w)
    assert q.dtype == np.int8 and scale.shape == (16,)
    assert np.all(np.abs(dequantize_int8(q, scale) - w) <= scale / 2 + 1e-6)  # per column: small columns stay fine


@pytest.mark.parametrize("gemm", [False, True])
def test_dynamic_quantize_matmul_matches_numpy_dequantized(gemm):
    model, w = _matmul_model(64, 48, gemm=gemm, bias=gemm)
    c = model.graph.initializers["c"].const_value.numpy() if gemm else 0.0
    assert quantize_int8(model, kernel="dynamic") == 1
    assert next(iter(model.graph)).op_type == "DynamicQuantizeMatMul"
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    q, scale = quantize_int8_columns(w)
    _assert_close(_run(model, x=x), _dynamic_uint8(x) @ dequantize_int8(q, scale) + c, KERNEL_ATOL,
                  "DynamicQuantizeMatMul")


def test_int8_skips_activation_b_and_non_float32_weight():
    report = {}
    activation, _ = _matmul_model(64, 32, b_input=True)
    assert quantize_int8(activation, report=report) == 0
    assert "is an activation" in next(iter(report.values()))
    report.clear()
    half, _ = _matmul_model(64, 32)
    to_fp16(half)
    assert quantize_int8(half, report=report) == 0
    assert "float32" in next(iter(report.values()))
    report.clear()
    assert quantize_int8(half, report=report, kernel="dynamic") == 0
    assert "float32" in next(iter(report.values()))


# ---- fp16 ---------------------------------------------------------------------------------------------------------

def _decoder_like() -> ir.Model:
    """past (B, nh, P, hs) ─Concat(new)─▶ present; scores = q @ present^T * s + mask ─Softmax─@ present ─MatMul(W)─▶ logits"""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    w = onnx.numpy_helper.from_array(RNG.standard_normal((4, 10)).astype(np.float32), "lm_head")
    scale = onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    minus = onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "minus_inf")
    zero = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
        helper.make_node("Transpose", ["present"], ["kT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["new", "kT"], ["raw"]),
        helper.make_node("Mul", ["raw", "scale"], ["scaled"]),
        helper.make_node("Cast", ["keep"], ["keep_bool"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep_bool", "zero", "minus_inf"], ["mask"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"]),
        helper.make_node("MatMul", ["probs", "present"], ["context"]),
        helper.make_node("MatMul", ["context", "lm_head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("past", f, [1, 1, "P", 4]), helper.make_tensor_value_info("new", f, [1, 1, 2, 4]),
         helper.make_tensor_value_info("keep", i64, [1, 1, 2, "T"])],
        [helper.make_tensor_value_info("logits", f, [1, 1, 2, 10]), helper.make_tensor_value_info("present", f, [1, 1, "T", 4])],
        initializer=[w, scale, minus, zero])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _decoder_feeds(big: float = 1.0, pad: bool = False):
    past = (RNG.standard_normal((1, 1, 3, 4)) * big).astype(np.float16)
    new = (RNG.standard_normal((1, 1, 2, 4)) * big).astype(np.float16)
    keep = np.ones((1, 1, 2, 5), np.int64)
    if pad:
        keep[0, 0, 0] = 0  # a fully masked row, as left padding makes
    return dict(past=past, new=new, keep=keep)


def test_fp16_weights_kv_io_and_float32_logits():
    model = _decoder_like()
    report = {}
    assert to_fp16(model, report=report) >= 1
    dtypes = {v.name: v.dtype for v in (*model.graph.inputs, *model.graph.outputs)}
    assert dtypes == {"past": ir.DataType.FLOAT16, "new": ir.DataType.FLOAT16, "keep": ir.DataType.INT64,
                      "logits": ir.DataType.FLOAT, "present": ir.DataType.FLOAT16}
    assert model.graph.initializers["lm_head"].dtype == ir.DataType.FLOAT16
    assert "attention scores" in report["node_raw" if "node_raw" in report else next(iter(report))]
    feeds = _decoder_feeds(big=150.0, pad=True)  # raw scores ~ 4 * 150^2 = 90000 > 65504
    out = _run(model, **feeds)
    assert out.dtype == np.float32 and np.isfinite(out).all()


def _run_fp16_math(model: ir.Model, **feeds) -> np.ndarray:
    """Evaluate with numpy in the graph's own dtypes: float16 ops really round to float16, as CUDA kernels do.

    onnxruntime's CPU provider cannot show an fp16 overflow: it has no float16 MatMul/Add/Softmax on x86, runs them
    in float32 and drops the Casts between them (kernels.py), so a naive graph looks fine there and fails on GPU.
    """
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)[0]


@pytest.mark.parametrize("keep_fp32,finite", [((), False), (("attention_scores",), True)])
def test_naive_fp16_overflows_where_islands_do_not(keep_fp32, finite):
    model = _decoder_like()
    to_fp16(model, keep_fp32=keep_fp32)
    feeds = _decoder_feeds(big=150.0, pad=True)
    # Aligned keys and queries: every raw score is 4 * 150^2 = 90000 > 65504 whatever the random draws before
    # this test left in RNG (a random sign pattern overflowed or not depending on the order tests ran in).
    feeds["past"], feeds["new"] = np.abs(feeds["past"]) + 150, np.abs(feeds["new"]) + 150
    out = _run_fp16_math(model, **feeds)
    assert np.isfinite(out).all() == finite


def test_fp16_keeps_ops_without_float16_schema_in_float32():
    model, _ = _matmul_model(64, 32)
    quantize_int8(model, kernel="dynamic")
    report = {}
    to_fp16(model, report=report)
    assert any("takes no float16" in r for r in report.values())
    ops = [n.op_type for n in model.graph]
    assert ops == ["Cast", "DynamicQuantizeMatMul", "Cast"], ops  # x fp16 -> fp32 -> kernel -> fp16 y
    y = _run(model, x=RNG.standard_normal((2, 64)).astype(np.float16))
    assert y.dtype == np.float16
