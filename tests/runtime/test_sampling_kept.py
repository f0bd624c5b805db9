"""The sampling draw on each row's kept tokens (`sampling._draw`) gives exactly the general path's token.

The general path is `sample(next_token_probs(...))`: every warper, the softmax and the cumulative sum over the full
vocabulary. `next_tokens` now computes the same draw on the tokens top_k / top_p / the processors keep; these
tests pin that the tokens are the same for the same seed, across settings, ties, -inf and tiny temperatures, and
that the server's per-row `next_tokens_each` gives each row what it gets alone.
"""

import itertools

import numpy as np
import pytest

from gptexport.runtime.sampling import SamplingParams, next_token_probs, next_tokens, next_tokens_each, sample

SETTINGS = list(itertools.product([1.0, 0.7, 1e-3], [0, 1, 5, 50], [1.0, 0.9, 0.3], [1.0, 1.3], [0, 3]))


def _logits(gen, vocab, trial):
    x = (gen.standard_normal((1, vocab)) * [0.1, 3, 30][trial % 3]).astype(np.float32)
    if trial % 4 == 1:
        x[0, gen.integers(0, vocab, 5)] = x.max()  # ties at the top
    if trial % 4 == 2:
        x = np.round(x)  # many ties everywhere
    return x


@pytest.mark.parametrize("vocab", [7, 300, 50257])
def test_the_draw_on_kept_tokens_is_the_general_paths_token(vocab):
    gen = np.random.default_rng(vocab)
    trials = 2 if vocab == 50257 else 12
    for trial in range(trials):
        logits = _logits(gen, vocab, trial)
        for temperature, top_k, top_p, penalty, min_new in SETTINGS:
            params = SamplingParams.create(8, min_new, True, temperature, top_k, top_p, penalty)
            seen, eos, seed = [list(gen.integers(0, vocab, 6))], int(gen.integers(0, vocab)), int(gen.integers(1 << 30))
            fast = next_tokens(logits, params, seen, 1, eos, np.random.default_rng(seed))
            general = sample(next_token_probs(logits, params, seen, 1, eos), np.random.default_rng(seed))
            assert fast.tolist() == general.tolist(), (trial, temperature, top_k, top_p, penalty, min_new)


def test_rows_with_nan_or_inf_take_the_general_path():
    rng_logits = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    rng_logits[0, 3] = np.nan
    rng_logits[1, 5] = np.inf
    rng_logits[2, :] = -np.inf
    params = SamplingParams.create(8, 0, True, 1.0, 5)
    for seed in range(20):
        fast = next_tokens(rng_logits, params, [[]] * 3, 0, None, np.random.default_rng(seed))
        general = sample(next_token_probs(rng_logits, params, [[]] * 3, 0, None), np.random.default_rng(seed))
        assert fast.tolist() == general.tolist()
    assert fast[1] == 5  # +inf takes the mass


def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone():
    gen = np.random.default_rng(7)
    vocab, count = 500, 24
    logits = (gen.standard_normal((count, vocab)) * 3).astype(np.float32)
    eos = 11
    logits[::5, eos] = logits.max() + 1  # some greedy rows choose eos while it is still forbidden
    params = [SamplingParams.create(8, int(i % 3), bool(i % 2), [1.0, 0.8, 0.0][i % 3], [0, 10][i % 2],
                                    [1.0, 0.9][i // 12], [1.0, 1.2][(i // 4) % 2]) for i in range(count)]
    seen = [list(gen.integers(0, vocab, 5)) for _ in range(count)]
    generated = [int(i % 4) for i in range(count)]
    alone = [next_tokens(logits[i:i + 1], params[i], [seen[i]], generated[i], eos, np.random.default_rng(i))[0]
             for i in range(count)]
    together = next_tokens_each(logits, params, seen, generated, [eos] * count,
                                [np.random.default_rng(i) for i in range(count)])
    assert together.tolist() == [int(t) for t in alone]
    assert any(p.greedy and g < p.min_new_tokens for p, g in zip(params, generated))  # the eos case is exercised
