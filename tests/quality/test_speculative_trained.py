"""Speculative decoding on the trained gpt2-ci checkpoint (real text, the real GPT-2 tokenizer): greedy output is
plain greedy's token for token, fp32 and int8, batch 1 and a left-padded batch, prompt lookup and a draft model
(the other precision's artifact: same tokenizer, close but not equal logits, so drafts are accepted and rejected).
Random weights would loop and accept everything; a trained model's drafts are right only where the text says so.
"""

import pytest

from gptexport import runtime
from gptexport.runtime import speculative
from gptexport.exporter.artifact import convert_to_shared_buffer

NEW = 40


def _prompts(ckpt) -> list:
    """Held-out text: a code piece repeated (input-grounded), a prose piece (open-ended), of different lengths."""
    held = (ckpt / "heldout.txt").read_text()
    at = max(held.find("def "), 0)
    code = held[at:at + 160]
    return [code + "\n# again:\n" + code[:40], held[:120], held[at + 400:at + 470]]


@pytest.mark.parametrize("layout", ["concat", "shared_buffer"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_trained_greedy_is_plain_greedy(trained_export, tmp_path, monkeypatch, dtype, layout):
    """shared_buffer: a batch checks its drafts row by row (GroupQueryAttention takes several new tokens after a
    past at batch 1 only), on each row of the in-place cache; here on every row every round (whether that pays
    is timed: not what this test is about)."""
    ckpt, artifact, _ = trained_export("gpt2-ci", dtype)
    other = trained_export("gpt2-ci", "int8" if dtype == "float32" else "float32")[1]
    if layout == "shared_buffer":
        convert_to_shared_buffer(artifact, tmp_path / "shared")
        artifact = tmp_path / "shared"
        monkeypatch.setattr(speculative._RowSchedule, "_pays", lambda self, on: bool(on))
    model = runtime.load(artifact)
    prompts = _prompts(ckpt)
    plain = model.generate(prompts, max_new_tokens=NEW, return_result=True)
    for source in ("prompt_lookup", str(other)):
        for batch in (prompts[:1], prompts):
            fast = model.generate(batch, max_new_tokens=NEW, return_result=True, speculative=source)
            for i, (a, b) in enumerate(zip(plain.completions, fast.completions)):
                assert b.tokens == a.tokens, f"{dtype} {source} row {i} of {len(batch)}"
            assert 0 < fast.stats.accepted <= fast.stats.drafted, (source, fast.stats)
    # the repeated code is predicted by its first copy: most drafts are accepted
    lookup = model.generate(prompts[0], max_new_tokens=NEW, return_result=True, speculative="prompt_lookup").stats
    assert lookup.acceptance_rate > 0.5, lookup
