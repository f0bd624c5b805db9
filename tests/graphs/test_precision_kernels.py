"""Re-measure graphs/precision/kernels.py: does onnxruntime's CPU provider run each op in float16 natively, via its
own inserted Casts, or not at all? A one-node float16 model per op; the optimized graph tells which."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from gptexport.graphs.precision.kernels import CAST, FP16_CPU, MS, NATIVE, NONE

H = TP.FLOAT16
RNG = np.random.default_rng(0)


def _h(*shape):
    return (H, RNG.random(shape).astype(np.float16))


# op -> (inputs as (dtype, array) or None for an omitted optional, number of outputs, attributes)
CASES = {
    ("", "MatMul"): ([_h(3, 8), _h(8, 8)], 1, {}),
    ("", "Add"): ([_h(3, 8), _h(3, 8)], 1, {}),
    ("", "Softmax"): ([_h(3, 8)], 1, {}),
    ("", "Tanh"): ([_h(3, 8)], 1, {}),
    ("", "LayerNormalization"): ([_h(3, 8), _h(8), _h(8)], 1, {"axis": -1}),
    ("", "Concat"): ([_h(3, 8), _h(3, 8)], 1, {"axis": 0}),
    (MS, "SkipLayerNormalization"): ([_h(1, 3, 8), _h(1, 3, 8), _h(8), _h(8)], 1, {}),
    (MS, "RotaryEmbedding"): ([_h(1, 3, 16), (TP.INT64, np.array([[0, 1, 2]])), _h(16, 2), _h(16, 2)], 1,
                              {"interleaved": 1, "num_heads": 2, "rotary_embedding_dim": 4}),
    (MS, "MultiHeadAttention"): ([_h(1, 3, 16), _h(1, 3, 16), _h(1, 3, 16), None, None, _h(1, 1, 3, 5),
                                  _h(1, 2, 2, 8), _h(1, 2, 2, 8)], 3, {"num_heads": 2}),
    (MS, "FastGelu"): ([_h(2, 3, 8), _h(8)], 1, {}),
    (MS, "MatMulNBits"): ([_h(3, 32), (TP.UINT8, RNG.integers(0, 255, (8, 1, 16)).astype(np.uint8)), _h(8)], 1,
                          {"K": 32, "N": 8, "bits": 4, "block_size": 32}),
    (MS, "DynamicQuantizeMatMul"): ([_h(3, 8), (TP.INT8, np.ones((8, 8), np.int8)), _h(8)], 1, {}),
}


def _measure(domain, op, inputs, outputs, attrs, tmp_path) -> str:
    names = ["" if i is None else f"i{k}" for k, i in enumerate(inputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, [f"o{k}" for k in range(outputs)], domain=domain, **attrs)], "probe",
        [helper.make_tensor_value_info(n, i[0], i[1].shape) for n, i in zip(names, inputs) if i is not None],
        [onnx.ValueInfoProto(name=f"o{k}") for k in range(outputs)])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString(),
                                       options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a schema that refuses float16 is the measurement
        return NONE
    session.run(None, {n: i[1] for n, i in zip(names, inputs) if i is not None})
    casts = sum(n.op_type == "Cast" for n in onnx.load(options.optimized_model_filepath).graph.node)
    return CAST if casts else NATIVE


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0] or 'onnx'}.{k[1]}")
def test_fp16_cpu_table_matches_onnxruntime(key, tmp_path):
    got = _measure(*key, *CASES[key], tmp_path)
    assert got == FP16_CPU[key], f"{key[1]}: onnxruntime {ort.__version__} says {got}, kernels.py says {FP16_CPU[key]}"
