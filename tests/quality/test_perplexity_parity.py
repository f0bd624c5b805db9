"""runtime.perplexity on real exports equals the same sliding-window loop run by transformers in torch."""

import math

import numpy as np
import pytest
import torch

from gptexport import runtime
from gptexport.runtime.perplexity import perplexity, windows

REL = 1e-4  # the bound: fp32 artifact against transformers, same text and windows


def torch_perplexity(model, ids, window: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide's loop (labels -100 outside each window's new tokens), summing the exact
    number of scored tokens per window (the guide's `num_valid - batch` undercounts windows after the first)."""
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        new = end - previous_end
        inputs = torch.as_tensor(ids[begin:end])[None]
        labels = inputs.clone()
        labels[:, :-new] = -100
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            with torch.no_grad():
                loss = model(input_ids=inputs, labels=labels).loss
            nll += float(loss) * scored
            count += scored
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def _text(ckpt) -> str:
    held = ckpt / "heldout.txt"
    return held.read_text(encoding="utf-8")[:2500] if held.exists() else \
        "In 1991, the remains of Russian Tsar Nicholas II and his family were found. " * 12


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
@pytest.mark.parametrize("window,stride", [(64, 32), (128, 128)])
def test_random_weights_equal_transformers(tiny_export, hf_model, name, window, stride):
    ckpt, artifact, _ = tiny_export(name)
    model = runtime.load(artifact)
    text = _text(ckpt)
    ids = np.asarray(model.tokenizer.encode(text).ids)
    want, count = torch_perplexity(hf_model(ckpt), ids, window, stride)
    got = perplexity(model, text, window=window, stride=stride)
    assert got.tokens == count == sum(k for _, _, k in windows(len(ids), window, stride))
    assert abs(got.perplexity / want - 1) <= REL, (got.perplexity, want)


def test_trained_fp32_equals_transformers(trained_export, hf_model):
    ckpt, artifact, _ = trained_export("gpt2-ci")
    model = runtime.load(artifact)
    text = _text(ckpt)
    ids = np.asarray(model.tokenizer.encode(text).ids)
    want, _ = torch_perplexity(hf_model(ckpt), ids, 128, 64)
    got = perplexity(model, text, window=128, stride=64, reference=model)
    assert abs(got.perplexity / want - 1) <= REL, (got.perplexity, want)
    assert want < 1000  # trained: far from the 50257 of a uniform guess
    assert got.kl["mean"] == 0.0 and got.kl["top1_agreement"] == 1.0


def test_shared_buffer_scores_like_concat(tiny_export):
    ckpt, artifact, _ = tiny_export("gpt2")
    _, shared, _ = tiny_export("gpt2", kv_layout="shared_buffer")  # the session's (tests/test_export_kv_layout.py)
    text = _text(ckpt)[:600]
    a = perplexity(runtime.load(artifact), text, window=48, stride=16)
    b = perplexity(runtime.load(shared), text, window=48, stride=16, reference=runtime.load(artifact))
    assert a.tokens == b.tokens and abs(b.perplexity / a.perplexity - 1) <= 1e-5
    assert b.kl["mean"] < 1e-9 and b.kl["top1_agreement"] == 1.0
