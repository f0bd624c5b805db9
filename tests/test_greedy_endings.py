"""Greedy parity where generation ends early: eos, stop strings, and rows of a batch that finish at different steps.

The other parity tests force `min_new_tokens`, so every row runs to the length limit and eos, stop strings and
early-finishing rows are never compared with transformers (issue 17, item 9). Here a tiny checkpoint is saved with
an eos_token_id chosen from its own greedy continuations, so eos really is generated: early in one row, later in
another, never in a third; the artifact is then compared with transformers' `generate` with no forced length.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from gptexport import runtime
from gptexport.exporter.build import ExportOptions, export

from tiny_models import hf_generate, make_checkpoint

NEW = 24
# a left-padded batch (different lengths), and single prompts
BATCH = ["Hi", "The quick brown fox jumps over the lazy dog because", "Once upon a time, in a land far away, there"]


def _cut_at_eos(row: list[int], eos: int) -> list[int]:
    """transformers' row up to and including its first eos (it pads finished rows after it)."""
    return row[:row.index(eos) + 1] if eos in row else row


def _pick_eos(continuations: list[list[int]]) -> int:
    """A token that row 0 generates early (step >= 2), row 1 later, and row 2 not at all."""
    first, second, third = continuations
    for step, token in enumerate(first[2:NEW // 2], start=2):
        later = second.index(token) if token in second else -1
        if token not in first[:step] and later > step and token not in third:
            return token
    for step, token in enumerate(first[2:NEW // 2], start=2):  # else: row 0 early, the others never
        if token not in first[:step] and token not in second and token not in third:
            return token
    raise AssertionError(f"no token ends row 0 early but not the others: {continuations}")


@pytest.fixture(scope="module")
def eos_artifact(tmp_path_factory, hf_model):
    """(transformers model, artifact dir, tokenizer, eos) for a tiny GPT-2 whose eos is one it generates."""
    root = tmp_path_factory.mktemp("eos")
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    free = hf_generate(hf_model(ckpt), tokenizer, BATCH, max_new_tokens=NEW, min_new_tokens=NEW)
    eos = _pick_eos(free)
    for name in ("config.json", "generation_config.json"):  # both: the manifest takes generation_config's
        config = json.loads((ckpt / name).read_text())
        config["eos_token_id"] = eos
        (ckpt / name).write_text(json.dumps(config))
    result = export(ExportOptions(model=str(ckpt), output=str(root / "artifact")))
    assert result.manifest["special_tokens"]["eos_token_id"] == eos
    return hf_model(ckpt), result.output, tokenizer, eos


def test_eos_ends_rows_as_transformers_does(eos_artifact):
    hf, artifact, tokenizer, eos = eos_artifact
    model = runtime.load(str(artifact))
    theirs = [_cut_at_eos(row, eos) for row in hf_generate(hf, tokenizer, BATCH, eos=eos, max_new_tokens=NEW)]
    assert theirs[0][-1] == eos and len(theirs[0]) < NEW, "row 0 must end early on eos"
    assert eos not in theirs[2] and len(theirs[2]) == NEW, "row 2 must run to the length limit"
    result = model.generate(BATCH, max_new_tokens=NEW, return_result=True)  # the padded batch
    assert [c.tokens for c in result.completions] == theirs
    assert [c.generated_tokens for c in result.completions] == [len(t) for t in theirs]
    assert [c.finish_reason for c in result.completions] == ["eos" if t[-1] == eos else "length" for t in theirs]
    for prompt, want in zip(BATCH, theirs):  # alone, each row gives the same tokens as in the batch
        alone = hf_generate(hf, tokenizer, [prompt], eos=eos, max_new_tokens=NEW)[0]
        assert _cut_at_eos(alone, eos) == want
        assert model.generate([prompt], max_new_tokens=NEW, return_tokens=True)[1] == [want]


def test_eos_text_is_the_text_before_eos(eos_artifact):
    hf, artifact, tokenizer, eos = eos_artifact
    model = runtime.load(str(artifact))
    theirs = _cut_at_eos(hf_generate(hf, tokenizer, BATCH[:1], eos=eos, max_new_tokens=NEW)[0], eos)
    assert model.generate(BATCH[0], max_new_tokens=NEW) == tokenizer.decode(theirs[:-1])


def _stop_string(tokenizer, tokens: list[int]) -> tuple[str, int]:
    """A stop string that token k (k >= 3) completes for the first time (the text of tokens j..k: random tiny
    models repeat themselves), and how many tokens transformers generates up to it (k + 1)."""
    for k in range(3, len(tokens)):
        for j in (k, k - 1, k - 2):
            piece = tokenizer.decode(tokens[j:k + 1]).strip()
            if len(piece) >= 2 and piece not in tokenizer.decode(tokens[:k]) and piece in tokenizer.decode(tokens[:k + 1]):
                return piece, k + 1
    raise AssertionError(f"no stop string candidate in {tokens}")


def _hf_with_stop_strings(hf, tokenizer, prompt: str, eos: int, stops: list[str], hf_tokenizer) -> list[int]:
    """transformers' greedy generate with `stop_strings` (which needs its own tokenizer object)."""
    import torch

    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                          pad_token_id=eos, eos_token_id=eos, stop_strings=stops, tokenizer=hf_tokenizer)
    return out[0, ids.shape[1]:].tolist()


def test_stop_string_ends_the_row_where_transformers_stop_strings_do(eos_artifact):
    """transformers' `stop_strings` stops at the token that completes the string; we stop there too, and cut it."""
    from transformers import PreTrainedTokenizerFast

    hf, artifact, tokenizer, eos = eos_artifact
    model = runtime.load(str(artifact))
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    prompt = BATCH[2]  # the row eos never ends
    free = hf_generate(hf, tokenizer, [prompt], eos=eos, max_new_tokens=NEW)[0]
    stop, count = _stop_string(tokenizer, free)
    theirs = _hf_with_stop_strings(hf, tokenizer, prompt, eos, [stop], hf_tokenizer)
    assert len(theirs) == count, (stop, theirs)  # transformers stopped at the token that completed it
    completion = model.generate([prompt], max_new_tokens=NEW, stop=stop, return_result=True).completions[0]
    full = tokenizer.decode(theirs)
    assert completion.finish_reason == "stop"
    assert completion.generated_tokens == len(theirs)
    assert completion.text == full[:full.index(stop)]
    assert completion.tokens == theirs[:len(completion.tokens)]
    assert tokenizer.decode(completion.tokens).startswith(completion.text)


def test_a_stopped_row_leaves_the_others_running(eos_artifact):
    """In a batch, the row a stop string ends early and the row eos ends both match transformers alone."""
    hf, artifact, tokenizer, eos = eos_artifact
    model = runtime.load(str(artifact))
    free = hf_generate(hf, tokenizer, [BATCH[2]], eos=eos, max_new_tokens=NEW)[0]
    stop, count = _stop_string(tokenizer, free)
    result = model.generate(BATCH, max_new_tokens=NEW, stop=stop, return_result=True)
    for prompt, completion in zip(BATCH, result.completions):
        alone = _cut_at_eos(hf_generate(hf, tokenizer, [prompt], eos=eos, max_new_tokens=NEW)[0], eos)
        text = tokenizer.decode([t for t in alone if t != eos])
        if stop in text:
            assert completion.finish_reason == "stop" and completion.text == text[:text.index(stop)]
        else:
            assert completion.tokens == alone
            assert completion.finish_reason == ("eos" if alone[-1] == eos else "length")
    assert result.completions[2].finish_reason == "stop" and result.completions[2].generated_tokens == count
