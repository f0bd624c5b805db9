"""Validate a head artifact (exporter/heads.py) against its torch model: every output, per precision limits.

Run through the torch-free runtime (runtime/heads.py) on real text: each validation input alone, then all of them
as one left-padded batch. Each output is judged the way its meaning asks:

    output               distribution over        figures
    last_hidden_state    -                        max |diff| / std of torch's values
    logits (classes)     labels                   mean KL(torch || ours), top-1 (label) agreement, max |diff| / std
    logits (tokens)      labels, per real token   same
    start/end_logits     the row's real tokens    same (a span's start and end)
    mc_logits            choices                  same
    logits (LM, double)  vocabulary, per token    same

Only real tokens count (a pad position's output means nothing). A top-1 disagreement where torch's own
probabilities of the two labels are within TOP1_TIE_PROBABILITY is a tie, not an error (random heads are flat).
"""

from __future__ import annotations

import numpy as np
import torch

from gptexport.graphs.precision import TOP1_TIE_PROBABILITY

from .heads import FlatHead
from .validate import PADDED_BATCH, VALIDATION_PROMPTS

TEXTS = VALIDATION_PROMPTS + PADDED_BATCH
# Named limits per precision, the scale of graphs/precision's QUALITY_LIMITS (KL, top-1, diff / std). Measured:
#                 GPT-2 124M random weights (bench/heads_bench.py prepare)      tiny heads (tests/test_heads.py)
#   float32       hidden 5.4e-6 x std; classifier KL 3.5e-14, 1.8e-6 x std       classifier KL 6e-16, 1e-6 x std
#   int8          hidden 0.090 x std;  classifier KL 4.0e-5, 0.034 x std, top-1 100 %
#   int4          (the heads' own MatMuls at 8 bits: exporter/heads.py HEAD_8BIT; a 4-bit 3-label score: KL 0.021)
HEAD_LIMITS = {
    "float32": {"kl_mean": 1e-6, "top1_agreement": 1.0, "max_abs_diff_over_std": 2e-3},
    "float16": {"kl_mean": 1e-4, "top1_agreement": 0.99, "max_abs_diff_over_std": 0.05},
    "int8": {"kl_mean": 2e-3, "top1_agreement": 0.95, "max_abs_diff_over_std": 0.5},
    "int4": {"kl_mean": 0.02, "top1_agreement": 0.9, "max_abs_diff_over_std": 2.0},
}
# what each output's last axis is, for the distribution figures (None: no distribution, values only)
_AXIS = {("feature-extraction", "last_hidden_state"): None, ("text-classification", "logits"): "labels",
         ("token-classification", "logits"): "labels", ("question-answering", "start_logits"): "tokens",
         ("question-answering", "end_logits"): "tokens", ("multiple-choice", "logits"): "vocabulary",
         ("multiple-choice", "mc_logits"): "choices"}


