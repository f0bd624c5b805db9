"""Validate an exported artifact against the torch model it came from.

Two checks, both recorded in the manifest: the logits (and presents) of the graph against torch on a padded
batch with a past and on a prefill with no past; then greedy generation through the real runtime against
transformers' `generate`, prompt by prompt and as one left-padded batch of different lengths.

The shared_buffer graph (`--kv-layout shared_buffer`) has other inputs (no mask, no growing pasts): its logits
check drives it as the runtime does (runtime/kv.py: prefill into a preallocated buffer, then decode steps) and
compares the positions torch computes for the same tokens; its presents are the buffer's filled slots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .presets import ExportError
from .trace import FlatDecoder, example_inputs, input_names, output_names

# Named limits per precision (distributions on text; logits in units of their spread; greedy tokens), measured on
# trained checkpoints and explained in graphs/precision/__init__.py.
from gptexport.graphs.precision import (LOGITS_ATOL, MIN_GREEDY_AGREEMENT, QUALITY_LIMITS,  # noqa: E402
                                        RTN_MARGIN, TOP1_TIE_PROBABILITY, rtn_relative_limits)
VALIDATION_PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog because",
    "In 1991, the remains of Russian Tsar Nicholas II and his family",
]
PADDED_BATCH = ["Hi", "Once upon a time, in a land far away, there lived"]
NEW_TOKENS = 12


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _graph_outputs(session, names_in, args):
    """Run the graph on torch tensors, casting each to the dtype the graph declares (fp16 KV, for example)."""
    types = {i.name: _NUMPY[i.type] for i in session.get_inputs()}
    feed = {n: a.numpy().astype(types[n]) for n, a in zip(names_in, args)}
    return session.run(None, feed)


def logits_check(model, facts: dict, session, manifest: dict | None = None) -> dict:
    """Worst |difference| of logits and presents between the graph and torch, on two input shapes.

    Args:
        manifest: the artifact's; a "kv_layout" of "shared_buffer" selects `shared_logits_check`.
    """
    if manifest is not None and manifest.get("kv_layout") == "shared_buffer":
        return shared_logits_check(model, facts, session, manifest)
    layers = facts["num_layers"]
    wrapper = FlatDecoder(model).eval()
    cases = [example_inputs(facts), example_inputs(facts, batch=1, seq=9, past=0)]
    worst_logits, worst_kv, largest, seen = 0.0, 0.0, 0.0, []
    for args in cases:
        with torch.no_grad():
            ref = [t.float().numpy() for t in wrapper(*args)]
        got = _graph_outputs(session, input_names(layers), args)
        real = args[1][:, -args[0].shape[1]:].numpy().astype(bool)  # logits of pad positions mean nothing
        worst_logits = max(worst_logits, float(np.abs(got[0].astype(np.float32) - ref[0])[real].max()))
        largest = max(largest, float(np.abs(ref[0][real]).max()))
        seen.append(ref[0][real])
        for g, r in zip(got[1:], ref[1:]):
            worst_kv = max(worst_kv, float(np.abs(g.astype(np.float32) - r).max()))
    return {"logits_max_abs_diff": worst_logits, "present_max_abs_diff": worst_kv, "max_abs_logit": largest,
            "logits_max_rel_diff": worst_logits / max(largest, 1e-12), **_scale(worst_logits, seen),
            "logits_cases": ["batch 2, seq 3, past 4, row 0 left-padded", "batch 1, seq 9, no past"]}


def _scale(worst: float, logits: list) -> dict:
    """The logits' spread (std over the vocabulary, averaged over positions) and the worst difference in its units:
    trained logits are tens apart where random ones are hundredths, so only this ratio compares across models."""
    std = float(np.mean([row.std() for block in logits for row in block.reshape(-1, block.shape[-1])]))
    return {"logits_std": std, "logits_max_abs_diff_over_std": worst / max(std, 1e-12)}


# shared_buffer: prompt lengths of each case (a left-padded batch when several), then DECODE_STEPS more tokens
SHARED_CASES = [[9], [3, 7]]
DECODE_STEPS = 2


def _left_padded(facts: dict, lengths: list[int], extra: int):
    """Random ids (B, W + extra) whose rows hold lengths[b] + extra real tokens, left-padded; mask; positions."""
    g = torch.Generator().manual_seed(0)
    width = max(lengths) + extra
    ids = torch.randint(0, facts["vocab_size"], (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n - extra:] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' positions, pads 0
    return ids, mask, positions


def shared_logits_check(model, facts: dict, session, manifest: dict) -> dict:
    """logits_check for the shared_buffer graph, driven through the runtime's cache (runtime/kv.py).

    Torch runs each case's whole sequence once, without a cache; the graph prefills the prompts (right-aligned
    into a preallocated buffer) and then decodes DECODE_STEPS tokens one at a time. Compared: every row's logits
    at its last prompt token and at each decode step, and each row's first len buffer slots against torch's
    keys/values of that row's real tokens.
    """
    from gptexport.runtime.session import Decoder

    decoder = Decoder(session, "cpu", manifest)
    wrapper = FlatDecoder(model).eval()
    presents = output_names(facts["num_layers"])[1:]
    worst_logits, worst_kv, largest, seen = 0.0, 0.0, 0.0, []
    for lengths in SHARED_CASES:
        ids, mask, positions = _left_padded(facts, lengths, DECODE_STEPS)
        no_past = example_inputs(facts, batch=len(lengths), past=0)[3:]  # (B, nh, 0, hs) each
        with torch.no_grad():
            ref = [t.float().numpy() for t in wrapper(ids, mask, positions, *no_past)]
        ref_kv = dict(zip(presents, ref[1:]))  # (B, nh, W + steps, hs), left-padded
        ids, mask, positions = ids.numpy(), mask.numpy(), positions.numpy()
        width, total = max(lengths), ids.shape[1]
        cache = decoder.new_cache(len(lengths), capacity=total)
        # (B, 1, vocab) each, copied: a step's logits are the binding's array, overwritten by the next step
        got = [decoder.step(ids[:, :width], mask[:, :width], positions[:, :width], cache).copy()]
        for t in range(width, total):  # each decode step feeds the next token of the sequence
            got.append(decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], cache).copy())
        for k, logits in enumerate(got):  # step k returns the logits of position width - 1 + k
            want = ref[0][:, width - 1 + k]
            worst_logits = max(worst_logits, float(np.abs(logits[:, 0].astype(np.float32) - want).max()))
            largest = max(largest, float(np.abs(want).max()))
            seen.append(want)
        for past, present in decoder.pairs:
            buffer = cache.buffers[past].numpy().astype(np.float32)  # (B, nh, capacity, hs), right-aligned rows
            for b, n in enumerate(cache.lengths.tolist()):
                diff = np.abs(buffer[b, :, :n] - ref_kv[present][b, :, total - n:]).max()
                worst_kv = max(worst_kv, float(diff))
    return {"logits_max_abs_diff": worst_logits, "present_max_abs_diff": worst_kv, "max_abs_logit": largest,
            "logits_max_rel_diff": worst_logits / max(largest, 1e-12), **_scale(worst_logits, seen),
            "logits_cases": [f"shared_buffer through runtime/kv.py: batch {len(c)}, prompt lengths "
                             f"{'/'.join(map(str, c))}{' left-padded' if len(c) > 1 else ''}, prefill + "
                             f"{DECODE_STEPS} decode steps" for c in SHARED_CASES],
            "present_check": "each row's filled KV buffer slots against torch's keys/values of its tokens"}


def _hf_greedy(model, tokenizer, prompts: list[str], eos: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' greedy tokens per row, and its raw logits at every step ((B, vocab) each)."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[eos] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=eos, eos_token_id=eos,
                             return_dict_in_generate=True, output_logits=True)
    return [row[width:].tolist() for row in out.sequences], [step.float().numpy() for step in out.logits]


def _agreement(ours: list[int], theirs: list[int]) -> int:
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same


# The key naming the reference's logit gap at a divergence in each greedy_cases row. The names differ because the
# references differ (torch's logits; the same graph's without a cache, for an adopted artifact without a
# checkpoint); manifests written before this helper hold the same keys.
GAP_KEYS = {"torch": "torch_logit_gap", "no_cache": "logit_gap"}


def greedy_tally(rows, tie_tolerance: float, reference: str = "torch") -> dict:
    """Greedy agreement of our tokens with a reference's, row by row, ties at the reference's logits excused.

    Args:
        rows: (prompt, batch size, our tokens, the reference's tokens, the reference's logits at each step, each
            a (vocab,) row), one per prompt of each case.
        tie_tolerance: a divergence where the reference's logits of its token and ours are within this counts as
            a tie (the row agrees).
        reference: "torch" or "no_cache"; selects the gap's key (GAP_KEYS).
    Returns:
        greedy_agreement (ties excused), greedy_agreement_strict, greedy_tie_tolerance and greedy_cases.
    """
    gap_key = GAP_KEYS[reference]
    total = agreed = strict = 0
    cases = []
    for prompt, batch, ours, theirs, logits in rows:
        same = _agreement(ours, theirs)
        row = {"prompt": prompt, "batch": batch, "tokens_equal": same, "tokens": len(theirs)}
        if same < len(theirs):  # the reference's logit gap between its token and ours at the divergence
            row[gap_key] = float(logits[same][theirs[same]] - logits[same][ours[same]])
            row["tie"] = bool(row[gap_key] <= tie_tolerance)
        total, strict = total + len(theirs), strict + same
        agreed += len(theirs) if row.get("tie") else same
        cases.append(row)
    return {"greedy_agreement": agreed / total, "greedy_agreement_strict": strict / total,
            "greedy_tie_tolerance": tie_tolerance, "greedy_cases": cases}


def greedy_check(model, tokenizer, artifact_dir: str, eos: int, manifest: dict | None = None,
                 tie_tolerance: float = 0.0) -> dict:
    """Greedy tokens of the runtime against transformers' generate: single prompts and a left-padded batch.

    A row agrees up to its first divergence. When torch's own logits put the two diverging tokens within
    `tie_tolerance` of each other (the precision's logits tolerance), the divergence is a tie at this precision,
    not an error, and the row counts as agreeing: `greedy_agreement` is that figure, `greedy_agreement_strict`
    counts every divergence, and each tie is listed with torch's logit gap.
    """
    from gptexport import runtime
    rt = runtime.load(artifact_dir, verify="size", manifest=manifest)
    rows = []
    for prompts in [[p] for p in VALIDATION_PROMPTS] + [PADDED_BATCH]:
        theirs, logits = _hf_greedy(model, tokenizer, prompts, eos)
        _, ours = rt.generate(prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_tokens=True)
        rows += [(prompt, len(prompts), a, b, [step[r] for step in logits])
                 for r, (prompt, a, b) in enumerate(zip(prompts, ours, theirs))]
    return greedy_tally(rows, tie_tolerance, reference="torch")


# ---- next-token distributions on text -----------------------------------------------------------------------------

# Without a text from the user, the fp32 torch model's own samples (seeded): text the model finds plausible, in its
# own domain, with no file to ship (self-generated validation text, as in self-calibration, arXiv 2410.17170).
SAMPLES, SAMPLE_TOKENS, SAMPLE_SEED = 4, 96, 0
TEXT_TOKENS, TEXT_WINDOW = 1024, 256  # of a user's text: the first TEXT_TOKENS, in windows of up to TEXT_WINDOW


def self_samples(model, eos: int, max_positions: int, seed: int = SAMPLE_SEED) -> list[np.ndarray]:
    """SAMPLES sequences sampled (temperature 1, no top-k/top-p) from torch after <|endoftext|>, seeded."""
    length = min(SAMPLE_TOKENS, max_positions)
    start = torch.full((SAMPLES, 1), eos, dtype=torch.long)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                             pad_token_id=eos, eos_token_id=None)
    return [row.numpy() for row in out]


def text_windows(tokenizer, texts: list[str], max_positions: int) -> list[np.ndarray]:
    """The first TEXT_TOKENS tokens of the user's texts, each text cut into windows of up to TEXT_WINDOW tokens."""
    width, rows, budget = min(TEXT_WINDOW, max_positions), [], TEXT_TOKENS
    for text in texts:
        ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)[:budget]
        rows += [ids[i:i + width] for i in range(0, len(ids), width) if len(ids[i:i + width]) >= 2]
        budget -= len(ids)
        if budget <= 0:
            break
    if not rows:
        raise ExportError("--validation-text has fewer than 2 tokens: give a text of a few hundred words")
    return rows


