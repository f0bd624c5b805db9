"""int4 judged against round to nearest (graphs/precision RTN_MARGIN) on a deep model: a good int4 export of an
8-layer GPT-J measures more than the fixed 2-layer limit and passes, because plain RTN of the same weights
measures more still; broken exports (one layer's scales doubled, two layers' weights swapped, one layer's MLP
zeroed) are refused by a wide margin at the limit RTN gives. The same rule, streamed: a streamed artifact's
full check computes its RTN reference block by block.

Random weights give nearly flat next-token distributions (logits' std 0.16 at width 64), under which any error
looks small; the head is scaled x10 so that the logits spread (std 1.6) and the distributions have clear winners,
which is what makes a KL limit mean something, and what makes depth show (GPT-J-6B's int4 KL is 25x a 2-layer model's).

Measured (8 layers, head x10, 380 self-sampled tokens, mean KL): GPTQ 0.0229, plain
RTN 0.0524, limit 1.5 x 0.0524 = 0.0786; scales x2 0.871, layers swapped 0.963, layer 1's MLP zeroed 0.538 (6.8x
the limit; layer 7's would be 0.148, 1.9x: a late MLP matters less in a random model).

torch runs on one thread here: this model's ops are tiny, and two intra-op threads on a shared 2-core machine made
the validation's sampling 20x slower (52 s against 2.4 s for the same generate)."""

import shutil

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper
from tokenizers import Tokenizer

from gptexport.exporter.artifact import open_session
from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.load import load
from gptexport.exporter import rtn_reference
from gptexport.exporter.rtn_reference import quantized_activation, rtn_forward, rtn_weight
from gptexport.exporter.tokenizer import gpt2_tokenizer
from gptexport.exporter.validate import streamed_full_check, validate
from gptexport.graphs.precision import QUALITY_CEILINGS, QUALITY_LIMITS, RTN_MARGIN, nbits, rtn_relative_limits
from gptexport.runtime.manifest import checksum_files

ZEROED_LAYER = 1  # whose MLP the negative case zeroes
DEEP = dict(n_layer=8, n_head=4, n_embd=64, n_positions=128, rotary_dim=8, vocab_size=50400,
            tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)
HEAD_GAIN = 10.0  # logits' std 1.6; at 25 (16 layers) the good GPTQ export measured KL 0.128, top-1 0.73
WIDE = 3.0  # a broken export's mean KL is at least this many times its limit


def test_rtn_weight_is_nbits_rtn_and_activations_round_per_block(monkeypatch):
    w = np.random.default_rng(0).standard_normal((96, 24)).astype(np.float32)
    for bits, block in ((4, 32), (8, 32), (4, 64)):
        want = nbits.dequantize_blocks(*nbits.quantize_blocks(w, bits, block, "rtn"), bits, 96)
        assert np.array_equal(rtn_weight(torch.from_numpy(w), bits, block).numpy(), want)
        with monkeypatch.context() as m:
            m.setattr(rtn_reference, "_CHUNK", 96 * 5)  # columns 5 at a time: the same numbers
            assert np.array_equal(rtn_weight(torch.from_numpy(w), bits, block).numpy(), want)
    x = torch.tensor([[1.0, -0.5, 0.25, 0.126, 10.0, 0.01, 0.0, 0.0]])
    q = quantized_activation(x, 4)
    assert abs(float(q[0, 0]) - 1.0) < 1e-6 and abs(float(q[0, 4]) - 10.0) < 1e-5  # each block's extreme: its own code
    assert abs(float(q[0, 3]) - round(0.126 * 127) / 127) < 1e-7 and q[0, 5] == 0.0  # 0.01 < 10 / 254: rounds to 0
    assert torch.equal(q[0, 6:], x[0, 6:])  # an all-zero part stays zero (no division by a zero scale)


def test_rtn_forward_changes_the_logits_inside_and_restores_every_weight():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512,
                                                                 n_positions=32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(12)[None]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with rtn_forward(model, 4, 32):
            rtn = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.equal(plain, rtn) and torch.equal(plain, again)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(before)  # nothing left registered on the modules


def test_rtn_relative_limits_widen_within_the_ceiling():
    fixed, ceiling = QUALITY_LIMITS["int4"], QUALITY_CEILINGS["int4"]
    small = rtn_relative_limits("int4", {"kl_mean": 1e-4, "top1_agreement": 0.99})
    assert small["kl_mean"] == fixed["kl_mean"] and small["top1_agreement"] == fixed["top1_agreement"]
    deep = rtn_relative_limits("int4", {"kl_mean": 0.04, "top1_agreement": 0.9, "perplexity_change": 0.05})
    assert deep["kl_mean"] == pytest.approx(RTN_MARGIN * 0.04) and deep["top1_agreement"] == pytest.approx(0.85)
    assert deep["perplexity_change"] == pytest.approx(RTN_MARGIN * 0.05)
    broken = rtn_relative_limits("int4", {"kl_mean": 5.0, "top1_agreement": 0.1})
    assert broken["kl_mean"] == ceiling["kl_mean"] and broken["top1_agreement"] == ceiling["top1_agreement"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(directory, **config):
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**{**DEEP, **config})).eval()
    with torch.no_grad():
        model.lm_head.weight *= HEAD_GAIN
    model.save_pretrained(str(directory))
    gpt2_tokenizer(DEEP["vocab_size"]).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("deep") / "checkpoint")