def _cases(model, tokenizer, task: str) -> list[dict]:
    """The validation inputs as feeds: each text alone, then all as one left-padded batch (multiple-choice: the
    texts are the choices of one question, alone as one choice each, then together)."""
    rows = [tokenizer.encode(t).ids for t in TEXTS]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else \
        (model.config.eos_token_id if model.config.eos_token_id is not None else 0)
    cases = [[r] for r in rows] + [rows]
    feeds = []
    for group in cases:
        width = max(len(r) for r in group)
        ids = np.full((len(group), width), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(group):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        if task == "multiple-choice":
            feeds.append({"input_ids": ids[None], "attention_mask": mask[None],
                          "mc_token_ids": np.full((1, len(group)), width - 1, dtype=np.int64)})
        else:
            feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def _real(task: str, name: str, mask: np.ndarray, value: np.ndarray) -> list[np.ndarray]:
    """The real rows of `value` as 2-D blocks (rows, last axis) for its figures; rows of a block share a width."""
    if (task, name) in (("text-classification", "logits"), ("multiple-choice", "mc_logits")):
        return [value.reshape(-1, value.shape[-1])]  # one per text / per question
    if task == "question-answering":  # (B, T): a distribution over each row's real tokens
        return [value[b, mask[b].astype(bool)][None] for b in range(len(value))]
    keep = mask.reshape(-1).astype(bool)
    return [value.reshape(-1, value.shape[-1])[keep]]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def _figures(ref: list[np.ndarray], ours: list[np.ndarray], distribution: bool) -> dict:
    """Worst |difference| in units of torch's spread; with `distribution`, KL and top-1 of each row's softmax."""
    diff = max(float(np.abs(o - r).max()) for r, o in zip(ref, ours))
    std = float(np.concatenate([r.reshape(-1) for r in ref]).std())
    out = {"max_abs_diff": diff, "std": std, "max_abs_diff_over_std": diff / max(std, 1e-12)}
    if not distribution:
        return out
    kls, same, excused = [], [], []
    for r, o in zip(ref, ours):
        lr, lo = _log_softmax(r), _log_softmax(o)
        pr, rows = np.exp(lr), np.arange(len(lr))
        kls.append((pr * (lr - lo)).sum(-1).clip(min=0.0))
        top_r, top_o = lr.argmax(-1), lo.argmax(-1)
        same.append(top_r == top_o)
        excused.append(pr[rows, top_r] - pr[rows, top_o] <= TOP1_TIE_PROBABILITY)
    kl, same, excused = np.concatenate(kls), np.concatenate(same), np.concatenate(excused)
    out.update({"rows": int(len(kl)), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                "top1_agreement": float((same | excused).mean()), "top1_agreement_strict": float(same.mean())})
    return out


def judge(checks: dict, dtype: str) -> list[str]:
    """The checks that fail the precision's limits, each naming the output and its figures."""
    limits, failed = HEAD_LIMITS[dtype], []
    for name, c in checks.items():
        if c["max_abs_diff_over_std"] > limits["max_abs_diff_over_std"]:
            failed.append(f"{name}: max abs diff {c['max_abs_diff']:.3g} = {c['max_abs_diff_over_std']:.3g} x its "
                          f"std, above the {dtype} limit {limits['max_abs_diff_over_std']:g}")
        if "kl_mean" in c and c["kl_mean"] > limits["kl_mean"]:
            failed.append(f"{name}: mean KL {c['kl_mean']:.3g} above the {dtype} limit {limits['kl_mean']:g}")
        if "top1_agreement" in c and c["top1_agreement"] < limits["top1_agreement"]:
            failed.append(f"{name}: top-1 agreement {c['top1_agreement']:.4f} below the {dtype} limit "
                          f"{limits['top1_agreement']:g}")
    return failed


def validate_head(loaded, artifact_dir, manifest: dict, dtype: str) -> dict:
    """The manifest's `validation` of a head artifact: figures per output, limits, failed checks, passed."""
    from gptexport.runtime.heads import load_head

    task = loaded.task
    artifact = load_head(artifact_dir, verify="size", manifest=manifest)
    wrapper = FlatHead(loaded.model, task).eval()
    feeds = _cases(loaded.model, loaded.tokenizer, task)
    names = [o.name for o in artifact.session.get_outputs()]
    ref, ours = {n: [] for n in names}, {n: [] for n in names}
    for feed in feeds:
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(feed[k]) for k in feed))
        got = artifact.run(feed)
        for name, r in zip(names, expected):
            ref[name] += _real(task, name, feed["attention_mask"], r.float().numpy())
            ours[name] += _real(task, name, feed["attention_mask"], got[name])
    checks = {n: _figures(ref[n], ours[n], _AXIS[(task, n)] is not None) for n in names}
    failed = judge(checks, dtype)
    summary = [f"{n} " + (f"mean KL {c['kl_mean']:.2g}, top-1 {c['top1_agreement'] * 100:.1f} %, " if "kl_mean" in c
                          else "") + f"max abs diff {c['max_abs_diff']:.3g} ({c['max_abs_diff_over_std']:.2g} x std)"
               for n, c in checks.items()]
    return {"reference": "torch float32 (transformers eager), position ids from the mask",
            "method": f"task {task}: {len(TEXTS)} texts alone, then as one left-padded batch",
            "head_checks": checks, "summary": summary, "limits": HEAD_LIMITS[dtype], "failed_checks": failed,
            "passed": not failed}
