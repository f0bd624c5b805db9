"""graphs/last_logits.py (issue 17 item 13): the logits_to_keep input slices lm_head's input; without a feed the
graph is the Optimum-compatible one (every position's logits); a graph without a final norm is rejected."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusion_testing import session
from gptexport.graphs.fusion._match import Reject
from gptexport.graphs.last_logits import INPUT, add_logits_to_keep

D, V = 8, 11


def _lm_head_graph(with_norm: bool = True) -> ir.Model:
    """hidden (B, L, D) -> LayerNormalization -> Reshape (B, L, D) -> MatMul (D, V) -> logits (B, L, V)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((D, V)).astype(np.float32), "lm_head"),
             numpy_helper.from_array(np.ones(D, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(D, np.float32), "beta"),
             numpy_helper.from_array(np.array([0, 0, D], np.int64), "shape")]
    nodes = [helper.make_node("LayerNormalization", ["hidden", "gamma", "beta"], ["normed"], axis=-1)
             if with_norm else helper.make_node("Identity", ["hidden"], ["normed"]),
             helper.make_node("Reshape", ["normed", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "lm_head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                                                         ["batch", "sequence", D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
                              inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def test_logits_to_keep_slices_and_defaults_to_every_position():
    hidden = np.random.default_rng(1).standard_normal((2, 5, D)).astype(np.float32)
    (full,) = session(_bytes(_lm_head_graph())).run(None, {"hidden": hidden})
    model = _lm_head_graph()
    assert add_logits_to_keep(model) == 1
    onnx.checker.check_model(ir.to_proto(model))
    s = session(_bytes(model))
    assert [i.name for i in s.get_inputs()] == ["hidden"]  # required inputs unchanged: Optimum feeds the same
    assert [i.name for i in s.get_overridable_initializers()] == [INPUT]
    (default,) = s.run(None, {"hidden": hidden})
    np.testing.assert_array_equal(default, full)  # no feed: every position, as before the pass
    for k in (1, 2, 5):
        (kept,) = s.run(None, {"hidden": hidden, INPUT: np.array(k, np.int64)})
        assert kept.shape == (2, k, V)
        np.testing.assert_allclose(kept, full[:, -k:], atol=1e-6, rtol=0)


def test_a_graph_without_a_final_norm_or_twice_is_rejected():
    with pytest.raises(Reject, match="no final LayerNormalization before lm_head"):
        add_logits_to_keep(_lm_head_graph(with_norm=False))
    model = _lm_head_graph()
    add_logits_to_keep(model)
    with pytest.raises(Reject, match="already has a logits_to_keep input"):
        add_logits_to_keep(model)