@pytest.fixture(scope="module")
def deep_int4(deep_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("deep-int4") / "int4"
    result = export(ExportOptions(model=str(deep_checkpoint), output=str(out), dtype="int4"))
    return deep_checkpoint, result.output, result.manifest


def _revalidate(ckpt, directory, manifest) -> dict:
    manifest = {**manifest, "files": checksum_files(directory)}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return validate(model, manifest["config"], tokenizer, str(directory), open_session(directory), "int4",
                    manifest["special_tokens"]["eos_token_id"], manifest=manifest)


def test_deep_int4_passes_against_rtn_beyond_the_fixed_limit(deep_int4):
    _, _, manifest = deep_int4
    v = manifest["validation"]
    d, rtn = v["distribution"], v["rtn_reference"]
    assert v["passed"] and v["logits_std"] > 1.0  # not flat (1.6)
    assert d["kl_mean"] > QUALITY_LIMITS["int4"]["kl_mean"]  # the fixed 2-layer limit would refuse it
    assert d["kl_mean"] < rtn["kl_mean"]  # GPTQ beats plain rounding of the same weights
    assert v["limits"]["kl_mean"] == pytest.approx(RTN_MARGIN * rtn["kl_mean"]) and "limits_rule" in v
    assert rtn["bits"] == 4 and rtn["block_size"] == 128 and rtn["lm_head_bits"] == 8  # the export's (K=64: 64)


def test_rtn_export_is_about_its_own_reference(tmp_path):
    """The reference is a simulation of the kernel: a real RTN export measures what it predicts (2 layers: what
    is simulated is each MatMul, whatever the depth; 16 layers measured 0.4801 simulated, 0.4795 exported)."""
    ckpt = _checkpoint(tmp_path / "checkpoint", n_layer=2)
    result = export(ExportOptions(model=str(ckpt), output=str(tmp_path / "rtn"), dtype="int4", quant_method="rtn"))
    v = result.manifest["validation"]
    ratio = v["distribution"]["kl_mean"] / v["rtn_reference"]["kl_mean"]
    assert v["passed"] and 0.8 < ratio < 1.25, ratio


def _scales_doubled(proto):
    inits = {t.name: t for t in proto.graph.initializer}
    changed = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and ".h.0." in node.input[1]:
            scale = inits[node.input[2]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(2.0), scale.name))
            changed += 1
    return changed


def _layers_swapped(proto):
    inits = {t.name: t for t in proto.graph.initializer}
    changed = 0
    for name, first in inits.items():
        other = inits.get(name.replace(".h.0.", ".h.1."))
        if ".h.0." in name and other is not None and list(other.dims) == list(first.dims):
            a, b = numpy_helper.to_array(first), numpy_helper.to_array(other)
            first.CopyFrom(numpy_helper.from_array(b, first.name))
            other.CopyFrom(numpy_helper.from_array(a, other.name))
            changed += 1
    return changed


def _mlp_zeroed(proto):
    inits = {t.name: t for t in proto.graph.initializer}
    changed = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and f".h.{ZEROED_LAYER}.mlp." in node.input[1]:
            scale = inits[node.input[2]]
            scale.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), scale.name))
            changed += 1
    return changed


@pytest.mark.parametrize("breakage,least", [(_scales_doubled, 4), (_layers_swapped, 4), (_mlp_zeroed, 2)],
                         ids=["scales", "swapped", "zeroed"])
def test_deep_broken_int4_is_refused_by_a_wide_margin(deep_int4, tmp_path, breakage, least):
    ckpt, artifact, manifest = deep_int4
    target = tmp_path / "broken"
    shutil.copytree(artifact, target)
    proto = onnx.load(str(target / "model.onnx"))
    assert breakage(proto) >= least
    onnx.save(proto, str(target / "model.onnx"))
    v = _revalidate(ckpt, target, manifest)
    assert not v["passed"] and any("mean KL divergence" in c for c in v["failed_checks"]), v["failed_checks"]
    assert v["distribution"]["kl_mean"] > WIDE * v["limits"]["kl_mean"], (v["distribution"], v["limits"])


def test_deep_streamed_full_check_is_judged_against_streamed_rtn(deep_int4, tmp_path):
    ckpt, artifact, manifest = deep_int4
    loaded = load(str(ckpt), stream=True)
    good = streamed_full_check(loaded, artifact, manifest, "int4")
    rtn = good["rtn_reference"]
    assert good["passed"] and good["kl_mean"] > QUALITY_LIMITS["int4"]["kl_mean"], good
    assert good["limits"]["kl_mean"] == pytest.approx(RTN_MARGIN * rtn["kl_mean"]) and rtn["tokens"] == good["tokens"]
    target = tmp_path / "broken"
    shutil.copytree(artifact, target)
    proto = onnx.load(str(target / "model.onnx"))
    assert _layers_swapped(proto) >= 4
    onnx.save(proto, str(target / "model.onnx"))
    broken = streamed_full_check(loaded, target, {**manifest, "files": checksum_files(target)}, "int4")
    assert not broken["passed"] and broken["kl_mean"] > WIDE * broken["limits"]["kl_mean"], broken
