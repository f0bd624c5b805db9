"""Parity of exported artifacts with transformers on tiny random models, and the exporter's contract.

Order of trust: logits close, then greedy tokens equal to transformers' generate, then cache equals no cache.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from gptexport import runtime
from gptexport.exporter.artifact import ECOSYSTEM_FILES
from gptexport.exporter.presets import ARCHITECTURES
from gptexport.exporter.trace import input_names

from tiny_models import TINY_CONFIGS, hf_greedy

# fp32 graph against fp32 torch: differences come only from kernel summation order.
FP32_LOGITS_ATOL = 1e-4
NAMES = list(TINY_CONFIGS)
PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog"]
PADDED = ["Hi", "Once upon a time, in a land far away, there lived a"]
NEW = 16


def test_every_architecture_has_a_parity_case():
    tested = {cls for cls, _ in TINY_CONFIGS.values()}
    assert set(ARCHITECTURES) <= tested, f"architectures without a tiny parity case: {set(ARCHITECTURES) - tested}"


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_against_torch(tiny_export, name):
    _, artifact, manifest = tiny_export(name)
    v = manifest["validation"]
    assert v["passed"], v
    assert v["logits_max_abs_diff"] <= FP32_LOGITS_ATOL, f"logits: worst |diff| {v['logits_max_abs_diff']}"
    assert v["greedy_agreement_strict"] == 1.0
    assert any(case["batch"] > 1 for case in v["greedy_cases"]), "validation must include a padded batch"
    assert sorted(manifest["files"]) == sorted(["model.onnx", "tokenizer.json", *ECOSYSTEM_FILES])
    on_disk = json.loads((artifact / "manifest.json").read_text())
    assert on_disk == manifest


@pytest.mark.parametrize("name", NAMES)
def test_manifest_describes_the_graph(tiny_export, name):
    ckpt, artifact, manifest = tiny_export(name)
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    layers = manifest["config"]["num_layers"]
    assert [i.name for i in session.get_inputs()] == input_names(layers)
    # logits_to_keep (graphs/last_logits.py) is an optional input backed by an initializer: onnxruntime lists it
    # among the overridable initializers, the manifest among the inputs, after the required ones.
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    assert [i["name"] for i in manifest["inputs"]] == input_names(layers) + ["logits_to_keep"]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    config = json.loads((ckpt / "config.json").read_text())
    assert manifest["config"]["num_heads"] == config["n_head"]
    assert manifest["config"]["head_size"] == config["n_embd"] // config["n_head"]
    assert manifest["config"]["rotary_dim"] == config.get("rotary_dim")
    assert manifest["format_version"] == 1 and manifest["dtype"] == "float32"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(tiny_export, hf_model, name):
    ckpt, artifact, _ = tiny_export(name)
    model = runtime.load(str(artifact))
    hf = hf_model(ckpt)
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    for prompt in PROMPTS:
        theirs = hf_greedy(hf, tokenizer, [prompt], NEW)
        ours = model.generate([prompt], max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)[1]
        assert ours == theirs, f"{name}: greedy tokens differ for {prompt!r}"
        assert model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW) == tokenizer.decode(theirs[0])
    theirs = hf_greedy(hf, tokenizer, PADDED, NEW)
    assert model.generate(PADDED, max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)[1] == theirs, "padded batch"
    texts = model.generate(PADDED, max_new_tokens=NEW, min_new_tokens=NEW)
    assert texts == [tokenizer.decode(t) for t in theirs]


def _run(session, layers, heads, head_size, ids, mask, positions, pasts):
    feed = dict(zip(input_names(layers), [ids, mask, positions, *pasts]))
    out = session.run(None, feed)
    return out[0], out[1:]


@pytest.mark.parametrize("name", NAMES)
def test_cache_equals_no_cache(tiny_export, name):
    """Logits of a prompt decoded token by token with the KV cache equal one pass over the whole prompt."""
    _, artifact, manifest = tiny_export(name)
    c = manifest["config"]
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c["vocab_size"], size=(2, 10))
    mask = np.ones((2, 10), dtype=np.int64)
    mask[0, :3] = 0  # row 0 left-padded by 3
    positions = np.maximum(mask.cumsum(-1) - 1, 0) * mask
    empty = [np.zeros((2, c["num_heads"], 0, c["head_size"]), np.float32)] * (2 * c["num_layers"])
    full, _ = _run(session, c["num_layers"], c["num_heads"], c["head_size"], ids, mask, positions, empty)
    step, pasts = _run(session, c["num_layers"], c["num_heads"], c["head_size"], ids[:, :6], mask[:, :6],
                       positions[:, :6], empty)
    pieces = [step]
    for t in range(6, 10):
        step, pasts = _run(session, c["num_layers"], c["num_heads"], c["head_size"], ids[:, t:t + 1],
                           mask[:, :t + 1], positions[:, t:t + 1], pasts)
        pieces.append(step)
    incremental = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)  # padded positions' logits are meaningless
    worst = float(np.abs(incremental - full)[real].max())
    assert worst <= FP32_LOGITS_ATOL, f"cache vs no cache: worst |diff| {worst}"


def test_seeded_sampling_is_reproducible(tiny_export):
    _, artifact, _ = tiny_export("gpt2")
    model = runtime.load(str(artifact))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)
    a = model.generate(["Hello world"], seed=7, **kwargs, return_tokens=True)[1]
    b = model.generate(["Hello world"], seed=7, **kwargs, return_tokens=True)[1]
    c = model.generate(["Hello world"], seed=8, **kwargs, return_tokens=True)[1]
    assert a == b
    assert a != c, "different seeds gave the same 12 sampled tokens"


TORCH_FREE_CHILD = """
import json, sys
BLOCKED = {"torch", "transformers", "onnx", "onnx_ir", "onnxscript", "gptexport.exporter", "gptexport.graphs"}

def blocked(name):
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ImportError(name + " is blocked")

sys.meta_path.insert(0, Blocker())
from gptexport import runtime
_, tokens = runtime.load(sys.argv[1]).generate(json.loads(sys.argv[2]), max_new_tokens=8, min_new_tokens=8,
                                                 return_tokens=True)
assert not [m for m in sys.modules if blocked(m)]
print(json.dumps(tokens))
"""


@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary"])
def test_real_artifact_generates_without_torch(tiny_export, hf_model, name):
    """A real export, run in a process where torch, transformers and onnx cannot be imported, gives HF's tokens."""
    import subprocess
    import sys

    ckpt, artifact, _ = tiny_export(name)
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_CHILD, str(artifact), json.dumps(PADDED)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    assert json.loads(proc.stdout) == hf_greedy(hf_model(ckpt), tokenizer, PADDED, 8)
