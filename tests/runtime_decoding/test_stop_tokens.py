"""Issue 17 item 7 on a real BPE vocabulary: a stop string that starts inside a token keeps that token (it holds
the end of the returned text) and drops every later one; the generated count still includes them."""

from __future__ import annotations

from gptexport import runtime

NEW = 24


def _straddling_stop(model, tokens):
    """(i, text before the stop, stop) where the stop string starts one character into token i and ends with
    token i + 1."""
    decode = model.tokenizer.decode
    whole = decode(tokens)
    for i in range(len(tokens) - 1):
        before, through, after = decode(tokens[:i]), decode(tokens[:i + 1]), decode(tokens[:i + 2])
        if not (after.startswith(through) and through.startswith(before)) or len(through) - len(before) < 2 \
                or len(after) == len(through) or "\ufffd" in after:
            continue
        stop = after[len(before) + 1:]
        if whole.find(stop) == len(before) + 1:
            return i, through[:len(before) + 1], stop
    raise AssertionError(f"no token to split in {whole!r}")


def test_stop_inside_a_token_keeps_it_and_drops_the_rest(tiny_export):
    _, artifact, _ = tiny_export("gpt2")
    model = runtime.load(artifact)
    _, tokens = model.generate("Once upon a time", max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)
    i, text, stop = _straddling_stop(model, tokens)
    result = model.generate("Once upon a time", max_new_tokens=NEW, min_new_tokens=NEW, stop=stop,
                            return_result=True)
    got = result.completions[0]
    assert got.text == text and got.finish_reason == "stop"
    assert got.tokens == tokens[:i + 1] and len(got.logprobs) == i + 1
    assert model.tokenizer.decode(got.tokens).startswith(got.text)
    assert got.generated_tokens == i + 2  # token i + 1 completed the stop string: generated, not returned
