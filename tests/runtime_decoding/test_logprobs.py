"""Token log-probabilities against transformers' compute_transition_scores(normalize_logits=True)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from gptexport import runtime
LOGPROB_ATOL = 1e-4  # fp32 graph vs fp32 torch, after a log-softmax over the vocabulary
NEW = 8


def test_greedy_logprobs_equal_transformers(tiny_export, hf_model):
    ckpt, artifact, _ = tiny_export("gpt2")
    model = runtime.load(artifact)
    hf = hf_model(ckpt)
    ids = Tokenizer.from_file(str(artifact / "tokenizer.json")).encode("Hello world").ids
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                          min_new_tokens=NEW, pad_token_id=50256, eos_token_id=50256, output_logits=True,
                          return_dict_in_generate=True)
        theirs = hf.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0].tolist()
    _, tokens, ours = model.generate("Hello world", max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True,
                                     return_logprobs=True)
    assert tokens == out.sequences[0, len(ids):].tolist()
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert len(ours) == NEW and worst <= LOGPROB_ATOL, f"logprobs: worst |diff| {worst}"


def test_logprobs_follow_the_rows_of_a_batch(tiny_export):
    _, artifact, _ = tiny_export("gpt2")
    model = runtime.load(artifact)
    texts, tokens, logprobs = model.generate(["Hi", "Once upon a time"], max_new_tokens=4, return_tokens=True,
                                             return_logprobs=True)
    assert [len(t) for t in tokens] == [len(p) for p in logprobs]
    assert all(p <= 0 for row in logprobs for p in row)
