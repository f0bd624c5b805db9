"""Issue 17 item 13 on a real export: the default graph carries logits_to_keep; the runtime's prefill brings back
one position's logits, not (B, L, vocab); a caller that feeds nothing (Optimum) still gets every position."""

from __future__ import annotations

import numpy as np

from gptexport import runtime
from tiny_models import hf_greedy

PADDED = ["Hi", "Once upon a time, in a land far away, there lived a", "The quick brown fox"]


def test_prefill_returns_the_last_position_only(tiny_export, monkeypatch):
    _, artifact, manifest = tiny_export("gpt2")
    assert [i["name"] for i in manifest["inputs"]][-1] == "logits_to_keep"
    model = runtime.load(artifact)
    assert model.decoder.keeps_logits
    shapes, real = [], model.decoder.session.run

    def spy(names, feeds, *args):
        out = real(names, feeds, *args)
        shapes.append((feeds["input_ids"].shape, out[0].shape))
        return out

    monkeypatch.setattr(model.decoder.session, "run", spy)
    model.generate(PADDED, max_new_tokens=3, min_new_tokens=3)
    (batch, length), vocab = shapes[0][0], manifest["config"]["vocab_size"]
    assert length > 10 and shapes[0][1] == (batch, 1, vocab)  # not (3, L, 50257)
    assert all(logits == (batch, 1, vocab) for _, logits in shapes)


def test_the_kept_logits_are_the_last_of_the_full_ones(tiny_export):
    _, artifact, _ = tiny_export("gpt2")
    decoder = runtime.load(artifact).decoder
    ids = np.array([[15496, 11, 616, 1438, 318]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(5)[None, :]
    full = decoder.step(ids, mask, positions, decoder.new_cache(1))  # what Optimum gets: no feed
    last = decoder.step(ids, mask, positions, decoder.new_cache(1), logits_to_keep=1)
    assert full.shape[1] == 5 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_split_batches_give_transformers_tokens(tiny_export, hf_model):
    from tokenizers import Tokenizer

    ckpt, artifact, _ = tiny_export("gpt2")
    model = runtime.load(artifact)
    theirs = hf_greedy(hf_model(ckpt), Tokenizer.from_file(str(artifact / "tokenizer.json")), PADDED, 6)
    result = model.generate(PADDED, max_new_tokens=6, min_new_tokens=6, max_batch_size=2, return_result=True)
    assert [c.tokens for c in result.completions] == theirs
    assert (result.stats.batches, result.stats.batch) == (2, 3)