def distribution_check(model, artifact, rows: list[np.ndarray], tie_probability: float) -> dict:
    """Next-token distributions of the artifact against torch at every position of `rows` (no past).

    Args:
        artifact: the loaded runtime Model.
        rows: token windows (T,), each scored at its T - 1 next-token predictions.
        tie_probability: a top-1 disagreement where torch's probabilities of the two tokens differ by at most this
            is a tie (random weights' distributions are nearly flat), counted as agreeing in `top1_agreement`.
    Returns:
        kl_mean / kl_p99 / kl_max of KL(torch || artifact) in nats, top1_agreement (ties excused) and
        top1_agreement_strict, perplexity of both on the rows' tokens and perplexity_change (artifact / torch - 1).
    """
    from gptexport.runtime.perplexity import window_logits

    return _distribution(model, rows, tie_probability, lambda row: window_logits(artifact, row, len(row) - 1))


def _torch_logits(model, row: np.ndarray) -> np.ndarray:
    """(T-1, V) float32 logits of torch at the positions that predict a next token of `row`."""
    with torch.no_grad():
        ids = torch.as_tensor(row)[None]
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float().numpy()


def rtn_check(model, rows: list[np.ndarray], tie_probability: float, dtype: str, manifest: dict | None) -> dict:
    """distribution_check's figures for plain round to nearest of the same weights at the export's bits and block
    (exporter/rtn_reference.py) instead of the artifact: what the int8 / int4 limits are relative to."""
    from .rtn_reference import export_bits, rtn_forward

    bits, block, head_bits = export_bits(dtype, manifest)

    def rtn_logits(row):
        with rtn_forward(model, bits, block, head_bits):
            return _torch_logits(model, row)

    return {"method": f"torch with every Linear as symmetric round to nearest at {bits} bits in blocks of {block} "
                      f"(the lm_head at {head_bits}) and its input quantized to int8 per row and block, as "
                      f"MatMulNBits at accuracy_level 4", "bits": bits, "block_size": block,
            "lm_head_bits": head_bits, **_distribution(model, rows, tie_probability, rtn_logits)}


