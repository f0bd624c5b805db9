"""Tiny traced GPT-2 / GPT-J: exact fusion counts, unchanged graph interface, and parity of the fused graph
against the unfused graph and transformers (prefill, decode with past, left-padded batch, greedy tokens)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gptexport.exporter.presets import ARCHITECTURES
from fusion_testing import TINY, VOCAB, empty_past, feeds, greedy, ort_runner, torch_runner
from gptexport.graphs.pipeline import expected_counts, shortfalls

FUSED_FP32_ATOL = 1e-4  # logits, fused graph vs unfused graph and vs transformers, fp32 on CPU
GREEDY_STEPS = 8
CASES = list(TINY)


def _io(model_bytes: bytes) -> list:
    graph = onnx.load_from_string(model_bytes).graph
    def spec(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return (v.name, v.type.tensor_type.elem_type, dims)
    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def _assert_close(got: list, want: list, names: list, real: np.ndarray, what: str) -> None:
    """Logits compared on real (non-pad) query positions; presents everywhere."""
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{what}: {name} shape {a.shape} != {b.shape}"
        diff = np.abs(a - b)
        if name == "logits":
            diff = diff[real]
        worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
        assert diff.size == 0 or diff.max() <= FUSED_FP32_ATOL, (
            f"{what}: {name} max abs diff {diff.max():.3g} at {worst} > FUSED_FP32_ATOL {FUSED_FP32_ATOL}")


def test_every_architecture_has_a_case():
    covered = {TINY[name][0] for name in TINY}
    assert covered == set(ARCHITECTURES), f"architectures without a tiny fusion case: {set(ARCHITECTURES) - covered}"


@pytest.mark.parametrize("name", CASES)
def test_exact_counts(traced, name):
    t = traced(name)
    expected = expected_counts(t.architecture, t.facts)
    assert t.report.counts == expected, t.report.rejections
    assert shortfalls(t.report, expected) == []


@pytest.mark.parametrize("name", CASES)
def test_no_unfused_attention_left(traced, name):
    ops = [n.op_type for n in onnx.load_from_string(traced(name).fused).graph.node]
    assert ops.count("MultiHeadAttention") == traced(name).facts["num_layers"]
    assert "Softmax" not in ops and "Tanh" not in ops


@pytest.mark.parametrize("name", CASES)
def test_interface_unchanged(traced, name):
    t = traced(name)
    assert _io(t.fused) == _io(t.unfused)


def _batch(facts, past_len: int, seq: int, pad: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (2, seq))
    mask = np.ones((2, past_len + seq), np.int64)
    mask[0, :pad] = 0  # row 0 left-padded
    shape = (2, facts["num_heads"], past_len, facts["head_size"])
    past = [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * facts["num_layers"])]
    return ids, mask, past if past_len else empty_past(facts, 2)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("step", ["prefill", "prefill-left-padded", "decode", "decode-left-padded"])
def test_parity(traced, name, step):
    t = traced(name)
    past_len, seq, pad = {"prefill": (0, 5, 0), "prefill-left-padded": (0, 5, 2), "decode": (6, 1, 0),
                          "decode-left-padded": (6, 1, 3)}[step]
    ids, mask, past = _batch(t.facts, past_len, seq, pad)
    f = feeds(t.facts, ids, mask, past)
    names = [o.name for o in onnx.load_from_string(t.fused).graph.output]
    real = mask[:, past_len:].astype(bool)
    fused = ort_runner(t.fused)(f)
    _assert_close(fused, ort_runner(t.unfused)(f), names, real, f"{name} {step} fused vs unfused")
    _assert_close(fused, torch_runner(t.model)(f), names, real, f"{name} {step} fused vs transformers")


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_equal(traced, name):
    t = traced(name)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # a left-padded batch of two
    want = greedy(torch_runner(t.model), t.facts, ids, mask, GREEDY_STEPS)
    assert (greedy(ort_runner(t.fused), t.facts, ids, mask, GREEDY_STEPS) == want).all()
    assert (greedy(ort_runner(t.unfused), t.facts, ids, mask, GREEDY_STEPS) == want).all()
