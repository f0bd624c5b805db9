"""Perplexity of an artifact on text, and its next-token distributions against a reference artifact's.

The sliding-window method of transformers' perplexity guide: windows of `window` tokens advance by `stride`; each
window scores only the tokens the previous one did not, with the rest of the window as context; a window's first
token is never scored (nothing predicts it). With stride < window every token but a text's first is scored once.

```
 tokens   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        window 6, stride 3
 window 1 [t0 t1 t2 t3 t4 t5]                  scores t1..t5
 window 2          [t3 t4 t5 t6 t7 t8]         scores t6..t8 (t3..t5 context)
 window 3                   [t6 t7 t8 t9]      scores t9
```

With a reference (llama.cpp's perplexity tool in its KL-divergence mode), both artifacts run on the same windows
and, at every scored token, KL(reference || model) of the two next-token distributions, whether their top-1
tokens agree, and the ratio of the two perplexities are recorded.

numpy + onnxruntime + tokenizers only, like the rest of the runtime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import GptexportError

_ROWS = 64  # log-softmax in blocks of this many positions: (64, 50257) float64 is 26 MB


class EvaluationError(GptexportError, ValueError):
    """A perplexity argument (window, stride, text, reference) is invalid."""


@dataclass
class TextScore:
    name: str
    tokens: int  # scored
    nll: float  # summed negative log-likelihood, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass
class PerplexityResult:
    """What `perplexity` measured. `kl` is None without a reference.

    kl: mean, median, p99, p99.9 and max of KL(reference || model) per token (nats), top1_agreement (fraction
    of scored tokens where both argmaxes agree), reference_perplexity and perplexity_ratio (model / reference).
    """

    window: int
    stride: int
    texts: list = field(default_factory=list)  # TextScore per input text
    kl: dict | None = None

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.texts)

    @property
    def nll(self) -> float:
        return sum(t.nll for t in self.texts)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "nll": self.nll, "window": self.window,
                "stride": self.stride,
                "texts": [{**asdict(t), "perplexity": t.perplexity} for t in self.texts], "kl": self.kl}


def windows(n_tokens: int, window: int, stride: int):
    """(begin, end, scored) per window of the sliding-window method: tokens [end - scored, end) are scored."""
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = min(end - previous_end, end - begin - 1)  # a window's first token is only context
        if scored > 0:
            yield begin, end, scored
        previous_end = end
        if end == n_tokens:
            break


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_logits(model, ids: np.ndarray, scored: int) -> np.ndarray:
    """The logits (scored, vocab) that predict the last `scored` tokens of the window `ids` (T,), no past.

    The default graph computes every position in one pass. The shared_buffer graph returns only each step's last
    position, so it prefills the context and then decodes the scored tokens one at a time (same logits, slower).
    """
    decoder, n = model.decoder, len(ids)
    row = ids[None].astype(np.int64)  # (1, T)
    if not decoder.shared:
        cache = decoder.new_cache(1)
        logits = decoder.step(row, np.ones_like(row), np.arange(n, dtype=np.int64)[None], cache)  # (1, T, V)
        return logits[0, n - scored - 1:n - 1]
    context = n - scored
    cache = decoder.new_cache(1, capacity=n)
    # .copy(): a shared_buffer step's logits are its IO binding's array, overwritten by the cache's next step
    out = [decoder.step(row[:, :context], np.ones((1, context), np.int64),
                        np.arange(context, dtype=np.int64)[None], cache)[0, -1].copy()]
    for t in range(context, n - 1):
        out.append(decoder.step(row[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]], np.int64),
                                cache)[0, -1].copy())
    return np.stack(out)


def _check_args(model, window, stride) -> tuple[int, int]:
    limit = model.max_positions
    window = limit if window is None else window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 2 <= window <= limit:
        raise EvaluationError(f"window must be an integer from 2 to the model's {limit} positions, got {window!r}")
    stride = max(1, window // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= window:
        raise EvaluationError(f"stride must be an integer from 1 to the window ({window}), got {stride!r}")
    return int(window), int(stride)


def _check_reference(model, reference) -> None:
    ours, theirs = model.manifest["config"]["vocab_size"], reference.manifest["config"]["vocab_size"]
    if ours != theirs:
        raise EvaluationError(f"the reference's vocabulary has {theirs} tokens, the model's {ours}: KL divergence "
                              "needs two artifacts of the same model")
    if model.tokenizer.to_str() != reference.tokenizer.to_str():
        raise EvaluationError("the reference's tokenizer.json differs from the model's: the two would not score "
                              "the same tokens")


def _as_model(value, provider: str):
    if hasattr(value, "decoder"):
        return value
    from .model import load

    return load(value, provider=provider)


def perplexity(model, texts, window: int | None = None, stride: int | None = None, reference=None,
               names=None, provider: str = "cpu") -> PerplexityResult:
    """Sliding-window perplexity of `model` on `texts`, and its KL divergence against `reference`.

    Args:
        model: a loaded `Model` or an artifact directory.
        texts: a str or a list of str, each scored on its own (a text's first token is never scored).
        window: tokens per window (default: the model's max positions).
        stride: tokens a window advances (default: window // 2, as in transformers' guide).
        reference: a `Model` or artifact directory of the same model (e.g. the fp32 export): adds `kl`.
        names: a name per text for the report (default text0, text1...).
        provider: "cpu" or "cuda" when paths are given.
    Returns:
        PerplexityResult.
    Raises:
        EvaluationError: a bad window/stride, a reference with another vocabulary or tokenizer, or texts with
            no token to score.
        ArtifactError, ProviderError: as `runtime.load`.
    """
    model = _as_model(model, provider)
    texts = [texts] if isinstance(texts, str) else list(texts)
    names = list(names) if names is not None else [f"text{i}" for i in range(len(texts))]
    if not texts or any(not isinstance(t, str) for t in texts) or len(names) != len(texts):
        raise EvaluationError("texts must be a str or a non-empty list of str (with one name each)")
    window, stride = _check_args(model, window, stride)
    if reference is not None:
        reference = _as_model(reference, provider)
        _check_reference(model, reference)
    result = PerplexityResult(window, stride)
    kl_values, agree = [], 0
    ref_nll = 0.0
    for name, text in zip(names, texts):
        ids = np.asarray(model.tokenizer.encode(text).ids, dtype=np.int64)
        score = TextScore(name, 0, 0.0)
        for begin, end, scored in windows(len(ids), window, stride):
            chunk, targets = ids[begin:end], ids[end - scored:end]
            logits = window_logits(model, chunk, scored)
            ref_logits = window_logits(reference, chunk, scored) if reference is not None else None
            for r in range(0, scored, _ROWS):  # bounded memory: (_ROWS, vocab) at a time
                logp = _log_softmax(logits[r:r + _ROWS])
                rows = np.arange(len(logp))
                score.nll -= float(logp[rows, targets[r:r + _ROWS]].sum())
                if ref_logits is not None:
                    ref_logp = _log_softmax(ref_logits[r:r + _ROWS])
                    ref_nll -= float(ref_logp[rows, targets[r:r + _ROWS]].sum())
                    kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
                    kl_values.append(np.maximum(kl, 0.0))  # rounding can make an exact 0 slightly negative
                    agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            score.tokens += scored
        result.texts.append(score)
    if result.tokens == 0:
        raise EvaluationError("no token to score: every text has fewer than 2 tokens")
    if reference is not None:
        kl = np.concatenate(kl_values)
        ref_ppl = math.exp(ref_nll / result.tokens)
        result.kl = {"mean": float(kl.mean()), "median": float(np.median(kl)),
                     "p99": float(np.percentile(kl, 99)), "p99_9": float(np.percentile(kl, 99.9)),
                     "max": float(kl.max()), "top1_agreement": agree / result.tokens,
                     "reference_perplexity": ref_ppl, "perplexity_ratio": result.perplexity / ref_ppl}
    return result


__all__ = ["EvaluationError", "PerplexityResult", "TextScore", "perplexity", "windows", "window_logits"]