def _distribution(model, rows: list[np.ndarray], tie_probability: float, logits_of) -> dict:
    """distribution_check against any logits: logits_of(row) -> (T-1, V)."""
    kls, agree, strict, nll_ref, nll_ours, count, worst, stds = [], 0, 0, 0.0, 0.0, 0, 0.0, []
    for row in rows:
        ref_logits = _torch_logits(model, row)
        ours_logits = np.asarray(logits_of(row), np.float32)
        worst = max(worst, float(np.abs(ours_logits - ref_logits).max()))
        stds += [float(r.std()) for r in ref_logits]
        ref = torch.log_softmax(torch.as_tensor(ref_logits).double(), -1)  # (T-1, V)
        ours = torch.log_softmax(torch.as_tensor(ours_logits).double(), -1)
        target = torch.as_tensor(row[1:])
        kls.append((ref.exp() * (ref - ours)).sum(-1).clamp_min(0.0))
        top_ref, top_ours = ref.argmax(-1), ours.argmax(-1)
        same = top_ref == top_ours
        gap = ref.exp().gather(-1, top_ref[:, None])[:, 0] - ref.exp().gather(-1, top_ours[:, None])[:, 0]
        strict += int(same.sum())
        agree += int((same | (gap <= tie_probability)).sum())
        nll_ref -= float(ref.gather(-1, target[:, None]).sum())
        nll_ours -= float(ours.gather(-1, target[:, None]).sum())
        count += len(target)
    kl = torch.cat(kls).numpy()
    ppl_ref, ppl_ours = float(np.exp(nll_ref / count)), float(np.exp(nll_ours / count))
    return {"tokens": count, "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()), "top1_agreement": agree / count, "top1_agreement_strict": strict / count,
            "top1_tie_probability": tie_probability, "perplexity_torch": ppl_ref, "perplexity": ppl_ours,
            "perplexity_change": ppl_ours / ppl_ref - 1.0, "text_logits_max_abs_diff": worst,
            "text_logits_max_abs_diff_over_std": worst / max(float(np.mean(stds)), 1e-12)}


