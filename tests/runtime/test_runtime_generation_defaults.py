"""Issue 17 item 8, runtime side: the manifest's generation defaults are applied (explicit arguments win), and a
setting nobody gave is transformers' default (top_k 50 when sampling)."""

import numpy as np
import pytest

import fake_artifact as fa
from fake_artifact import CONTINUATION
from gptexport import runtime
from gptexport.runtime.errors import GenerationError


def _top(model, prompt: str, k: int) -> set:
    """The k best next tokens after `prompt` (the fake model's logits depend on the last token only)."""
    ids = np.array([fa.byte_ids(prompt)], dtype=np.int64)
    logits = model.decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None, :], model.decoder.new_cache(1))
    return set(np.argsort(-logits[0, -1])[:k].tolist())


def _first_tokens(model, seeds=range(40), **kwargs) -> set:
    return {model.generate("h", max_new_tokens=1, seed=s, return_tokens=True, **kwargs)[1][0] for s in seeds}


def test_sampling_without_top_k_keeps_transformers_50(model):
    # temperature 1000 makes the 257 tokens nearly equally likely: without a top-k most draws fall outside the 50 best
    drawn = _first_tokens(model, do_sample=True, temperature=1000.0)
    assert drawn <= _top(model, "h", 50) and len(drawn) > 10
    assert not _first_tokens(model, do_sample=True, temperature=1000.0, top_k=0) <= _top(model, "h", 50)


def _build(tmp_path, generation: dict, special: dict | None = None):
    body = fa.manifest_body()
    body["generation"] = {"max_new_tokens": 32, "max_length": None, "do_sample": False, "temperature": 1.0,
                          "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "source": "generation_config.json",
                          "checkpoint": {}, **generation}
    body["special_tokens"].update(special or {})
    import onnx
    onnx.save(fa.make_graph(fa.make_table(fa.chain("a", CONTINUATION))), str(tmp_path / "model.onnx"))
    fa.make_tokenizer().save(str(tmp_path / "tokenizer.json"))
    runtime.write_manifest(tmp_path, body)
    return runtime.load(tmp_path)


def test_the_checkpoints_sampling_settings_apply_and_arguments_win(tmp_path):
    model = _build(tmp_path, {"do_sample": True, "temperature": 1000.0, "top_k": 3, "max_new_tokens": 5})
    drawn = _first_tokens(model)
    assert drawn <= _top(model, "h", 3) and len(drawn) > 1  # sampled, from the checkpoint's top 3
    assert len(model.generate("h", seed=0, return_tokens=True)[1]) == 5  # its max_new_tokens
    assert model.generate("xa", do_sample=False, max_new_tokens=20) == CONTINUATION  # explicit greedy wins
    assert len(_first_tokens(model, top_k=5)) > 3  # an explicit top_k wins
    assert model.generate("xa", temperature=0.0, max_new_tokens=20) == CONTINUATION  # so does a temperature


def test_max_length_counts_the_prompt(tmp_path):
    model = _build(tmp_path, {"max_new_tokens": None, "max_length": 7})
    assert len(model.generate("hello", return_tokens=True)[1]) == 2  # 5 prompt tokens + 2 = max_length
    assert len(model.generate(["hi", "hello"], return_tokens=True)[1][0]) == 2  # the longest prompt counts
    with pytest.raises(GenerationError, match="reaches the artifact's default max_length"):
        model.generate("abcdefg")
    assert len(model.generate("abcdefg", max_new_tokens=3, return_tokens=True)[1]) == 3


def test_a_model_without_eos_runs_to_the_length(tmp_path):
    model = _build(tmp_path, {}, {"eos_token_id": None, "pad_token_id": 0})
    result = model.generate("xa", max_new_tokens=14, return_result=True).completions[0]
    assert result.tokens[:11] == fa.byte_ids(CONTINUATION) + [fa.EOS]  # 256 is just a token for this model
    assert len(result.tokens) == 14 and result.finish_reason == "length"
    assert model.pad_token_id == 0
