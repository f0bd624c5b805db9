"""graphs/rescore.py: the quantized tied lm_head's top-k logits recomputed exactly from the float32 table, in
every graph form the exporter writes (plain, logits_to_keep, the in-place graph with several positions per row),
on both int8 kernels and int4; an untied lm_head is refused with the reason and left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fusion_testing import VOCAB, feeds, empty_past, session

from gptexport.graphs.fusion._match import Reject
from gptexport.graphs.last_logits import add_logits_to_keep
from gptexport.graphs.precision import quantize_int4, quantize_int8
from gptexport.graphs.rescore import find_tied_lm_head, rescore_top_k
from gptexport.graphs.shared_kv import to_shared_kv

K = 8
# The rescored logits against numpy's float32 h @ table^T of the graph's own hidden state: the same dot products
# summed in another order.
RESCORE_ATOL = 1e-5


def _quantize(model: ir.Model, precision: str) -> None:
    if precision == "int4":
        quantize_int4(model, block_size=16, method="rtn")
    else:
        quantize_int8(model, kernel=precision.split("-")[1], block_size=16, method="rtn")


def _rescored(traced, precision: str, form: str) -> tuple[ir.Model, str, str]:
    """The tiny GPT-2 quantized and rescored, with its hidden state and approximate logits as extra outputs."""
    model = ir.from_proto(onnx.load_from_string(traced("gpt2").fused))
    head = find_tied_lm_head(model)
    _quantize(model, precision)
    assert rescore_top_k(model, head, K) == 1
    if form == "logits_to_keep":
        add_logits_to_keep(model)
    elif form == "shared_kv":
        to_shared_kv(model)
    unsqueeze = next(n for n in model.graph if n.name == "/model/lm_head/rescore/Unsqueeze")
    scatter = next(n for n in model.graph if n.name == "/model/lm_head/rescore/ScatterElements")
    hidden, approx = unsqueeze.inputs[0], scatter.inputs[0]
    model.graph.outputs.extend([hidden, approx])
    return model, hidden.name, approx.name


def _check(logits, hidden, approx, table):
    exact = hidden @ table.T  # (B, T, V) float32 from the graph's own hidden state
    top = np.argsort(-approx, axis=-1, kind="stable")[..., :K]
    got, want = np.take_along_axis(logits, top, -1), np.take_along_axis(exact, top, -1)
    np.testing.assert_allclose(got, want, rtol=0, atol=RESCORE_ATOL)
    others = np.ones(logits.shape, bool)
    np.put_along_axis(others, top, False, -1)
    assert np.array_equal(logits[others], approx[others])  # the rest are the quantized logits, untouched
    assert not np.allclose(approx, exact, atol=RESCORE_ATOL)  # the lm_head is quantized: there was error to fix


@pytest.mark.parametrize("precision", ["int8-nbits", "int8-token", "int4"])
@pytest.mark.parametrize("form", ["plain", "logits_to_keep"])
def test_top_k_equal_float32_logits_of_the_same_hidden_state(traced, precision, form):
    model, hidden_name, approx_name = _rescored(traced, precision, form)
    table = model.graph.initializers["model.lm_head.weight"].const_value.numpy()
    sess = session(ir.to_proto(model).SerializeToString())
    facts = traced("gpt2").facts
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    f = feeds(facts, ids, mask, empty_past(facts, 3))
    if form == "logits_to_keep":
        f["logits_to_keep"] = np.array(2, np.int64)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, f)))
    assert out["logits"].shape == (3, 2 if form == "logits_to_keep" else 7, VOCAB)
    _check(out["logits"], out[hidden_name], out[approx_name], table)


def test_in_place_graph_with_several_positions_per_row(traced):
    """The shared_kv graph's logits_index picks 1 + K positions per row (a speculative verify step)."""
    model, hidden_name, approx_name = _rescored(traced, "int8-nbits", "shared_kv")
    table = model.graph.initializers["model.lm_head.weight"].const_value.numpy()
    sess = session(ir.to_proto(model).SerializeToString())
    facts = traced("gpt2").facts
    batch, steps, slots = 2, 6, 16
    rng = np.random.default_rng(2)
    f = {"input_ids": rng.integers(0, VOCAB, (batch, steps)).astype(np.int64),
         "position_ids": np.tile(np.arange(steps, dtype=np.int64), (batch, 1)),
         "seqlens_k": np.full(batch, steps - 1, np.int32), "total_sequence_length": np.array(steps, np.int32),
         "logits_index": np.array([3, 4, 5, 2, 3, 5], np.int64)}  # 3 positions per row
    shape = (batch, facts["num_heads"], slots, facts["head_size"])
    f.update({v.name: np.zeros(shape, np.float32) for v in model.graph.inputs if v.name.startswith("past_")})
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, f)))
    assert out["logits"].shape == (batch, 3, VOCAB)
    _check(out["logits"], out[hidden_name], out[approx_name], table)


@pytest.mark.parametrize("name", ["gptj-partial-rotary"])
def test_untied_lm_head_is_refused_and_left_alone(traced, name):
    model = ir.from_proto(onnx.load_from_string(traced(name).fused))
    before = [n.op_type for n in model.graph]
    with pytest.raises(Reject, match="untied"):
        find_tied_lm_head(model)
    assert [n.op_type for n in model.graph] == before


def test_quantized_lm_head_and_bad_k_are_refused(traced):
    model = ir.from_proto(onnx.load_from_string(traced("gpt2").fused))
    head = find_tied_lm_head(model)
    with pytest.raises(ValueError, match="rescore top-k 0"):
        rescore_top_k(model, head, 0)
    quantize_int8(model, block_size=16, method="rtn")
    with pytest.raises(Reject, match="no float MatMul"):  # found after quantization: too late, said so
        find_tied_lm_head(model)


@pytest.mark.parametrize("setting,applied", [(None, True), (4, True), (0, False)])
def test_export_passes_record_the_rescoring(traced, setting, applied):
    """exporter/passes.py: on by default for int8 text generation, k from --rescore-top-k, 0 turns it off."""
    from gptexport.exporter.passes import run_passes
    from gptexport.graphs.rescore import DEFAULT_TOP_K

    model = ir.from_proto(onnx.load_from_string(traced("gpt2").unfused))
    section = run_passes(model, "gpt2", traced("gpt2").facts, dtype="int8",
                         quant={"block_size": 16, "method": "rtn", "rescore_top_k": setting})
    assert section["rescore"]["applied"] is applied
    ops = [n.op_type for n in model.graph]
    assert ("ScatterElements" in ops) is applied
    if applied:
        assert section["rescore"]["top_k"] == (DEFAULT_TOP_K if setting is None else setting)
        assert section["counts"]["rescore_top_k"] == 1
    else:
        assert "--rescore-top-k 0" in section["rescore"]["reason"]
    untouched = run_passes(ir.from_proto(onnx.load_from_string(traced("gpt2").unfused)), "gpt2",
                           traced("gpt2").facts, dtype="int8", quant={"block_size": 16, "method": "rtn"})
    assert "rescore" not in untouched  # head tasks pass no rescore setting: not considered