RTN_RULE = (f"each error figure may reach min(ceiling, max(fixed limit, {RTN_MARGIN} x the RTN reference's)): "
            "graphs/precision QUALITY_LIMITS, RTN_MARGIN, QUALITY_CEILINGS")


def judged_against_rtn(dtype: str, manifest: dict | None) -> bool:
    """int8 / int4 in MatMulNBits (the kernel the RTN reference computes as): limits relative to RTN."""
    quant = ((manifest or {}).get("passes") or {}).get("quantization") or {}
    return dtype in ("int8", "int4") and quant.get("kernel", "MatMulNBits") == "MatMulNBits"


def judge(result: dict, dtype: str) -> list[str]:
    """The checks `result` fails against its limits (`result["limits"]`, else the precision's fixed ones), each with
    its figures."""
    limits, failed = result.get("limits") or QUALITY_LIMITS[dtype], []
    d = result["distribution"]
    if d["kl_mean"] > limits["kl_mean"]:
        failed.append(f"mean KL divergence {d['kl_mean']:.3g} above the {dtype} limit {limits['kl_mean']:g}")
    if d["top1_agreement"] < limits["top1_agreement"]:
        failed.append(f"top-1 agreement {d['top1_agreement']:.4f} below the {dtype} limit "
                      f"{limits['top1_agreement']:g}")
    if abs(d["perplexity_change"]) > limits["perplexity_change"]:
        failed.append(f"perplexity change {d['perplexity_change'] * 100:+.3f} % beyond the {dtype} limit "
                      f"{limits['perplexity_change'] * 100:g} %")
    if result["logits_max_abs_diff_over_std"] > limits["logits_max_abs_diff_over_std"]:
        failed.append(f"logits max abs diff {result['logits_max_abs_diff']:.3g} = "
                      f"{result['logits_max_abs_diff_over_std']:.3g} x the logits' std, above the {dtype} limit "
                      f"{limits['logits_max_abs_diff_over_std']:g}")
    if result["greedy_agreement"] < MIN_GREEDY_AGREEMENT[dtype]:
        failed.append(f"greedy agreement {result['greedy_agreement']:.3f} below the required "
                      f"{MIN_GREEDY_AGREEMENT[dtype]}")
    return failed


