"""Issue 17 item 8, exporter side: the checkpoint's generation_config.json and special tokens reach the manifest
(in memory and streamed), no eos id is invented, pad comes from the config, and the runtime applies them."""

from __future__ import annotations

import json

import pytest

from tiny_models import make_checkpoint

GENERATION = {"do_sample": True, "top_k": 7, "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1,
              "max_new_tokens": 11}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 with no eos or bos, pad 0, and its own sampling settings."""
    ckpt = tmp_path_factory.mktemp("gen") / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "generation_config.json").write_text(json.dumps(GENERATION))
    return ckpt


def test_the_manifest_carries_the_checkpoints_generation_defaults(checkpoint, tmp_path):
    from gptexport import runtime
    from gptexport.exporter.build import ExportOptions, export

    manifest = export(ExportOptions(model=str(checkpoint), output=str(tmp_path / "out"), validate=False)).manifest
    assert manifest["special_tokens"] == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    generation = manifest["generation"]
    assert {k: generation[k] for k in GENERATION} == GENERATION
    assert generation["source"] == "generation_config.json" and generation["checkpoint"]["top_k"] == 7
    shipped = json.loads((tmp_path / "out" / "generation_config.json").read_text())  # what Optimum reads
    assert {k: shipped.get(k) for k in GENERATION} == GENERATION
    model = runtime.load(tmp_path / "out")
    assert (model.eos_token_id, model.pad_token_id) == (None, 0)
    tokens = model.generate("Hello", seed=0, return_tokens=True)[1]
    assert len(tokens) == 11  # the checkpoint's max_new_tokens, and no eos stops it
    assert model._params(None, 0, None, None, None, None, None, model._encode("Hello")) == \
        runtime.SamplingParams.create(11, 0, True, 0.8, 7, 0.9, 1.1)


def test_the_streamed_load_reads_generation_config_too(checkpoint):
    from gptexport.exporter.generation import generation_section, special_tokens
    from gptexport.exporter.load import load

    loaded = load(str(checkpoint), stream=True)
    assert loaded.weights is not None  # the streamed path, with empty parameters
    section = generation_section(loaded.model.generation_config)
    assert {k: section[k] for k in GENERATION} == GENERATION
    assert special_tokens(loaded.model.config, loaded.model.generation_config)["pad_token_id"] == 0


def test_defaults_when_the_checkpoint_sets_nothing():
    from transformers import GenerationConfig, GPT2Config

    from gptexport.exporter.generation import generation_section, special_tokens

    config = GPT2Config(bos_token_id=1, eos_token_id=2)
    derived = GenerationConfig.from_model_config(config)
    section = generation_section(derived)
    assert (section["top_k"], section["do_sample"], section["max_new_tokens"], section["source"]) == \
        (50, False, 32, "config.json")
    assert special_tokens(config, derived) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    several = GenerationConfig(eos_token_id=[5, 6], max_length=40)
    assert special_tokens(GPT2Config(eos_token_id=None), several)["eos_token_ids"] == [5, 6]
    assert (generation_section(several)["max_new_tokens"], generation_section(several)["max_length"]) == (None, 40)
