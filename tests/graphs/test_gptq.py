"""GPTQ (graphs/precision/gptq.py): the error compensation lowers a MatMul's output error where activations are
correlated; with no correlation it is exactly the plain block quantizer; a wrong or malformed Hessian is caught
(wrong: a worse output error than no compensation at all; malformed: ValueError naming what is wrong); the
quantize_int4 pass records which MatMuls it ran on and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gptexport.graphs.precision import NBitsSummary, gptq, nbits, quantize_int4

RNG = np.random.default_rng(0)


def _correlated(k: int, m: int = 1024) -> np.ndarray:
    """Activations whose channels are mixed (as a LayerNorm's outputs through trained weights are) and of uneven size."""
    mix = RNG.standard_normal((k, k)) * 0.3 + np.eye(k)
    return ((RNG.standard_normal((m, k)) * np.exp(RNG.standard_normal(k))) @ mix).astype(np.float32)


def _output_error(x, w, packed, scales, bits=4) -> float:
    back = nbits.dequantize_blocks(packed, scales, bits, w.shape[0])
    return float(((x @ back - x @ w) ** 2).mean())


@pytest.mark.parametrize("block", [32, 128])
def test_gptq_lowers_output_error(block):
    """The positive case: on correlated activations GPTQ's output error is well under the weighted search's (the
    best per-weight method) and round to nearest's."""
    k, n = 256, 96
    x, w = _correlated(k), (RNG.standard_normal((k, n)) * 0.05).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    rtn = _output_error(x, w, *nbits.quantize_blocks(w, 4, block, "rtn"))
    search = _output_error(x, w, *nbits.quantize_blocks(w, 4, block, "search", np.diag(h)))
    ours = _output_error(x, w, *gptq.quantize_blocks(w, 4, block, gptq.prepare(h, k, block)))
    assert ours < 0.5 * search < 0.5 * rtn, (ours, search, rtn)


def test_gptq_without_correlation_is_the_block_quantizer():
    """H = c I couples no channels: GPTQ moves no error, so its scales are nbits' search's and its codes are plain
    rounding to them."""
    k, n = 96, 40  # 96: not a whole number of 64-blocks, padded
    w = RNG.standard_normal((k, n)).astype(np.float32)
    for bits in (4, 8):
        packed, scales = gptq.quantize_blocks(w, bits, 64, gptq.prepare(np.eye(k) * 3.0, k, 64))
        np.testing.assert_allclose(scales, nbits.quantize_blocks(w, bits, 64, "search", np.full(k, 3.0))[1])
        wt = np.zeros((n, 128), np.float32)
        wt[:, :k] = w.T
        rounded = nbits._codes(wt.reshape(n, 2, 64), scales.reshape(n, 2), 2 ** (bits - 1)).astype(np.int16)
        np.testing.assert_array_equal(packed, nbits.pack(rounded, bits))


def test_columns_are_independent():
    """Any slice of output columns quantizes as in the whole weight (quantize.py quantizes large weights so)."""
    k, n = 128, 48
    x, w = _correlated(k, 512), RNG.standard_normal((k, n)).astype(np.float32)
    prepared = gptq.prepare(x.T.astype(np.float64) @ x, k, 32)
    whole = gptq.quantize_blocks(w, 4, 32, prepared)
    left, right = gptq.quantize_blocks(w[:, :20], 4, 32, prepared), gptq.quantize_blocks(w[:, 20:], 4, 32, prepared)
    np.testing.assert_array_equal(whole[0], np.concatenate([left[0], right[0]]))
    np.testing.assert_allclose(whole[1], np.concatenate([left[1], right[1]]), rtol=1e-6)


def test_wrong_hessian_is_worse_than_none():
    """The negative case: another layer's statistics (here: activations of a different mixing) steer the
    compensation the wrong way, so the output error on the real activations exceeds plain rounding's."""
    k, n = 256, 96
    x, other = _correlated(k), _correlated(k)
    w = (RNG.standard_normal((k, n)) * 0.05).astype(np.float32)
    wrong = gptq.quantize_blocks(w, 4, 32, gptq.prepare(other.T.astype(np.float64) @ other / len(other), k, 32))
    plain = nbits.quantize_blocks(w, 4, 32, "search")
    assert _output_error(x, w, *wrong) > _output_error(x, w, *plain)


def test_malformed_hessian_is_refused():
    k = 64
    with pytest.raises(ValueError, match=r"shape \(64, 63\), expected \(64, 64\)"):
        gptq.prepare(np.eye(k)[:, :63], k, 32)
    bad = np.eye(k)
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        gptq.prepare(bad, k, 32)
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq.prepare(-np.eye(k), k, 32)
    with pytest.raises(ValueError, match="64 rows, the weight needs 96"):
        gptq.quantize_blocks(np.ones((96, 4), np.float32), 4, 32, gptq.prepare(np.eye(k), k, 32))


def test_pass_uses_hessians_where_given_and_runs():
    """quantize_int4(method="gptq") quantizes the MatMul with a Hessian by GPTQ (recorded), a MatMul without one by
    the search, and onnxruntime's MatMulNBits computes what the numpy dequantization says."""
    import onnxruntime as ort

    k, n = 128, 32
    x = _correlated(k, 256)
    w1, w2 = (RNG.standard_normal((k, n)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
         helper.make_node("MatMul", ["x", "w2"], ["b"], name="second"),
         helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    h = x.T.astype(np.float64) @ x / len(x)
    summary = NBitsSummary()
    assert quantize_int4(model, method="gptq", hessians={"w1": h}, summary=summary, keep_8bit=()) == 2
    assert summary.gptq == ["first"] and summary.record()["gptq_matmuls"] == 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x[:8]})[0]
    expected = x[:8] @ (nbits.dequantize_blocks(*gptq.quantize_blocks(w1, 4, 32, gptq.prepare(h, k, 32)), 4, k)
                        + nbits.dequantize_blocks(*nbits.quantize_blocks(w2, 4, 32, "search"), 4, k))
    np.testing.assert_allclose(got, expected, atol=0.05 * float(np.abs(expected).max()))  # int8 activations