def validation_texts(opts) -> list[str] | None:
    """The texts of opts.validation_text (--validation-text files), or None: the model's own samples then.

    Raises:
        ExportError: a file that cannot be read as UTF-8 text.
    """
    texts = []
    for path in opts.validation_text or []:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise ExportError(f"cannot read --validation-text {str(path)!r}: "
                              f"{getattr(err, 'strerror', None) or err}; give a UTF-8 text file") from None
    return texts or None


def validate(model, facts: dict, tokenizer, artifact_dir: str, session, dtype: str, eos: int,
             manifest: dict | None = None, texts: list[str] | None = None) -> dict:
    """Check the artifact against torch and judge it against the precision's named limits.

    Three checks: next-token distributions on text (KL divergence, top-1 agreement, perplexity change; the user's
    `texts`, or else the fp32 torch model's own seeded samples), the logits' largest difference in units of their
    spread (and the presents'), on two input shapes, and greedy generation through the runtime.

    Returns:
        the manifest's `validation` section (with `passed`, `limits` and `failed_checks`).
    Raises:
        ExportError: a validation text with no tokens; never for a numeric failure: a failed validation is
            recorded and reported by the caller.
    """
    from gptexport import runtime

    result = {"reference": "torch float32 (transformers eager)", "new_tokens": NEW_TOKENS}
    result.update(logits_check(model, facts, session, manifest))
    artifact = runtime.load(artifact_dir, verify="size", manifest=manifest)
    if texts:
        rows = text_windows(tokenizer, texts, facts["max_positions"])
        source = f"the given validation text: {sum(len(r) for r in rows)} tokens in {len(rows)} windows"
    else:
        rows = self_samples(model, eos, facts["max_positions"])
        source = (f"self-generated: {len(rows)} samples of {len(rows[0])} tokens from the fp32 torch model "
                  f"(temperature 1, seed {SAMPLE_SEED})")
    limits = QUALITY_LIMITS[dtype]
    result["distribution"] = {"text": source, **distribution_check(model, artifact, rows, TOP1_TIE_PROBABILITY)}
    if judged_against_rtn(dtype, manifest):
        rtn = rtn_check(model, rows, TOP1_TIE_PROBABILITY, dtype, manifest)
        result["rtn_reference"] = rtn
        limits = rtn_relative_limits(dtype, {**rtn, "logits_max_abs_diff_over_std":
                                             rtn["text_logits_max_abs_diff_over_std"]})
    result.update(greedy_check(model, tokenizer, artifact_dir, eos, manifest, tie_tolerance=LOGITS_ATOL[dtype]))
    result["logits_tolerance"] = LOGITS_ATOL[dtype]
    result["min_greedy_agreement"] = MIN_GREEDY_AGREEMENT[dtype]
    result["limits"] = {**limits, "min_greedy_agreement": MIN_GREEDY_AGREEMENT[dtype]}
    if "rtn_reference" in result:
        result["limits_rule"] = RTN_RULE
    result["failed_checks"] = judge(result, dtype)
    result["passed"] = not result["failed_checks"]
    return result


