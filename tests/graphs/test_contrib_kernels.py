"""Every contrib op the fusion emits runs on onnxruntime's CPU provider, in float32 and in float16, with the inputs
and attributes the rules give it. graphs/fusion/__init__.py documents these results for the fp16 work."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from fusion_testing import session

F = "f"  # placeholder for the dtype under test
# op -> (node inputs, graph inputs (name, shape, dtype), attributes, node outputs)
OPS = {
    "RotaryEmbedding": (["x", "pos", "cos", "sin"],
                        [("x", [1, 2, 16], F), ("pos", [1, 2], TensorProto.INT64), ("cos", [32, 2], F),
                         ("sin", [32, 2], F)],
                        dict(interleaved=1, num_heads=2, rotary_embedding_dim=4), ["y"]),
    "MultiHeadAttention": (["q", "k", "v", "", "", "mask", "past_k", "past_v"],
                           [("q", [1, 2, 16], F), ("k", [1, 2, 16], F), ("v", [1, 2, 16], F),
                            ("mask", [1, 1, 2, 5], F), ("past_k", [1, 2, 3, 8], F), ("past_v", [1, 2, 3, 8], F)],
                           dict(num_heads=2, scale=0.35), ["y", "present_k", "present_v"]),
    "SkipLayerNormalization": (["a", "b", "gamma", "beta", "bias"],
                               [("a", [1, 2, 16], F), ("b", [1, 2, 16], F), ("gamma", [16], F), ("beta", [16], F),
                                ("bias", [16], F)],
                               dict(epsilon=1e-5), ["y", "", "", "sum"]),
    "FastGelu": (["x", "bias"], [("x", [1, 2, 16], F), ("bias", [16], F)], {}, ["y"]),
}


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["float32", "float16"])
@pytest.mark.parametrize("op", list(OPS))
def test_cpu_kernel_exists(op, dtype):
    node_inputs, inputs, attrs, outputs = OPS[op]
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(0)
    feeds, infos = {}, []
    for name, shape, kind in inputs:
        elem = dtype if kind == F else kind
        infos.append(helper.make_tensor_value_info(name, elem, shape))
        feeds[name] = (rng.standard_normal(shape).astype(np_dtype) if kind == F
                       else np.arange(int(np.prod(shape))).reshape(shape).astype(np.int64))
    node = helper.make_node(op, node_inputs, outputs, domain="com.microsoft", **attrs)
    outs = [helper.make_tensor_value_info(o, dtype, None) for o in outputs if o]
    graph = helper.make_graph([node], op, infos, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    results = session(model.SerializeToString()).run(None, feeds)
    assert all(r.dtype == np_dtype and np.isfinite(r).all() for r in results)
