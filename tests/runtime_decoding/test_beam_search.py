"""Beam search (runtime/beam.py) against transformers' `generate(num_beams=...)`: exact tokens.

Random tiny models rarely emit the real eos, so the finished-hypothesis logic is exercised with a custom eos: a
token the greedy path produces early, passed to both sides.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from gptexport import runtime
from gptexport.runtime.errors import GenerationError
from tiny_models import PAD, hf_generate

SINGLE = ["Hello world"]
PADDED = ["Hi", "Once upon a time, in a land far away"]
NEW = 10


@pytest.fixture(scope="module")
def pair(tiny_export, hf_model):
    """name -> (runtime Model, transformers model, tokenizer), loaded once."""
    made = {}

    def get(name):
        if name not in made:
            ckpt, artifact, _ = tiny_export(name)
            made[name] = (runtime.load(artifact), hf_model(ckpt),
                          Tokenizer.from_file(str(artifact / "tokenizer.json")))
        return made[name]

    return get


def hf_beam(model, tokenizer, prompts, eos=PAD, **kwargs) -> list[list[int]]:
    """transformers' beam search on a left-padded batch; new ids per row (shorter rows padded with PAD)."""
    return hf_generate(model, tokenizer, prompts, eos=eos, **kwargs)


def check(model, hf, tokenizer, prompts, eos=None, **kwargs):
    theirs = hf_beam(hf, tokenizer, prompts, eos=PAD if eos is None else eos, **kwargs)
    _, ours = model.generate(prompts, eos_token_id=eos, return_tokens=True, **kwargs)
    width = max(map(len, theirs))
    padded = [t + [PAD] * (width - len(t)) for t in ours]
    assert padded == theirs, f"{prompts} {kwargs} eos={eos}: ours {ours} != transformers {theirs}"
    return ours


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
@pytest.mark.parametrize("prompts", [SINGLE, PADDED], ids=["single", "padded"])
def test_beam_search_equals_transformers(pair, name, prompts):
    model, hf, tokenizer = pair(name)
    for num_beams, length_penalty in ((2, 1.0), (4, 1.0), (4, 0.5), (2, 2.0)):
        check(model, hf, tokenizer, prompts, num_beams=num_beams, length_penalty=length_penalty,
              max_new_tokens=NEW)
    check(model, hf, tokenizer, prompts, num_beams=2, max_new_tokens=NEW, min_new_tokens=4)


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
def test_finished_hypotheses_with_an_early_eos(pair, name):
    """eos = a token the greedy path emits early: hypotheses finish, the length penalty and early stopping matter."""
    model, hf, tokenizer = pair(name)
    finished = 0
    for prompts in (SINGLE, PADDED):
        greedy = model.generate(prompts, max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)[1]
        eos = greedy[-1][1]
        for num_beams, length_penalty, early_stopping in ((2, 1.0, False), (4, 1.0, True), (4, 0.5, "never"),
                                                          (2, 2.0, "never"), (4, 2.0, False), (2, 0.5, True)):
            ours = check(model, hf, tokenizer, prompts, eos=eos, num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=NEW)
            finished += sum(t[-1] == eos for t in ours)
        check(model, hf, tokenizer, prompts, eos=eos, num_beams=3, max_new_tokens=NEW, min_new_tokens=3)
    assert finished > 0, "no hypothesis ended at eos: the finished-hypothesis path was not exercised"


def test_repetition_penalty_in_a_padded_batch(pair):
    model, hf, tokenizer = pair("gpt2")
    for penalty in (1.5, 0.7):
        check(model, hf, tokenizer, PADDED, num_beams=3, max_new_tokens=NEW, repetition_penalty=penalty)


def test_one_beam_is_greedy(pair):
    model, _, _ = pair("gpt2")
    assert model.generate(PADDED, num_beams=1, max_new_tokens=NEW) == model.generate(PADDED, max_new_tokens=NEW)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2.0), "num_beams must be an integer >= 1"),
    (dict(num_beams=True), "num_beams must be an integer >= 1"),
    (dict(num_beams="4"), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(num_beams=2, length_penalty="1"), "length_penalty must be a finite number"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(num_beams=2, do_sample=True), "beam sampling is not supported"),
    (dict(num_beams=2, stop="x"), "stop strings are not supported with beam search"),
    (dict(num_beams=2, return_logprobs=True), "return_logprobs is not supported with beam search"),
    (dict(eos_token_id=-1), "eos_token_id must be None or an integer"),
    (dict(eos_token_id=10 ** 9), "eos_token_id must be None or an integer"),
])
def test_invalid_beam_arguments(pair, kwargs, message):
    model, _, _ = pair("gpt2")
    with pytest.raises(GenerationError, match=message) as info:
        model.generate("Hello", max_new_tokens=4, **kwargs)
    assert "\n" not in str(info.value)


def test_stream_refuses_beam_search(pair):
    model, _, _ = pair("gpt2")
    with pytest.raises(GenerationError, match="stream does not support beam search"):
        model.stream("Hello", max_new_tokens=4, num_beams=2)


def test_cli_num_beams(tiny_export, pair, capsys):
    from gptexport.runtime.cli import main

    _, artifact, _ = tiny_export("gpt2")
    model, _, _ = pair("gpt2")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(artifact), "Hello world", "--max-new-tokens", "6", "--num-beams", "3",
              "--length-penalty", "0.5"])
    assert exit_info.value.code == 0
    expected = model.generate("Hello world", max_new_tokens=6, num_beams=3, length_penalty=0.5)
    assert capsys.readouterr().out == expected + "\n"


def test_shared_buffer_layout_reorders_its_cache(tiny_export, pair, tmp_path):
    """The in-place cache (kv_layout shared_buffer) reorders its rows per beam: same tokens as the default graph."""
    from gptexport.exporter.artifact import convert_to_shared_buffer

    _, artifact, _ = tiny_export("gpt2")
    convert_to_shared_buffer(artifact, tmp_path / "shared")
    shared = runtime.load(tmp_path / "shared")
    assert shared.decoder.shared
    model, _, _ = pair("gpt2")
    for num_beams in (2, 4):
        expected = model.generate(PADDED, num_beams=num_beams, max_new_tokens=NEW, return_tokens=True)[1]
        assert shared.generate(PADDED, num_beams=num_beams, max_new_tokens=NEW, return_tokens=True)[1] == expected