__all__ = ["validate", "ExportError", "LOGITS_ATOL", "MIN_GREEDY_AGREEMENT", "QUALITY_LIMITS"]


# ---- models too large to hold twice (streamed exports) -----------------------------------------------------------

REDUCED_LAYERS, REDUCED_HEADS = 2, 4
STREAMED_METHOD = ("reduced: the same code path (empty-parameter trace, streamed weights, same passes, same writer "
                   "with external data) exported for a reduced config of the same architecture ({layers} layers, "
                   "{heads} heads of the same head size, same rotary_dim, vocab and positions) with seeded random "
                   "weights and fully validated against torch; plus a structural check of this artifact (I/O names, "
                   "fusion counts, every external tensor's length and place in the data file), and this artifact's "
                   "next-token distributions on {prompts} prompts against torch fp32 streamed block by block from "
                   "the checkpoint (full_artifact)")


def reduced_config(config):
    """Same architecture and per-head shapes, fewer layers and heads: small enough to validate in memory."""
    import copy

    small = copy.deepcopy(config)
    head_size = config.n_embd // config.n_head
    small.n_layer, small.n_head = min(config.n_layer, REDUCED_LAYERS), min(config.n_head, REDUCED_HEADS)
    small.n_embd = small.n_head * head_size
    if getattr(config, "n_inner", None):
        small.n_inner = config.n_inner * small.n_embd // config.n_embd
    return small


