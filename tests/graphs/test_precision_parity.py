"""Parity of the precision passes on tiny traced GPT-2 / GPT-J against torch float32.

Two weight sets per architecture: transformers' default init (what the exporter validates) and a realistic one
(`_realistic`): residual channels in the thousands and an attention head whose raw Q.K^T exceeds float16's range,
as real GPT-2 / GPT-J have. Logits within LOGITS_ATOL (default init) or within REALISTIC_LOGITS_RATIO of the
largest logit (realistic), then greedy agreement >= MIN_GREEDY_AGREEMENT over 8 steps with presents fed back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptexport.graphs.precision import LOGITS_ATOL, MIN_GREEDY_AGREEMENT, quantize_int4, quantize_int8, to_fp16  # noqa: E402

STEPS = 8
BIG = 3000.0  # residual-stream channels of real GPT-2 reach ~3000
BIG_CHANNELS = (5, 40)
# Realistic weights give logits in the tens to hundreds; their tolerance is relative to the largest |logit|.
# Measured ratios: float32 5e-7, float16 4e-4, int8 6.6e-3, int4 0.065 (worst of GPT-2 / GPT-J).
REALISTIC_LOGITS_RATIO = {"float32": 1e-5, "float16": 1e-3, "int8": 0.015, "int4": 0.12}
PASSES = {"float32": lambda m: None, "float16": to_fp16, "int8": quantize_int8, "int4": quantize_int4}


def _config(arch: str):
    common = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(**common), transformers.GPT2LMHeadModel
    return transformers.GPTJConfig(rotary_dim=8, **common), transformers.GPTJForCausalLM


def _realistic(model, arch: str) -> None:
    """Scale a default-init model to trained magnitudes.

    Weights x5 (std 0.1, like trained GPT-2 projections); two residual channels pushed to ~BIG by the MLP output
    biases; head 0 reads the big channel into Q and K so its raw dot products exceed 65504 (float16's max) while
    the scaled scores stay ordinary (the big part is the same for every key and cancels in the softmax).
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
        n = model.config.n_embd
        for block in model.transformer.h:
            proj = block.mlp.c_proj if arch == "gpt2" else block.mlp.fc_out
            proj.bias[list(BIG_CHANNELS)] += BIG / model.config.n_layer
            if arch == "gpt2":  # Conv1D weight (in, out); q = out[0:n], k = out[n:2n]; head 0 = first 16
                block.attn.c_attn.weight[BIG_CHANNELS[0], 0:16] = 14.0
                block.attn.c_attn.weight[BIG_CHANNELS[0], n:n + 16] = 14.0
            else:  # Linear weight (out, in); the non-rotary dims 8:16 of head 0, so the big part is position-free
                block.attn.q_proj.weight[8:16, BIG_CHANNELS[0]] = 20.0
                block.attn.k_proj.weight[8:16, BIG_CHANNELS[0]] = 20.0


def _prompt():
    ids = torch.tensor([[0, 0, 11, 42, 7, 93], [5, 17, 64, 3, 28, 71]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _torch_greedy(model):
    """Prefill logits and STEPS greedy tokens, recomputing the whole sequence each step (no cache to trust)."""
    ids, mask = _prompt()
    first, tokens = None, []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
            first = logits.numpy() if first is None else first
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return first, torch.cat(tokens, 1).numpy()


def _onnx_greedy(model: ir.Model, layers: int, heads: int, head_size: int):
    """The same with onnxruntime, presents fed back as the next pasts."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    kv_dtype = {i.name: i.type for i in session.get_inputs()}["past_key_values.0.key"]
    kv = np.float16 if "float16" in kv_dtype else np.float32
    ids, mask = (t.numpy() for t in _prompt())
    pasts = {f"past_key_values.{i}.{n}": np.zeros((2, heads, 0, head_size), kv) for i in range(layers)
             for n in ("key", "value")}
    step_ids, positions, first, tokens = ids, _positions(torch.from_numpy(mask)).numpy(), None, []
    for _ in range(STEPS):
        out = session.run(None, {"input_ids": step_ids, "attention_mask": mask, "position_ids": positions, **pasts})
        assert out[0].dtype == np.float32, "logits must stay float32"
        assert all(np.isfinite(o.astype(np.float32)).all() for o in out), "NaN or inf in an output"
        first = out[0] if first is None else first
        nxt = out[0][:, -1].argmax(-1)[:, None]
        tokens.append(nxt)
        pasts = {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": o for i, o in enumerate(out[1:])}
        positions, step_ids = positions[:, -1:] + 1, nxt
        mask = np.concatenate([mask, np.ones_like(nxt)], 1)
    return first, np.concatenate(tokens, 1)


def _agreement(ours, theirs) -> float:
    same = 0
    for a, b in zip(ours, theirs):
        same += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
    return same / theirs.size


@pytest.fixture(scope="module")
def traced():
    """(arch, weights) -> (torch model, traced float32 ir model proto); traced once each."""
    from gptexport.exporter.presets import ARCHITECTURES
    from gptexport.exporter.trace import trace

    cache = {}

    def get(arch: str, weights: str):
        if (arch, weights) not in cache:
            config, cls = _config(arch)
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            model = cls(config).eval()
            if weights == "realistic":
                _realistic(model, arch)
            facts = ARCHITECTURES[type(config).__name__].facts(config)
            cache[arch, weights] = (model, facts, ir.to_proto(trace(model, facts)), _torch_greedy(model))
        model, facts, proto, reference = cache[arch, weights]
        return model, facts, ir.from_proto(proto), reference

    return get


def measure(traced, arch: str, weights: str, precision: str, fused: bool = False) -> tuple[float, float, float]:
    """(max |logits diff|, largest |logit|, greedy agreement) of one precision against torch float32."""
    _, facts, model, (logits, tokens) = traced(arch, weights)
    if fused:  # the other passes' contrib ops (MultiHeadAttention, RotaryEmbedding, SkipLayerNorm, FastGelu)
        from gptexport.graphs.fusion import RULES

        for _, rule in RULES:
            rule(model)
    PASSES[precision](model)
    ours, our_tokens = _onnx_greedy(model, facts["num_layers"], facts["num_heads"], facts["head_size"])
    mask = _prompt()[1].numpy().astype(bool)  # pad positions' logits are not compared
    diff = float(np.abs(ours - logits)[mask].max())
    return diff, float(np.abs(logits[mask]).max()), _agreement(our_tokens, tokens)


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_default_init_within_named_tolerances(traced, arch, precision):
    diff, _, agreement = measure(traced, arch, "default", precision)
    print(f"\n{arch} default {precision}: max|diff| {diff:.3g} agreement {agreement:.3f}")
    assert diff <= LOGITS_ATOL[precision], f"logits: worst |diff| {diff:.3g} > {LOGITS_ATOL[precision]}"
    assert agreement >= MIN_GREEDY_AGREEMENT[precision]


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_realistic_magnitudes(traced, arch, precision):
    diff, scale, agreement = measure(traced, arch, "realistic", precision)
    print(f"\n{arch} realistic {precision}: max|diff| {diff:.3g} of {scale:.3g} agreement {agreement:.3f}")
    assert diff <= REALISTIC_LOGITS_RATIO[precision] * scale, f"logits: worst |diff| {diff:.3g} (max {scale:.3g})"
    assert agreement >= MIN_GREEDY_AGREEMENT[precision]


def _fp16_math(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    """Evaluate with numpy in the graph's own dtypes, so float16 ops round and overflow as GPU kernels do.

    onnxruntime's CPU provider cannot show a float16 overflow: it has no float16 MatMul/Add/Softmax on x86 and
    computes them in float32 (graphs/precision/kernels.py). LayerNormalization is evaluated in float32 and rounded
    back, as onnxruntime's CPU and CUDA kernels do (numpy's float16 variance of a 3000 would overflow by itself).
    """
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_layer_normalization import LayerNormalization

    class LayerNormalizationFp32(LayerNormalization):
        op_domain = ""

        def _run(self, x, scale, bias=None, **kwargs):
            outs = super()._run(x.astype(np.float32), scale.astype(np.float32),
                                None if bias is None else bias.astype(np.float32), **kwargs)
            return (outs[0].astype(x.dtype), *outs[1:])

    LayerNormalizationFp32.__name__ = "LayerNormalization"
    return ReferenceEvaluator(ir.to_proto(model), new_ops=[LayerNormalizationFp32]).run(None, feeds)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy says "overflow" in the naive case: the point
@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_realistic_fp16_islands_finite_where_naive_overflows(traced, arch):
    _, facts, _, _ = traced(arch, "realistic")
    ids, mask = (t.numpy() for t in _prompt())
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(_prompt()[1]).numpy()}
    feeds.update({f"past_key_values.{i}.{n}": np.zeros((2, facts["num_heads"], 0, facts["head_size"]), np.float16)
                  for i in range(facts["num_layers"]) for n in ("key", "value")})
    results = {}
    for keep in [(), ("attention_scores",)]:
        model = traced(arch, "realistic")[2]
        to_fp16(model, keep_fp32=keep)
        results[keep] = _fp16_math(model, feeds)[0][mask.astype(bool)]
    assert not np.isfinite(results[()]).all(), "naive fp16 should overflow on this model (else the test proves nothing)"
    assert np.isfinite(results[("attention_scores",)]).all()


@pytest.mark.parametrize("precision", ["float16", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_fused_graphs_within_named_tolerances(traced, arch, precision):
    diff, scale, agreement = measure(traced, arch, "realistic", precision, fused=True)
    print(f"\n{arch} fused realistic {precision}: max|diff| {diff:.3g} of {scale:.3g} agreement {agreement:.3f}")
    assert diff <= REALISTIC_LOGITS_RATIO[precision] * scale, f"logits: worst |diff| {diff:.3g} (max {scale:.3g})"
    assert agreement >= MIN_GREEDY_AGREEMENT[precision]
