"""Logits processors against small hand-computed cases, and validation messages."""

import numpy as np
import pytest

from gptexport.runtime.errors import GenerationError
from gptexport.runtime.sampling import SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p, next_tokens, \
    sample, softmax, suppress_eos

NEG = -np.inf


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = np.array([[2.0, -2.0, 1.0, 4.0]], dtype=np.float32)
    out = apply_repetition_penalty(logits, [[0, 1, 1]], 2.0)
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, 4.0]])
    np.testing.assert_array_equal(logits, [[2.0, -2.0, 1.0, 4.0]])  # input untouched


def test_repetition_penalty_is_per_row():
    logits = np.ones((2, 3), dtype=np.float32)
    out = apply_repetition_penalty(logits, [[0], [2]], 4.0)
    np.testing.assert_array_equal(out, [[0.25, 1, 1], [1, 1, 0.25]])


def test_suppress_eos_until_min_new_tokens():
    logits = np.zeros((1, 3), dtype=np.float32)
    assert suppress_eos(logits, 2, 0, 2)[0, 2] == NEG
    assert suppress_eos(logits, 2, 2, 2)[0, 2] == 0


def test_top_k_keeps_k_best_and_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    np.testing.assert_array_equal(apply_top_k(logits, 2), [[NEG, 3.0, NEG, 3.0, NEG]])
    np.testing.assert_array_equal(apply_top_k(logits, 3), [[NEG, 3.0, 2.0, 3.0, NEG]])
    np.testing.assert_array_equal(apply_top_k(logits, 0), logits)


def test_top_p_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    keep = lambda p: np.isfinite(apply_top_p(logits, p))[0].tolist()
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.79) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1e-9) == [True, False, False, False]  # at least one
    assert keep(1.0) == [True] * 4


def test_softmax_and_sample_respect_masked_tokens():
    probs = softmax(np.array([[NEG, 0.0, NEG]]))
    np.testing.assert_array_equal(probs, [[0, 1, 0]])
    rng = np.random.default_rng(0)
    assert all(sample(probs, rng)[0] == 1 for _ in range(50))


def test_sampled_frequencies_follow_probabilities():
    rng = np.random.default_rng(0)
    probs = np.tile([[0.2, 0.5, 0.3]], (20000, 1))
    counts = np.bincount(sample(probs, rng), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], atol=0.02)


def _params(**kw):
    return SamplingParams.create(max_new_tokens=4, **kw)


def test_greedy_is_argmax_after_penalty():
    logits = np.array([[3.0, 2.0, 0.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert next_tokens(logits, _params(), [[0]], 0, None, rng)[0] == 0
    assert next_tokens(logits, _params(repetition_penalty=2.0), [[0]], 0, None, rng)[0] == 1


def test_temperature_zero_with_sampling_is_greedy():
    logits = np.array([[0.0, 0.1, 0.0]], dtype=np.float32)
    params = _params(do_sample=True, temperature=0.0)
    assert params.greedy
    assert all(next_tokens(logits, params, [[]], 0, None, np.random.default_rng(s))[0] == 1 for s in range(20))


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    params = _params(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    draw = lambda seed: [next_tokens(logits, params, [[]] * 3, 0, None, rng).tolist()
                         for rng in [np.random.default_rng(seed)] for _ in range(10)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_min_new_tokens_blocks_eos_in_greedy():
    logits = np.array([[0.0, 5.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert next_tokens(logits, _params(min_new_tokens=2), [[]], 1, 1, rng)[0] == 0
    assert next_tokens(logits, _params(min_new_tokens=2), [[]], 2, 1, rng)[0] == 1


def test_greedy_fast_path_equals_the_processed_argmax_with_eos_ties():
    """next_tokens' greedy path (no copy of the scores) against argmax(suppress_eos(...)) on random rows, rows whose
    best is eos, and rows where eos ties the best score before or after it."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    eos = 7
    logits[1, eos] = 9.0  # eos is the best: the next best must come out while eos is forbidden
    logits[2, 3] = logits[2, eos] = 9.0  # a tie, the other token first
    logits[3, eos] = logits[3, 20] = 9.0  # a tie, eos first
    logits[4, :] = 1.0  # every score equal
    for generated, min_new in ((0, 2), (2, 2), (0, 0)):
        fast = next_tokens(logits, _params(min_new_tokens=min_new), [[]] * 6, generated, eos, rng)
        expected = np.argmax(suppress_eos(logits, eos, generated, min_new), axis=-1)
        assert fast.tolist() == expected.tolist(), (generated, min_new)
    assert next_tokens(logits, _params(min_new_tokens=2), [[]] * 6, 0, None, rng).tolist() == \
        np.argmax(logits, axis=-1).tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"min_new_tokens": -1}, "min_new_tokens must be an integer >= 0, got -1"),
    ({"min_new_tokens": 9}, r"min_new_tokens must be <= max_new_tokens \(4\), got 9"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
])
def test_validation_messages(kwargs, message):
    settings = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError, match=message):
        SamplingParams.create(**settings)
    with pytest.raises(ValueError):  # GenerationError is a ValueError too
        SamplingParams.create(**settings)


def test_top_p_after_top_k_sorts_only_the_candidates_with_the_same_cut():
    """The fast path (rows already cut by top_k) keeps exactly what sorting the whole row keeps, ties included."""
    from gptexport.runtime.sampling import _top_p_rows

    rng = np.random.default_rng(7)
    for case in range(200):
        vocab = int(rng.integers(5, 300))
        logits = (rng.standard_normal((3, vocab)) * rng.choice([0.01, 1.0, 5.0])).astype(np.float32)
        if case % 3 == 0:
            logits = np.round(logits, 1)  # many ties
        cut = apply_top_k(logits, int(rng.integers(1, vocab)))
        top_p = float(rng.choice([0.1, 0.25, 0.5, 0.9, 0.999]))
        np.testing.assert_array_equal(apply_top_p(cut, top_p), _top_p_rows(cut, top_p))