class StreamedReference:
    """torch float32 forward of a model whose weights are not in memory: each transformer block's parameters are
    read from the checkpoint just before the block runs and dropped after it, so at most one block (plus the
    embeddings and the head) is resident: about 2.5 GB for GPT-J-6B instead of 24.

    Args:
        model: the streamed export's model (empty parameters, real buffers: exporter/stream.py `empty_model`).
        weights: where its weights are (SafetensorsWeights or RandomWeights).
    """

    def __init__(self, model, weights):
        from . import stream

        self.model, self.weights = model, weights
        self.aliases = stream.parameter_aliases(model)
        self.blocks = list(model.base_model.h)

    def _load(self, modules: list) -> list:
        """Put real parameters into each (name, module)'s own parameters (tied ones read once); returns what to
        restore."""
        from . import stream

        saved, made = [], {}
        for name, sub in modules:
            for leaf, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    key = stream.checkpoint_name(f"{name}.{leaf}" if name else leaf, self.weights, self.aliases)
                    made[id(param)] = torch.nn.Parameter(torch.from_numpy(np.asarray(self.weights.read(key),
                                                                                     np.float32)),
                                                         requires_grad=False)
                saved.append((sub, leaf, param))
                sub._parameters[leaf] = made[id(param)]
        return saved

    @staticmethod
    def _restore(saved: list) -> None:
        for sub, leaf, param in saved:
            sub._parameters[leaf] = param

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        """(T, vocab) float32 logits of one row of token ids (no past)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        inside = {id(m): block for block in self.blocks for m in block.modules()}
        outside = self._load([(n, m) for n, m in self.model.named_modules() if id(m) not in inside])
        hooks = []
        for block in self.blocks:
            held, modules = {}, [(names[id(m)], m) for m in block.modules()]
            hooks.append(block.register_forward_pre_hook(
                lambda mod, args, modules=modules, held=held: held.__setitem__("saved", self._load(modules))))
            hooks.append(block.register_forward_hook(
                lambda mod, args, out, held=held: self._restore(held.pop("saved"))))
        try:
            with torch.no_grad():
                row = torch.as_tensor(ids)[None]
                return self.model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0].float()
        finally:
            for hook in hooks:
                hook.remove()
            self._restore(outside)


STREAMED_PROMPTS = VALIDATION_PROMPTS


def streamed_full_check(loaded, artifact: Path, manifest: dict, dtype: str) -> dict:
    """The big artifact itself against a torch reference streamed block by block (StreamedReference), on
    STREAMED_PROMPTS: next-token distributions at every prompt position and the logits' worst difference."""
    from gptexport import runtime
    from gptexport.runtime.perplexity import window_logits

    reference = StreamedReference(loaded.model, loaded.weights)
    model = runtime.load(artifact, verify="size", manifest=manifest)
    rows = [np.asarray(loaded.tokenizer.encode(p).ids, dtype=np.int64) for p in STREAMED_PROMPTS]
    rows = [r for r in rows if len(r) > 1]
    refs = [reference.logits(ids).numpy()[:-1] for ids in rows]  # the positions the artifact's window returns
    result = _streamed_figures(rows, refs, [window_logits(model, ids, len(ids) - 1) for ids in rows])
    result["method"] = ("this artifact against torch fp32 streamed block by block from the checkpoint, on "
                        f"{len(STREAMED_PROMPTS)} prompts")
    limits = QUALITY_LIMITS[dtype]
    if judged_against_rtn(dtype, manifest):  # the same streamed forward as round to nearest would compute it
        from .rtn_reference import export_bits, rtn_forward

        bits, block, head_bits = export_bits(dtype, manifest)
        with rtn_forward(loaded.model, bits, block, head_bits):
            rtn_logits = [reference.logits(ids).numpy()[:-1] for ids in rows]
        rtn = _streamed_figures(rows, refs, rtn_logits)
        result["rtn_reference"] = {"bits": bits, "block_size": block, "lm_head_bits": head_bits, **rtn}
        limits = rtn_relative_limits(dtype, rtn)
        result["limits_rule"] = RTN_RULE
    result["limits"] = limits
    failed = []
    if result["kl_mean"] > limits["kl_mean"]:
        failed.append(f"full artifact: mean KL divergence {result['kl_mean']:.3g} above the {dtype} limit "
                      f"{limits['kl_mean']:.3g}")
    if result["top1_agreement"] < limits["top1_agreement"]:
        failed.append(f"full artifact: top-1 agreement {result['top1_agreement']:.4f} below the {dtype} limit "
                      f"{limits['top1_agreement']:.4g}")
    if result["logits_max_abs_diff_over_std"] > limits["logits_max_abs_diff_over_std"]:
        failed.append(f"full artifact: logits max abs diff {result['logits_max_abs_diff']:.3g} = "
                      f"{result['logits_max_abs_diff_over_std']:.3g} x the logits' std, above the {dtype} limit "
                      f"{limits['logits_max_abs_diff_over_std']:.3g}")
    result["failed_checks"], result["passed"] = failed, not failed
    return result


def _streamed_figures(rows, refs, others) -> dict:
    """KL(torch || other), top-1 agreement and the logits' worst difference over the rows ((T-1, V) logits each)."""
    kls, agree, strict, worst, stds, count = [], 0, 0, 0.0, [], 0
    for ids, ref_logits, ours_logits in zip(rows, refs, others):
        worst = max(worst, float(np.abs(ours_logits.astype(np.float32) - ref_logits).max()))
        stds += [float(r.std()) for r in ref_logits]
        ref = torch.log_softmax(torch.as_tensor(ref_logits).double(), -1)
        ours = torch.log_softmax(torch.as_tensor(ours_logits).double(), -1)
        kls.append((ref.exp() * (ref - ours)).sum(-1).clamp_min(0.0))
        top_ref, top_ours = ref.argmax(-1), ours.argmax(-1)
        gap = ref.exp().gather(-1, top_ref[:, None])[:, 0] - ref.exp().gather(-1, top_ours[:, None])[:, 0]
        strict += int((top_ref == top_ours).sum())
        agree += int(((top_ref == top_ours) | (gap <= TOP1_TIE_PROBABILITY)).sum())
        count += len(ref)
    kl = torch.cat(kls).numpy()
    std = float(np.mean(stds))
    return {"tokens": count, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": agree / count,
            "top1_agreement_strict": strict / count, "logits_max_abs_diff": worst, "logits_std": std,
            "logits_max_abs_diff_over_std": worst / max(std, 1e-12)}


