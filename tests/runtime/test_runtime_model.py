"""Generation on the fake artifact: greedy walk, batches, stop strings, streaming, errors, stats."""

import numpy as np
import pytest

import fake_artifact as fa
from gptexport import runtime
from fake_artifact import CONTINUATION
from gptexport.runtime.errors import GenerationError, ProviderError


def test_greedy_follows_the_table_and_stops_at_eos(model):
    text, tokens = model.generate("xa", max_new_tokens=20, return_tokens=True)
    assert text == CONTINUATION
    assert tokens == fa.byte_ids(CONTINUATION) + [fa.EOS]


def test_max_new_tokens_default_comes_from_the_manifest(model):
    _, tokens = model.generate("k", return_tokens=True)
    assert tokens == fa.byte_ids("lmnopqrs")  # manifest generation.max_new_tokens == 8


def test_batch_returns_a_list_and_rows_finish_independently(model):
    texts, tokens = model.generate(["a", "hello", "xyz"], max_new_tokens=6, return_tokens=True)
    assert texts[:2] == ["é你\ufffd", "pqrstu"]  # cut inside 😀: decoded lossily, as transformers does
    assert tokens[0] == fa.byte_ids("é你") + [0xF0]  # 😀's first byte: row 0 is cut by max_new_tokens
    single = [model.generate(p, max_new_tokens=6) for p in ["a", "hello", "xyz"]]
    assert texts == single  # left padding does not change any row


def test_batch_row_that_ends_early_stops_its_output(model):
    texts, tokens = model.generate(["a", "hello"], max_new_tokens=12, return_tokens=True)
    assert texts[0] == CONTINUATION and tokens[0][-1] == fa.EOS
    assert texts[1] == "pqrstuvwxyz{"


def test_stop_strings_truncate_before_the_match(model):
    assert model.generate("hello", max_new_tokens=12, stop="rs") == "pq"
    assert model.generate("hello", max_new_tokens=12, stop=["zz", "tu"]) == "pqrs"
    text, tokens = model.generate("hello", max_new_tokens=12, stop="q", return_tokens=True)
    assert text == "p" and tokens == fa.byte_ids("p")  # the stop string's tokens are not part of the text


def test_min_new_tokens_suppresses_eos(model):
    _, tokens = model.generate("xa", max_new_tokens=12, min_new_tokens=12, return_tokens=True)
    assert fa.EOS not in tokens and len(tokens) == 12


def test_seeded_sampling_reproducible(model):
    a = model.generate(["ab", "cd"], max_new_tokens=8, do_sample=True, temperature=5.0, seed=3)
    b = model.generate(["ab", "cd"], max_new_tokens=8, do_sample=True, temperature=5.0, seed=3)
    c = model.generate(["ab", "cd"], max_new_tokens=8, do_sample=True, temperature=5.0, seed=4)
    assert a == b and a != c


def _pieces(model, prompt, **kw):
    return list(model.stream(prompt, **kw))


@pytest.mark.parametrize("n", range(1, 14))
def test_stream_never_splits_a_character_and_joins_to_generate(model, n):
    pieces = _pieces(model, "xa", max_new_tokens=n)
    assert "".join(pieces) == model.generate("xa", max_new_tokens=n)
    complete = pieces if n >= len(fa.byte_ids(CONTINUATION)) else pieces[:-1]
    assert all("\ufffd" not in p for p in complete)  # only a final flush of a cut-off character may hold one


def test_stream_yields_whole_characters(model):
    assert _pieces(model, "xa", max_new_tokens=20) == ["é", "你", "😀", "!"]


def test_stream_holds_back_a_partial_stop_string(model):
    pieces = _pieces(model, "hello", max_new_tokens=12, stop="tv")  # "t" is held, then released
    assert "".join(pieces) == model.generate("hello", max_new_tokens=12, stop="tv") == "pqrstuvwxyz{"
    assert _pieces(model, "hello", max_new_tokens=12, stop="tu") == ["p", "q", "r", "s"]


def test_stream_validates_at_call_time(model):
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        model.stream("a", temperature=-1.0)
    with pytest.raises(GenerationError, match="stream takes one prompt"):
        model.stream(["a"])


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "prompt list is empty"),
    (["a", ""], r"prompt is empty \(prompt 1 of the list\)"),
    (3, "prompt must be a str or a list of str"),
])
def test_bad_prompts(model, prompt, message):
    with pytest.raises(GenerationError, match=message):
        model.generate(prompt)


def test_too_long(model):
    with pytest.raises(GenerationError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(62\) exceeds the "
                                              r"model's 64 positions"):
        model.generate("abc", max_new_tokens=62)
    assert model.generate("abc", max_new_tokens=61, stop="e") == "d"


def test_bad_stop(model):
    with pytest.raises(GenerationError, match="stop strings must be non-empty"):
        model.generate("a", stop=[""])


def test_stats(model):
    model.generate("hello", max_new_tokens=5)
    stats = model.last_stats
    assert (stats.batch, stats.prompt_tokens, stats.new_tokens) == (1, 5, 5)
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.decode_tokens_per_s > 0


def test_float16_kv_cache(tmp_path):
    fa.build(tmp_path, next_map=fa.chain("a", CONTINUATION), kv_dtype="float16")
    assert runtime.load(tmp_path).generate(["a", "bcd"], max_new_tokens=2) == ["é", "ef"]


def test_module_level_generate_caches_the_model(artifact):
    assert runtime.generate(artifact, "xa", max_new_tokens=20) == CONTINUATION
    assert runtime.generate(str(artifact), ["xa"], max_new_tokens=2) == ["é"]


def test_providers(artifact):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'; choose one of: cpu, cuda"):
        runtime.load(artifact, provider="tpu")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
            runtime.load(artifact, provider="cuda")


def test_unloadable_graph_is_one_line(artifact):
    from gptexport.runtime.errors import ArtifactError
    (artifact / "model.onnx").write_bytes(b"this is not onnx")
    runtime.write_manifest(artifact, fa.manifest_body())
    with pytest.raises(ArtifactError) as info:
        runtime.load(artifact)
    assert "onnxruntime could not load" in str(info.value) and "\n" not in str(info.value)


def test_graph_without_contract_names_refused(artifact):
    from gptexport.runtime.errors import ArtifactError
    import onnx
    graph = fa.make_graph(fa.make_table(), num_layers=1)
    onnx.save(graph, str(artifact / "model.onnx"))
    runtime.write_manifest(artifact, fa.manifest_body())  # says 2 layers
    with pytest.raises(ArtifactError, match="does not follow the artifact contract"):
        runtime.load(artifact)


def test_cache_grows_like_a_real_one(model):
    cache = model.decoder.new_cache(2)
    ids = np.array([[1, 2, 3], [fa.EOS, 4, 5]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], dtype=np.int64)
    model.decoder.step(ids, mask, np.array([[0, 1, 2], [0, 0, 1]]), cache)
    assert cache.length == 3
    model.decoder.step(ids[:, -1:], np.concatenate([mask, [[1], [1]]], 1), np.array([[3], [2]]), cache)
    assert cache.length == 4
