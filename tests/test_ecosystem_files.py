"""The default artifact ships what transformers and Optimum read beside the graph (docs/ARTIFACT.md).

config.json and generation_config.json (ORTModelForCausalLM.from_pretrained reads them), tokenizer_config.json and
special_tokens_map.json (AutoTokenizer), each listed in the manifest with its checksum. The in-place shared_buffer
artifact is not loadable by Optimum and ships no config.json. Loading in Optimum itself is checked by
bench/optimum_interop.py (its own venv: optimum-onnx pins transformers below 4.58).
"""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer

from gptexport.exporter.artifact import ECOSYSTEM_FILES, convert_to_shared_buffer
from gptexport.runtime.manifest import file_entry, read_manifest

NAMES = ["gpt2", "gptj-partial-rotary"]


@pytest.mark.parametrize("name", NAMES)
def test_files_are_listed_with_their_checksums(tiny_export, name):
    _, artifact, manifest = tiny_export(name)
    for file in ECOSYSTEM_FILES:
        assert manifest["files"][file] == file_entry(artifact / file), file
    read_manifest(artifact, verify="full")  # and a changed one would be refused like any listed file


@pytest.mark.parametrize("name", NAMES)
def test_transformers_reads_the_config_and_tokenizer(tiny_export, name):
    ckpt, artifact, manifest = tiny_export(name)
    config, theirs = transformers.AutoConfig.from_pretrained(artifact), transformers.AutoConfig.from_pretrained(ckpt)
    assert config.model_type == theirs.model_type and config.use_cache
    facts = manifest["config"]
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_positions) == (
        facts["num_layers"], facts["num_heads"], facts["hidden_size"], facts["vocab_size"], facts["max_positions"])
    assert config.architectures == [type(transformers.AutoModelForCausalLM.from_config(theirs)).__name__]
    generation = transformers.GenerationConfig.from_pretrained(artifact)
    assert generation.eos_token_id == manifest["special_tokens"]["eos_token_id"]
    fast = transformers.AutoTokenizer.from_pretrained(artifact)
    ours = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    text = "Hello world, the quick brown fox <|endoftext|> again"
    assert fast(text)["input_ids"] == ours.encode(text).ids
    assert fast.eos_token_id == manifest["special_tokens"]["eos_token_id"]


def test_shared_buffer_artifact_ships_no_model_config(tiny_export, tmp_path):
    """Optimum cannot run the in-place graph: no config.json invites it to; the tokenizer files stay."""
    _, artifact, _ = tiny_export("gpt2")
    convert_to_shared_buffer(artifact, tmp_path / "shared")
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert "config.json" not in manifest["files"] and not (tmp_path / "shared" / "config.json").exists()
    assert "generation_config.json" not in manifest["files"]
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= set(manifest["files"])
    read_manifest(tmp_path / "shared", verify="full")