def validate_streamed(loaded, facts: dict, opts, artifact: Path, manifest: dict, eos: int) -> dict:
    """Validate a streamed export without ever holding the model: see STREAMED_METHOD, plus this artifact itself
    against a torch reference streamed block by block (`streamed_full_check`).

    Returns:
        the manifest's `validation` section: the reduced export's full validation, `full_artifact`, `structural`,
        `method`.
    """
    import dataclasses
    import tempfile

    from . import stream
    from .artifact import Reporter, open_session, write_artifact

    config = reduced_config(loaded.model.config)
    model_cls = type(loaded.model)
    small = dataclasses.replace(loaded, model=stream.empty_model(model_cls, config), name=f"{loaded.name}-reduced")
    small.weights = stream.RandomWeights.for_model(small.model, seed=loaded.seed or 0)
    small_facts = loaded.architecture.facts(config)
    with tempfile.TemporaryDirectory(prefix=".reduced-", dir=artifact.parent) as tmp:
        small_manifest = write_artifact(small, small_facts, dataclasses.replace(opts, external_data_threshold=0),
                                        Path(tmp), Reporter())
        reference = model_cls(config).eval()
        stream.materialise(reference, small.weights)
        result = validate(reference, small_facts, loaded.tokenizer, tmp, open_session(Path(tmp)), opts.dtype, eos,
                          manifest=small_manifest, texts=validation_texts(opts))
    result["reduced_config"] = small_facts
    result["structural"] = structural_check(artifact, facts, manifest)
    if result["structural"]["passed"]:  # a structurally broken artifact may not even load
        result["full_artifact"] = streamed_full_check(loaded, artifact, manifest, opts.dtype)
        result["failed_checks"] = result["failed_checks"] + result["full_artifact"]["failed_checks"]
    result["passed"] = bool(result["passed"] and result["structural"]["passed"]
                            and result.get("full_artifact", {}).get("passed", False))
    result["method"] = STREAMED_METHOD.format(layers=small_facts["num_layers"], heads=small_facts["num_heads"],
                                              prompts=len(STREAMED_PROMPTS))
    return result


def structural_check(artifact: Path, facts: dict, manifest: dict) -> dict:
    """The graph's I/O names, the fusion counts, and every external tensor's length and place, read without the
    weights (the graph file only, and the data file's size)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from gptexport.graphs import shared_kv

    from .artifact import DATA_FILE, MODEL_FILE

    proto = onnx.load(str(Path(artifact) / MODEL_FILE), load_external_data=False)
    layers, problems = facts["num_layers"], []
    inputs = input_names(layers)
    if manifest.get("kv_layout") == shared_kv.KV_LAYOUT:
        inputs = shared_kv.input_names(inputs)
    else:  # graphs/last_logits.py: an input with a default, last
        inputs = inputs + ["logits_to_keep"]
    if [v.name for v in proto.graph.input] != inputs:
        problems.append("graph inputs differ from docs/ARTIFACT.md")
    if [v.name for v in proto.graph.output] != output_names(layers):
        problems.append("graph outputs differ from docs/ARTIFACT.md")
    problems += [f"fusion: {s}" for s in manifest["passes"].get("shortfalls") or []]
    data = Path(artifact) / DATA_FILE
    data_size = data.stat().st_size if data.exists() else 0
    end, by_dtype = 0, {}
    for tensor in proto.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        size = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + size
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            if length != size:
                problems.append(f"{tensor.name}: {length} bytes in the data file, its shape needs {size}")
            end = max(end, offset + length)
    if end > data_size:
        problems.append(f"external tensors reach byte {end}, {DATA_FILE} has {data_size}")
    return {"passed": not problems, "problems": problems, "initializer_bytes_by_dtype": by_dtype,
            "data_file_bytes": data_size, "fusion_counts": manifest["passes"].get("counts", {})}
