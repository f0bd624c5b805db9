"""`gptexport --kv-layout shared_buffer`: the in-place KV-cache graph (graphs/shared_kv.py) made by the exporter.

Parity ladder on tiny random models: the export validates (logits and buffer slots against torch through the
runtime's cache, greedy tokens through runtime.load); greedy tokens equal transformers' generate on a left-padded
batch; the manifest says what graph it ships with, exactly as exporter.artifact.convert_to_shared_buffer writes
it. Bad combinations are one line and exit code 2, before any work.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from gptexport import runtime
from gptexport.exporter.artifact import convert_to_shared_buffer, open_session
from gptexport.exporter.build import ExportOptions, ExportResult, export
from gptexport.exporter.presets import ExportError
from gptexport.exporter.validate import logits_check
from gptexport.graphs import shared_kv
from gptexport.graphs.precision import LOGITS_ATOL
from test_export_cli import assert_one_line_error, gptexport
from tiny_models import hf_greedy, make_checkpoint

NAMES = ["gpt2", "gptj-partial-rotary"]
PADDED = ["Hi", "Once upon a time, in a land far away, there lived a", "The quick brown fox"]
NEW = 12
DEFAULT_INPUTS = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                  "past_key_values.1.key", "past_key_values.1.value"]


@pytest.fixture(scope="module")
def shared_export(tiny_export):
    """name -> (checkpoint dir, ExportResult of --kv-layout shared_buffer, fp32, validated)."""
    made = {}

    def get(name):
        if name not in made:
            ckpt, out, manifest = tiny_export(name, kv_layout="shared_buffer")  # the session's (tests/conftest.py)
            made[name] = (ckpt, ExportResult(out, manifest))
        return made[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_and_the_manifest_describes_the_variant(shared_export, name):
    _, result = shared_export(name)
    m = result.manifest
    assert m["kv_layout"] == "shared_buffer"
    assert m["passes"]["counts"]["shared_kv"] == m["passes"]["expected"]["shared_kv"] == 2  # one per layer
    assert [i["name"] for i in m["inputs"]] == shared_kv.input_names(DEFAULT_INPUTS)
    assert {i["name"]: i["shape"] for i in m["inputs"]}["past_key_values.0.key"][2] == "max_sequence"
    # logits at the positions logits_index lists per row (one at prefill and decode; a speculative step's drafts)
    assert {o["name"]: o["shape"] for o in m["outputs"]}["logits"][1] == shared_kv.POSITIONS_DIM
    assert {i["name"]: i["shape"] for i in m["inputs"]}["logits_index"] == [shared_kv.INDEX_DIM]
    v = m["validation"]
    assert v["passed"], v
    assert v["logits_max_abs_diff"] <= LOGITS_ATOL["float32"] and v["greedy_agreement_strict"] == 1.0
    assert v["present_max_abs_diff"] <= LOGITS_ATOL["float32"], v  # the buffer's filled slots are torch's K/V
    assert all("shared_buffer" in case for case in v["logits_cases"]) and len(v["logits_cases"]) == 2
    assert runtime.load(str(result.output)).decoder.shared


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_on_a_padded_batch(shared_export, hf_model, name):
    ckpt, result = shared_export(name)
    tokenizer = Tokenizer.from_file(str(result.output / "tokenizer.json"))
    theirs = hf_greedy(hf_model(ckpt), tokenizer, PADDED, NEW)
    ours = runtime.load(str(result.output)).generate(PADDED, max_new_tokens=NEW, min_new_tokens=NEW,
                                                     return_tokens=True)[1]
    assert ours == theirs


def test_exporter_and_conversion_describe_the_variant_alike(shared_export, tiny_export, tmp_path):
    """The flag and the after-the-fact conversion share graphs.shared_kv.manifest_facts: same manifest facts."""
    import json

    _, default_dir, _ = tiny_export("gpt2")
    assert convert_to_shared_buffer(default_dir, tmp_path / "converted") == 2
    converted = json.loads((tmp_path / "converted" / "manifest.json").read_text())
    direct = shared_export("gpt2")[1].manifest
    for key in ("kv_layout", "outputs"):
        assert converted[key] == direct[key], key
    # A converted default artifact keeps its optional logits_to_keep input (graphs/last_logits.py: an initializer
    # with default 0; the shared_buffer graph already returns each row's last position only); otherwise the
    # inputs are the direct export's, in its order.
    extra = [i for i in converted["inputs"] if i["name"] == "logits_to_keep"]
    assert extra == [{"name": "logits_to_keep", "dtype": "int64", "shape": []}]
    assert [i for i in converted["inputs"] if i["name"] != "logits_to_keep"] == direct["inputs"]
    assert converted["passes"]["counts"] == direct["passes"]["counts"]


def test_logits_check_of_the_variant_sees_a_wrong_model(shared_export, hf_model, tmp_path):
    """Not vacuous: the same graph against another model's torch logits is far outside the tolerance."""
    _, result = shared_export("gpt2")
    other = tmp_path / "other"
    other.mkdir()
    make_checkpoint(other, "gpt2", seed=1)
    check = logits_check(hf_model(other), result.manifest["config"], open_session(result.output), result.manifest)
    assert check["logits_max_abs_diff"] > 10 * LOGITS_ATOL["float32"], check
    assert check["present_max_abs_diff"] > 10 * LOGITS_ATOL["float32"], check


def test_cli_fp16_summary(tiny_export, tmp_path):
    ckpt, _, _ = tiny_export("gptj-partial-rotary")
    proc = gptexport(str(ckpt), "-o", str(tmp_path / "out"), "--fp16", "--kv-layout", "shared_buffer")
    assert proc.returncode == 0, proc.stderr
    assert "kv layout shared_buffer" in proc.stdout and "shared_kv=2/2" in proc.stdout, proc.stdout
    assert "validation (full: this artifact against its torch model): passed" in proc.stdout, proc.stdout
    manifest = runtime.load(str(tmp_path / "out")).manifest
    assert manifest["kv_layout"] == "shared_buffer" and manifest["kv_dtype"] == "float16"
    from gptexport.runtime.cli import summarize
    from gptexport.runtime.manifest import read_manifest

    assert any(line.startswith("kv layout:    shared_buffer") for line in summarize(read_manifest(tmp_path / "out")))


def test_no_fuse_is_refused_in_one_line(tmp_path):
    proc = gptexport("distilgpt2", "--random-weights", "--kv-layout", "shared_buffer", "--no-fuse",
                     "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "--kv-layout shared_buffer", "--no-fuse")
    assert list(tmp_path.iterdir()) == []


def test_unknown_kv_layout_names_the_accepted_ones(tmp_path):
    proc = gptexport("distilgpt2", "--random-weights", "--kv-layout", "bogus", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "'bogus'", "concat", "shared_buffer")
    assert list(tmp_path.iterdir()) == []


def test_options_are_checked_before_any_work():
    """The API refuses the same combinations before it even resolves the model."""
    with pytest.raises(ExportError, match="concat, shared_buffer"):
        export(ExportOptions(model="not-a-model", output="/tmp/never-created", kv_layout="bogus"))
    with pytest.raises(ExportError, match="--no-fuse"):
        export(ExportOptions(model="not-a-model", output="/tmp/never-created", kv_layout="shared_buffer",
                             fuse=False))
