"""The in-place KV cache (graphs/shared_kv.py + runtime/kv.py) against the default graph and transformers.

Parity ladder: logits of every step equal the default graph's (left-padded batch, prefill and decode); greedy
tokens equal transformers' generate on a left-padded batch; the cache buffers are never reallocated.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from tokenizers import Tokenizer

from gptexport import runtime
from gptexport.graphs.fusion._match import Reject
from gptexport.exporter.artifact import convert_to_shared_buffer
from gptexport.graphs.shared_kv import to_shared_kv
from tiny_models import hf_greedy

FP32_LOGITS_ATOL = 1e-4  # same kernels' math in another order (GroupQueryAttention vs MultiHeadAttention)
NAMES = ["gpt2", "gptj-partial-rotary"]
PADDED = ["Hi", "Once upon a time, in a land far away, there lived a", "The quick brown fox"]
NEW = 16


@pytest.fixture(scope="module")
def shared(tiny_export, tmp_path_factory):
    """name -> (checkpoint, default artifact, shared_buffer artifact)."""
    made = {}

    def get(name):
        if name not in made:
            ckpt, artifact, _ = tiny_export(name)
            target = tmp_path_factory.mktemp(f"{name}-shared") / "artifact"
            assert convert_to_shared_buffer(artifact, target) == 2  # one attention per layer
            made[name] = (ckpt, artifact, target)
        return made[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_step_logits_equal_the_default_graph(shared, name):
    _, default_dir, shared_dir = shared(name)
    default, inplace = runtime.load(default_dir).decoder, runtime.load(shared_dir).decoder
    ids = np.array([[50256, 50256, 15496, 995], [464, 2068, 7586, 21831]])  # (B, L), row 0 left-padded
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    a_cache, b_cache = default.new_cache(2), inplace.new_cache(2, capacity=8)
    buffers = {k: v.data_ptr() for k, v in b_cache.buffers.items()}
    for step in range(4):
        a = default.step(ids, mask, positions, a_cache)[:, -1]
        b = inplace.step(ids, mask, positions, b_cache)[:, -1]
        worst = np.abs(a - b).max()
        assert worst <= FP32_LOGITS_ATOL, f"step {step}: logits worst |diff| {worst} at {np.unravel_index(np.abs(a - b).argmax(), a.shape)}"
        ids = a.argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    assert b_cache.lengths.tolist() == [5, 7]  # real tokens per row: right-aligned from slot 0
    assert {k: v.data_ptr() for k, v in b_cache.buffers.items()} == buffers, "cache buffers were reallocated"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_on_a_padded_batch(shared, hf_model, name):
    ckpt, _, shared_dir = shared(name)
    model = runtime.load(shared_dir)
    tokenizer = Tokenizer.from_file(str(shared_dir / "tokenizer.json"))
    theirs = hf_greedy(hf_model(ckpt), tokenizer, PADDED, NEW)
    assert model.generate(PADDED, max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)[1] == theirs
    single = hf_greedy(hf_model(ckpt), tokenizer, PADDED[1:2], NEW)
    assert model.generate(PADDED[1], max_new_tokens=NEW, min_new_tokens=NEW, return_tokens=True)[1] == single[0]


def test_rows_finishing_at_eos_match_the_default_runtime(shared):
    _, default_dir, shared_dir = shared("gpt2")
    a, b = runtime.load(default_dir), runtime.load(shared_dir)
    kwargs = dict(max_new_tokens=24, do_sample=True, seed=3, temperature=1.5, return_tokens=True)
    assert a.generate(PADDED, **kwargs) == b.generate(PADDED, **kwargs)


def test_manifest_flags_the_variant_and_lists_its_inputs(shared):
    _, _, shared_dir = shared("gpt2")
    manifest = runtime.load(shared_dir).manifest
    assert manifest["kv_layout"] == "shared_buffer"
    names = [i["name"] for i in manifest["inputs"]]
    assert "attention_mask" not in names
    assert names[-3:] == ["seqlens_k", "total_sequence_length", "logits_index"]


def test_unfused_graph_is_rejected_with_a_reason():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.Node("", "Identity", [x], name="id")
    node.outputs[0].name = "logits"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 17})
    with pytest.raises(Reject, match="fuse the graph first"):
        to_shared_kv(ir.Model(graph, ir_version=10))


def test_decode_steps_reuse_one_binding_and_equal_a_fresh_binding_per_step(shared):
    """CPU decode steps run through one DecodeBinding per request (inputs written in place, logits bound by
    pointer); their logits equal those of a fresh IO binding per step, and a full cache is refused."""
    from gptexport.runtime.kv import shared_step

    _, _, shared_dir = shared("gpt2")
    decoder = runtime.load(shared_dir).decoder
    assert decoder.logits_meta is not None
    ids = np.array([[50256, 15496, 995], [464, 2068, 7586]])  # (B, L), row 0 left-padded
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    bound, fresh = decoder.new_cache(2, capacity=6), decoder.new_cache(2, capacity=6)
    a = decoder.step(ids, mask, positions, bound)
    b = shared_step(decoder.session, fresh, ids, mask, positions, decoder.pad_token_id, None)
    binding = None
    for step in range(3):
        assert np.array_equal(a, b), f"step {step}: bound logits differ from a fresh binding's"
        ids = b[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        a = decoder.step(ids, mask, positions, bound)
        b = shared_step(decoder.session, fresh, ids, mask, positions, decoder.pad_token_id, None)
        assert binding is None or bound.decode_binding is binding, "a decode step made a new binding"
        binding = bound.decode_binding
        assert a is binding.logits and fresh.decode_binding is None
    assert np.array_equal(a, b), "last step: bound logits differ from a fresh binding's"
    assert bound.lengths.tolist() == fresh.lengths.tolist() == [5, 6]
    with pytest.raises(ValueError, match="full"):
        decoder.step(ids, mask, positions + 1, bound)  # row 1 already holds 6 of 6 slots
