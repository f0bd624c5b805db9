"""`gptexport adopt`: an Optimum-shaped export directory becomes an artifact of ours.

The directory is built from our own unfused export (standard ONNX ops, Optimum's names) with the manifest taken
away: what Optimum writes (model.onnx, config.json, generation_config.json, tokenizer files). Real Optimum exports
of tiny checkpoints (tests/data/optimum, made by its make_fixtures.py) are adopted with our passes below (slow
tier; tests/graphs/test_canonical.py fuses the same graphs in seconds), and bench/optimum_interop.py adopts fresh
ones in Optimum's own venv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gptexport import runtime
from gptexport.exporter.adopt import AdoptOptions, adopt
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.presets import ExportError
from gptexport.runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
OPTIMUM_FILES = ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")
PROMPTS = ["Hello world", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def optimum_dir(tiny_export, tmp_path_factory):
    """(checkpoint, an Optimum-shaped dir from our unfused export, our fused artifact of the same checkpoint)."""
    ckpt, fused, _ = tiny_export("gpt2")
    root = tmp_path_factory.mktemp("adopt")
    _, plain, _ = tiny_export("gpt2", fuse=False)  # the session's, also in tests/test_export_precision.py's matrix
    source = root / "optimum"
    source.mkdir()
    for name in OPTIMUM_FILES:
        shutil.copy2(plain / name, source / name)
    return ckpt, source, fused


def _greedy(directory):
    return runtime.load(directory).generate(PROMPTS, max_new_tokens=8, min_new_tokens=8, return_tokens=True)[1]


def test_adopted_export_is_an_artifact_that_generates_our_tokens(optimum_dir, tmp_path):
    _, source, fused = optimum_dir
    result = adopt(AdoptOptions(source=str(source), output=str(tmp_path / "adopted")))
    manifest = read_manifest(tmp_path / "adopted", verify="full")  # every file listed with its checksum
    assert set(manifest["files"]) == set(OPTIMUM_FILES)
    assert manifest["model"]["adopted_from"] == "optimum" and manifest["dtype"] == "float32"
    v = result.manifest["validation"]
    assert v["passed"] and v["cache_logits_max_abs_diff"] <= v["logits_tolerance"], v
    assert v["greedy_agreement_strict"] == 1.0 and any(c["batch"] > 1 for c in v["greedy_cases"])
    assert _greedy(tmp_path / "adopted") == _greedy(fused)
    assert [p.name for p in tmp_path.iterdir()] == ["adopted"]  # no staging left


def test_adopt_with_passes_and_the_checkpoint(optimum_dir, tmp_path):
    """Our fusion on the adopted graph, the in-place KV layout, and torch as the reference (--checkpoint)."""
    ckpt, source, fused = optimum_dir
    result = adopt(AdoptOptions(source=str(source), output=str(tmp_path / "shared"), fuse=True,
                                kv_layout="shared_buffer", checkpoint=str(ckpt)))
    m = result.manifest
    assert m["kv_layout"] == "shared_buffer" and m["passes"]["counts"]["attention"] == 2
    assert m["passes"]["counts"]["shared_kv"] == 2 and not m["passes"]["shortfalls"]
    assert m["validation"]["passed"] and m["validation"]["torch"]["passed"], m["validation"]
    assert "config.json" not in m["files"]  # not Optimum-loadable: nothing says it is
    assert _greedy(tmp_path / "shared") == _greedy(fused)


def test_a_wrong_checkpoint_fails_validation_and_writes_nothing(optimum_dir, tmp_path):
    from tiny_models import make_checkpoint

    _, source, _ = optimum_dir
    other = tmp_path / "other"
    other.mkdir()
    make_checkpoint(other, "gpt2", seed=1)
    with pytest.raises(ExportError, match="validation failed: against torch: .*logits max abs diff"):
        adopt(AdoptOptions(source=str(source), output=str(tmp_path / "out"), checkpoint=str(other)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def _gptexport(*args):
    return subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_every_missing_piece_is_listed_at_once(optimum_dir, tiny_export, tmp_path):
    """No config.json, no tokenizer, and a graph of other inputs (the in-place one): one line each, exit 2."""
    from gptexport.exporter.artifact import convert_to_shared_buffer

    _, _, fused = optimum_dir
    convert_to_shared_buffer(fused, tmp_path / "shared")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy2(tmp_path / "shared" / "model.onnx", broken / "model.onnx")
    proc = _gptexport("adopt", broken, "-o", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for line in ("no config.json", "no tokenizer: neither tokenizer.json nor vocab.json + merges.txt"):
        assert f"  - {line}" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()

    shutil.copy2(fused / "config.json", broken / "config.json")
    shutil.copy2(fused / "tokenizer.json", broken / "tokenizer.json")
    proc = _gptexport("adopt", broken, "-o", tmp_path / "out")
    assert proc.returncode == 2
    for line in ("input 'attention_mask' is missing", "input 'seqlens_k' is not part of the contract",
                 "input 'logits_index' is not part of the contract"):
        assert line in proc.stderr, proc.stderr


def test_graph_problems_name_the_wrong_value(optimum_dir, tmp_path):
    _, source, _ = optimum_dir
    from gptexport.exporter.adopt import graph_problems

    graph = onnx.load(str(source / "model.onnx"), load_external_data=False).graph
    facts = {"num_layers": 2, "num_heads": 4, "head_size": 16, "vocab_size": 50257}
    assert graph_problems(graph, facts) == []
    next(v for v in graph.input if v.name == "past_key_values.1.value").name = "past_key_values.1.velue"
    problems = graph_problems(graph, {**facts, "num_layers": 3})
    assert "input 'past_key_values.1.value' is missing" in problems
    assert "input 'past_key_values.2.key' is missing" in problems and "output 'present.2.key' is missing" in problems
    assert any("'past_key_values.1.velue' is not part of the contract" in p for p in problems)


def test_cli_summary_and_target_rules(optimum_dir, tmp_path):
    _, source, _ = optimum_dir
    proc = _gptexport("adopt", source, "-o", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert "adopted from" in proc.stdout and "cache against no cache" in proc.stdout, proc.stdout
    again = _gptexport("adopt", source, "-o", tmp_path / "a")
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    bad = _gptexport("adopt", source, "-o", tmp_path / "b", "--kv-layout", "shared_buffer")
    assert bad.returncode == 2 and "add --fuse" in bad.stderr and "add --checkpoint DIR" in bad.stderr
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["model"]["adopted_from"] == "optimum"


# --- a real Optimum export (tests/data/optimum: what optimum-cli wrote for tiny checkpoints) --------------------
OPTIMUM_DATA = ROOT / "tests" / "data" / "optimum"


@pytest.mark.parametrize("fixture,architecture", [("gpt2", "gpt2"), ("gptj-partial-rotary", "gptj")])
def test_real_optimum_export_fused_and_fp16(fixture, architecture, tmp_path):
    """--fuse --fp16 on Optimum's graph: the canonical pass's and the rules' new constants convert with the rest
    (a float32 mask minimum left beside a float16 zero would be a graph onnxruntime refuses)."""
    from gptexport.graphs.pipeline import expected_counts

    result = adopt(AdoptOptions(source=str(OPTIMUM_DATA / fixture / "optimum"), output=str(tmp_path / "fp16"),
                                fuse=True, strict=True, dtype="float16"))
    m = result.manifest
    counts = {k: v for k, v in m["passes"]["counts"].items() if k != "fp16_initializers"}
    assert counts == expected_counts(architecture, m["config"]) and m["dtype"] == "float16"
    assert m["validation"]["passed"], m["validation"]["failed_checks"]


@pytest.mark.slow  # a full torch validation and one export of ours per model: minutes on the shared CI box
@pytest.mark.parametrize("fixture,architecture", [("gpt2", "gpt2"), ("gptj-partial-rotary", "gptj")])
def test_real_optimum_export_adopted_fused_in_place_gives_our_own_exports_tokens(fixture, architecture, tmp_path):
    """`adopt --fuse --kv-layout shared_buffer --checkpoint --strict` on Optimum's own graph: every fusion count
    reached, validated against torch, and the greedy tokens of our own export of the same checkpoint."""
    from gptexport.graphs.pipeline import expected_counts

    ckpt, source = OPTIMUM_DATA / fixture / "checkpoint", OPTIMUM_DATA / fixture / "optimum"
    result = adopt(AdoptOptions(source=str(source), output=str(tmp_path / "adopted"), fuse=True, strict=True,
                                kv_layout="shared_buffer", checkpoint=str(ckpt)))
    m = result.manifest
    counts = {k: v for k, v in m["passes"]["counts"].items() if k != "shared_kv"}
    assert counts == expected_counts(architecture, m["config"]) and not m["passes"]["shortfalls"]
    assert m["passes"]["counts"]["shared_kv"] == 2 and m["passes"]["canonical"]["shaped_values"] > 0
    assert m["validation"]["passed"] and m["validation"]["torch"]["passed"], m["validation"]["failed_checks"]
    ours = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "ours"), kv_layout="shared_buffer",
                                validate=False)).output
    assert _greedy(tmp_path / "adopted") == _greedy(ours)
    assert [p.name for p in (tmp_path / "adopted").iterdir() if p.name.startswith(".")] == []
