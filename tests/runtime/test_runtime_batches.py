"""Issue 17 item 13: a long prompt list runs as bounded batches, with the outputs of one batch."""

import numpy as np
import pytest

import fake_artifact as fa
from gptexport.runtime.errors import GenerationError

PROMPTS = ["a", "hello", "xyz", "k", "abc", "xa", "q", "mn", "hello there"]


def test_a_long_list_runs_in_bounded_batches_with_the_same_outputs(model, monkeypatch):
    one = model.generate(PROMPTS, max_new_tokens=6, max_batch_size=len(PROMPTS), return_result=True)
    batches, real = [], model.decoder.new_cache
    monkeypatch.setattr(model.decoder, "new_cache", lambda batch, **k: batches.append(batch) or real(batch, **k))
    split = model.generate(PROMPTS, max_new_tokens=6, max_batch_size=4, return_result=True)
    assert batches == [4, 4, 1]
    assert split.completions == one.completions
    assert (split.stats.batch, split.stats.batches, one.stats.batches) == (9, 3, 1)


def test_the_default_bound_applies(model, monkeypatch):
    batches, real = [], model.decoder.new_cache
    monkeypatch.setattr(model.decoder, "new_cache", lambda batch, **k: batches.append(batch) or real(batch, **k))
    monkeypatch.setattr(model, "max_batch_size", 2)
    assert model.generate(PROMPTS[:5], max_new_tokens=2) == [model.generate(p, max_new_tokens=2) for p in PROMPTS[:5]]
    assert batches[:3] == [2, 2, 1]


def test_beam_search_and_seeded_sampling_split_too(model):
    beams = model.generate(PROMPTS, max_new_tokens=4, num_beams=2, return_tokens=True)
    assert model.generate(PROMPTS, max_new_tokens=4, num_beams=2, max_batch_size=3, return_tokens=True) == beams
    kwargs = dict(max_new_tokens=5, do_sample=True, temperature=50.0, seed=11, max_batch_size=4)
    a, b = model.generate(["hello"] * 8, **kwargs), model.generate(["hello"] * 8, **kwargs)
    assert a == b  # reproducible
    assert a[:4] != a[4:]  # one random stream across the batches: the second batch does not replay the first


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_a_bad_batch_size_is_one_line(model, bad):
    with pytest.raises(GenerationError, match="max_batch_size must be None or an integer >= 1"):
        model.generate(PROMPTS, max_batch_size=bad)
