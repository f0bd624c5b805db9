"""Every precision × fused/unfused, for GPT-2 and GPT-J, exported end to end and validated against torch fp32.

The exporter's own validation runs inside each export (logits against torch on a padded batch with a past and a
prefill without; greedy tokens against transformers' generate, single prompts and a left-padded batch); these
tests check its verdict against the named tolerances, the graph's op inventory and the manifest's bookkeeping.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import onnx
import pytest

from gptexport import runtime
from gptexport.graphs.pipeline import expected_counts
from gptexport.graphs.precision import LOGITS_ATOL, MIN_GREEDY_AGREEMENT

ARCHS = {"gpt2": "gpt2", "gptj-partial-rotary": "gptj"}
DTYPES = ["float32", "float16", "int8", "int4"]
# The op each precision must introduce (and how many per layer at least), checked on the saved graph.
PRECISION_OP = {"int8": "MatMulNBits", "int4": "MatMulNBits"}
FUSED_OPS = {"MultiHeadAttention", "SkipLayerNormalization", "FastGelu"}


@pytest.mark.parametrize("name,dtype,fuse", list(itertools.product(ARCHS, DTYPES, [True, False])))
def test_precision_and_fusion_matrix(tiny_export, name, dtype, fuse):
    # the session's exports (tests/conftest.py): float32 fused is the default export other files use too, float32
    # unfused the one tests/test_adopt.py reads
    _, out, m = tiny_export(name, dtype=dtype, fuse=fuse)
    v = m["validation"]
    assert v["passed"], v
    assert v["logits_max_abs_diff"] <= LOGITS_ATOL[dtype], (
        f"{name} {dtype} fused={fuse}: logits worst |diff| {v['logits_max_abs_diff']} > {LOGITS_ATOL[dtype]}")
    assert v["greedy_agreement"] >= MIN_GREEDY_AGREEMENT[dtype]
    assert np.isfinite(v["logits_max_abs_diff"]) and np.isfinite(v["present_max_abs_diff"])
    assert m["dtype"] == dtype
    assert m["kv_dtype"] == ("float16" if dtype == "float16" else "float32")
    assert m["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", "logits_sequence", m["outputs"][0]["shape"][2]]}

    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    layers = m["config"]["num_layers"]
    passes = m["passes"]
    if fuse:
        expected = expected_counts(ARCHS[name], m["config"])
        assert {k: passes["counts"][k] for k in expected} == expected
        assert passes["shortfalls"] == []
        assert ops["MultiHeadAttention"] == layers
        assert ops["RotaryEmbedding"] == (2 * layers if ARCHS[name] == "gptj" else 0)
    else:
        assert not FUSED_OPS & set(ops), f"unfused graph has fused ops: {FUSED_OPS & set(ops)}"
        assert passes["counts"].get("attention") is None
    if dtype in PRECISION_OP:
        # q/k/v (or c_attn), out projection, two MLP matmuls per layer, and the LM head
        assert ops[PRECISION_OP[dtype]] >= 2 * layers + 1, ops

    # The artifact runs through the runtime and yields text.
    model = runtime.load(str(out))
    assert model.generate(["Hello", "Once upon a time"], max_new_tokens=4, min_new_tokens=4)


# ---- the int8 kernels ---------------------------------------------------------------------------------------------

INT8_KERNEL_OP = {"nbits": "MatMulNBits", "token": "MatMulIntegerToFloat", "hybrid": "MatMulIntegerToFloat",
                  "dynamic": "DynamicQuantizeMatMul"}
INT8_KERNEL_RECORD = INT8_KERNEL_OP


def _logits(session, facts: dict, ids: np.ndarray) -> np.ndarray:
    """One prefill of equal-length rows (no padding) with an empty past: the logits (batch, seq, vocab)."""
    from gptexport.exporter.trace import input_names

    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    past = [np.zeros((len(ids), facts["num_heads"], 0, facts["head_size"]), np.float32)
            for _ in range(2 * facts["num_layers"])]
    return session.run(["logits"], dict(zip(input_names(facts["num_layers"]), [ids, mask, positions, *past])))[0]


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("kernel", ["token", "hybrid", "dynamic"])
def test_int8_kernel_exports_validate_and_say_which_kernel(tiny_export, name, kernel):
    _, out, m = tiny_export(name, dtype="int8", int8_kernel=kernel)
    assert m["validation"]["passed"], m["validation"]
    assert m["validation"]["logits_max_abs_diff"] <= LOGITS_ATOL["int8"]
    assert m["passes"]["quantization"]["kernel"] == INT8_KERNEL_RECORD[kernel]
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    layers = m["config"]["num_layers"]
    assert ops[INT8_KERNEL_OP[kernel]] >= 2 * layers + (kernel != "hybrid"), ops
    assert ops["MatMulNBits"] == (kernel == "hybrid")  # hybrid: the lm_head alone on MatMulNBits
    if kernel == "token":
        assert m["passes"]["quantization"]["batch_invariant"] is True


@pytest.mark.parametrize("kernel,invariant", [("nbits", True), ("token", True), ("hybrid", True),
                                              ("dynamic", False)])
def test_int8_artifact_row_alone_equals_row_in_a_batch(tiny_export, kernel, invariant):
    """A prompt's logits batched with other prompts against alone: bit-identical for the per-token kernels; the
    per-tensor dynamic kernel moves them (the negative case)."""
    import onnxruntime as ort

    _, out, m = tiny_export("gpt2", dtype="int8", int8_kernel=kernel)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    vocab = m["config"]["vocab_size"]
    ids = rng.integers(0, vocab, (3, 9)).astype(np.int64)
    ids[2] = ids[2] % 7  # a row of other tokens: other activations, other per-tensor scales
    together = _logits(session, m["config"], ids)
    alone = np.stack([_logits(session, m["config"], ids[i:i + 1])[0] for i in range(3)])
    if invariant:
        np.testing.assert_array_equal(alone, together, err_msg=f"{kernel}: a row's logits moved with its batch")
    else:
        assert not np.array_equal(alone, together), f"{kernel}: expected batch-dependent logits"


@pytest.mark.parametrize("kernel", ["token", "hybrid", "dynamic"])
def test_validate_reads_the_int8_kernel_back_from_the_manifest(tiny_export, kernel):
    """`gptexport validate` re-exports with the options the manifest records: the same int8 kernel."""
    from gptexport.exporter.revalidate import options_of

    _, _, m = tiny_export("gpt2", dtype="int8", int8_kernel=kernel)
    opts = options_of(m)
    assert (opts.dtype, opts.int8_kernel) == ("int8", kernel)
    # GPT-2's tied lm_head is rescored by default, and the rescoring read back
    assert m["passes"]["rescore"]["applied"] and opts.rescore_top_k == m["passes"]["rescore"]["top_k"]
    if kernel == "token":
        assert opts.quant_method == "gptq"  # the export default, read back from the manifest's words
