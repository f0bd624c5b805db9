"""Unit tests of the precision passes on graphs built in a few lines: the math, the kernels, the negatives."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphs.precision import quantize_int4, quantize_int8, to_fp16
from graphs.precision.quantize import (dequantize_int4_blocks, dequantize_int8, pack_nibbles, quantize_int4_blocks,
                                       quantize_int8_columns, unpack_nibbles)

RNG = np.random.default_rng(0)
# Quantized kernels vs our numpy dequantized reference. The weights are exactly what we dequantize; the gap is the
# kernel's own activation quantization (accuracy_level 4, DynamicQuantizeMatMul: int8 A) or fp32 summation order.
KERNEL_ATOL_EXACT_A = 1e-4
KERNEL_ATOL_INT8_A = 0.05  # x ~ N(0,1), K=64: A's rounding step max|x|/127 ~ 0.03 per element, summed over K


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


# ---- int4 ---------------------------------------------------------------------------------------------------------

def test_nibbles_round_trip():
    q = RNG.integers(0, 16, (5, 3, 32)).astype(np.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 3, 16)
    assert packed[0, 0, 0] == q[0, 0, 0] | (q[0, 0, 1] << 4)  # the even element in the low nibble
    np.testing.assert_array_equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("k", [64, 80])  # 80: K not a whole number of blocks, padded
def test_int4_blocks_round_trip_within_half_step(k):
    w = RNG.standard_normal((k, 24)).astype(np.float32)
    packed, scales, zero = quantize_int4_blocks(w, 32)
    blocks = -(-k // 32)
    assert packed.shape == (24, blocks, 16) and scales.shape == (24 * blocks,) and zero.shape == (24 * -(-blocks // 2),)
    back = dequantize_int4_blocks(packed, scales, zero, k)
    step = np.repeat(scales.reshape(24, blocks), 32, axis=1)[:, :k].T
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


@pytest.mark.parametrize("level,atol", [(0, KERNEL_ATOL_EXACT_A), (4, KERNEL_ATOL_INT8_A)])
@pytest.mark.parametrize("k", [64, 80])
def test_matmulnbits_matches_numpy_dequantized(level, atol, k):
    model, w = _matmul_model(k, 48)
    assert quantize_int4(model, block_size=32, accuracy_level=level) == 1
    node = next(iter(model.graph))
    assert (node.op_type, node.attributes["accuracy_level"].value, node.attributes["K"].value) == ("MatMulNBits", level, k)
    x = RNG.standard_normal((3, k)).astype(np.float32)
    packed, scales, zero = quantize_int4_blocks(w, 32)
    _assert_close(_run(model, x=x), x @ dequantize_int4_blocks(packed, scales, zero, k), atol, "MatMulNBits")


def test_int4_gemm_transposed_with_bias():
    model, w = _matmul_model(64, 32, gemm=True, trans_b=True, bias=True)
    c = model.graph.initializers["c"].const_value.numpy()
    assert quantize_int4(model, accuracy_level=0) == 1
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    packed, scales, zero = quantize_int4_blocks(w.T, 32)
    _assert_close(_run(model, x=x), x @ dequantize_int4_blocks(packed, scales, zero, 64) + c, KERNEL_ATOL_EXACT_A,
                  "MatMulNBits+bias")
    assert "w" not in model.graph.initializers  # the float weight is gone


def test_int4_skips_k_below_block_and_activation_b():
    report = {}
    small, _ = _matmul_model(16, 32)
    assert quantize_int4(small, block_size=32, report=report) == 0
    assert "smaller than one block" in next(iter(report.values()))
    report.clear()
    activation, _ = _matmul_model(64, 32, b_input=True)
    assert quantize_int4(activation, report=report) == 0
    assert "is an activation" in next(iter(report.values()))


def test_int4_refuses_bad_block_size():
    model, _ = _matmul_model(64, 32)
    with pytest.raises(ValueError, match="block_size 24"):
        quantize_int4(model, block_size=24)


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
    assert quantize_int8(model) == 1
    assert next(iter(model.graph)).op_type == "DynamicQuantizeMatMul"
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    q, scale = quantize_int8_columns(w)
    _assert_close(_run(model, x=x), x @ dequantize_int8(q, scale) + c, KERNEL_ATOL_INT8_A, "DynamicQuantizeMatMul")


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
