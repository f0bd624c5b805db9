"""Next-token selection in numpy, matching transformers' logits processors.

Order and semantics follow `GenerationMixin._get_logits_processor`: repetition penalty and min_new_tokens
(processors, applied in greedy and sampling), then temperature, top_k, top_p (warpers, sampling only), then softmax
and a draw. Every function works on a (batch, vocab) float array; randomness comes from one
`numpy.random.Generator`, so a seed reproduces a run exactly.
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """Validated generation settings; build with `SamplingParams.create`."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (no sampling, or sampling at temperature 0)."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def create(cls, max_new_tokens, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
               repetition_penalty=1.0) -> "SamplingParams":
        """Validate and build.

        Raises:
            GenerationError: one line naming the bad value and what is accepted.
        """
        if not isinstance(do_sample, (bool, np.bool_)):
            raise GenerationError(f"do_sample must be True or False, got {do_sample!r}")
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("min_new_tokens", min_new_tokens, 0)
        if min_new_tokens > max_new_tokens:
            raise GenerationError(f"min_new_tokens must be <= max_new_tokens ({max_new_tokens}), "
                                  f"got {min_new_tokens}")
        temperature = _check_float("temperature", temperature)
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        _check_int("top_k", top_k, 0)
        top_p = _check_float("top_p", top_p)
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        repetition_penalty = _check_float("repetition_penalty", repetition_penalty)
        if repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        return cls(int(max_new_tokens), int(min_new_tokens), bool(do_sample), temperature, int(top_k), top_p,
                   repetition_penalty)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise GenerationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value) -> float:
    try:  # float() of a huge int overflows; np.isfinite of one beyond int64 raises TypeError
        number = float(value) if isinstance(value, (int, float, np.integer, np.floating)) else math.nan
    except OverflowError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    return number


def apply_repetition_penalty(logits: np.ndarray, seen: list, penalty: float) -> np.ndarray:
    """Penalise tokens already in each row (prompt included): positive logits / penalty, negative * penalty.

    Args:
        logits: (batch, vocab) scores, modified copy returned.
        seen: per row, the token ids seen so far (any iterable of ints; duplicates are harmless).
        penalty: > 0; 1.0 is a no-op.
    Returns:
        The penalised (batch, vocab) scores.
    """
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, ids in enumerate(seen):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        score = out[row, ids]
        with np.errstate(over="ignore", divide="ignore"):  # an extreme penalty saturates at +-inf or 0
            out[row, ids] = np.where(score < 0, score * penalty, score / penalty)
    return out


def suppress_eos(logits: np.ndarray, eos_token_id, generated: int, min_new_tokens: int) -> np.ndarray:
    """Forbid end-of-sequence until `min_new_tokens` tokens have been generated.

    Args:
        logits: (batch, vocab) scores.
        eos_token_id: the id to suppress (None: nothing to do).
        generated: tokens generated so far.
        min_new_tokens: the minimum.
    Returns:
        Scores with eos at -inf while `generated < min_new_tokens`.
    """
    if eos_token_id is None or generated >= min_new_tokens:
        return logits
    out = logits.copy()
    out[:, eos_token_id] = -np.inf
    return out


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep every token scoring at least the k-th best (ties kept, as transformers); 0 disables.

    Args:
        logits: (batch, vocab) scores.
        top_k: k >= 0.
    Returns:
        Scores with the others at -inf.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]  # (B, 1)
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of top tokens whose probability sums to >= top_p (at least one).

    Same rule as transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p.

    Args:
        logits: (batch, vocab) scores.
        top_p: in (0, 1]; 1.0 disables.
    Returns:
        Scores with the others at -inf.
    """
    if top_p >= 1.0:
        return logits
    kept = np.isfinite(logits)
    if kept.all(axis=-1).any() or not kept.any(axis=-1).all():
        return _top_p_rows(logits, top_p)
    # After top_k most of the vocabulary is already -inf: its probability is 0, so it adds nothing to the
    # cumulative sum; sorting only the candidates of each row gives the same cut ~1000x cheaper for k = 50.
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        idx = np.flatnonzero(kept[row])
        out[row, idx] = _top_p_rows(logits[row, idx][None, :], top_p)[0]
    return out


def _top_p_rows(logits: np.ndarray, top_p: float) -> np.ndarray:
    """apply_top_p on whole (B, V) rows: one stable ascending sort per row."""
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, (B, V)
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -1] = False  # always keep the best token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (-inf entries get probability 0).

    Never NaN: NaN scores count as -inf, a row with +inf scores (e.g. an extreme repetition penalty overflowed)
    shares its mass among them, and a row with nothing finite is uniform.
    """
    x = np.where(np.isnan(logits), -np.inf, logits.astype(np.float64))
    top = np.max(x, axis=-1, keepdims=True)
    if not np.isfinite(top).all():
        x = np.where(np.isposinf(top), np.where(np.isposinf(x), 0.0, -np.inf), x)
        x = np.where(np.isneginf(top), 0.0, x)
        top = np.max(x, axis=-1, keepdims=True)
    x = x - top
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one token per row from (batch, vocab) probabilities, one uniform number per row.

    Returns:
        (batch,) int64 token ids.
    """
    cumulative = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cumulative[:, -1]
    ids = np.array([np.searchsorted(c, x, side="right") for c, x in zip(cumulative, u)], dtype=np.int64)
    return np.minimum(ids, probs.shape[-1] - 1)


def next_token_probs(logits: np.ndarray, params: SamplingParams, seen: list, generated: int,
                     eos_token_id) -> np.ndarray:
    """The distribution a sampling step draws from: processors, then warpers, then softmax.

    Args:
        logits, seen, generated, eos_token_id: as `next_tokens`.
        params: validated settings with do_sample (temperature > 0).
    Returns:
        (batch, vocab) float64 probabilities, exactly 0 outside the kept tokens.
    """
    return softmax(_warp(_process(logits, params, seen, generated, eos_token_id), params))


def _process(logits, params, seen, generated, eos_token_id) -> np.ndarray:
    """transformers' processors (greedy and sampling): repetition penalty, then min_new_tokens."""
    scores = logits.astype(np.float32, copy=False)
    scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    return suppress_eos(scores, eos_token_id, generated, params.min_new_tokens)


def _warp(scores, params) -> np.ndarray:
    """transformers' warpers (sampling only): temperature, then top_k, then top_p."""
    if params.temperature != 1.0:  # shifted by the max first, so a tiny temperature gives -inf, never inf or NaN
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            top = np.max(scores, axis=-1, keepdims=True)
            scores = (scores - np.where(np.isfinite(top), top, 0)) / np.float64(params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


def next_tokens(logits: np.ndarray, params: SamplingParams, seen: list, generated: int, eos_token_id,
                rng: np.random.Generator) -> np.ndarray:
    """Choose each row's next token from the last position's logits.

    Args:
        logits: (batch, vocab) scores of the last position.
        params: validated settings.
        seen: per row, the ids so far (prompt without padding + generated), for the repetition penalty.
        generated: how many tokens have been generated before this one.
        eos_token_id: for min_new_tokens.
        rng: the random source (unused when greedy).
    Returns:
        (batch,) int64 token ids.
    """
    if params.greedy and params.repetition_penalty == 1.0:
        return _greedy_without_copy(logits, eos_token_id, generated < params.min_new_tokens)
    if params.greedy:
        return np.argmax(_process(logits, params, seen, generated, eos_token_id), axis=-1).astype(np.int64)
    return _draw(_process(logits, params, seen, generated, eos_token_id), params, rng)


def next_tokens_each(logits: np.ndarray, params: list, seen: list, generated: list, eos_token_ids: list,
                     rngs: list) -> np.ndarray:
    """Choose the next token of rows that each have their own settings (the server's running batch).

    Row i gets exactly what `next_tokens(logits[i:i+1], params[i], [seen[i]], generated[i], eos_token_ids[i],
    rngs[i])` gives (the same draw from its own Generator). The greedy rows without a repetition penalty (the usual
    case) take one argmax over the batch; the others are chosen row by row: their cost is per element, not per call
    (a (16, vocab) pass costs 16 single-row ones), and each draws from its own Generator anyway.

    Args:
        logits: (batch, vocab) scores of the last position.
        params, seen, generated, eos_token_ids, rngs: one per row, as `next_tokens`' arguments.
    Returns:
        (batch,) int64 token ids.
    """
    tokens = np.empty(len(params), dtype=np.int64)
    plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    if plain:
        tokens[plain] = np.argmax(logits if len(plain) == len(params) else logits[plain], axis=-1)
    for i in plain:  # eos still forbidden (min_new_tokens) and chosen: as _greedy_without_copy
        if tokens[i] == eos_token_ids[i] and generated[i] < params[i].min_new_tokens:
            tokens[i] = _greedy_without_copy(logits[i:i + 1], eos_token_ids[i], True)[0]
    for i in sorted(set(range(len(params))) - set(plain)):
        tokens[i] = next_tokens(logits[i:i + 1], params[i], [seen[i]], generated[i], eos_token_ids[i], rngs[i])[0]
    return tokens


def _draw(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """`sample(softmax(_warp(scores, params)), rng)`, the same draw, computed on each row's kept tokens only.

    After top_k (and the -inf that the processors set) most of the vocabulary has probability exactly 0, so every
    full-vocabulary pass of the warpers, the softmax and the cumulative sum was spent on zeros (2.6 ms a row at
    top_k 50 on GPT-2's 50k vocabulary; about 0.3 ms here). The result is bit for bit the same: the elementwise
    steps are the same operations on the same values; the softmax's sum runs over the full row (zeros in place),
    in numpy's own order; a cumulative sum over the kept tokens equals the full one at each of them (adding 0.0
    changes nothing), so the first one past the uniform draw is the one `sample` finds. A row with NaN or +inf
    scores, or nothing finite, takes the general path, as does a row that nothing filters (top_k 0, all finite).

    Args:
        scores: (batch, vocab) processed scores (`_process`).
        params: sampling settings (temperature > 0).
        rng: the Generator; draws one uniform number per row, as `sample`.
    Returns:
        (batch,) int64 token ids.
    """
    vocab = scores.shape[-1]
    u = rng.random(scores.shape[0])  # (B,): what sample draws
    out = np.empty(scores.shape[0], dtype=np.int64)
    for row in range(scores.shape[0]):
        kept = _kept(scores[row], params)
        if kept is None:  # the general path for this row
            cumulative = np.cumsum(softmax(_warp(scores[row:row + 1], params))[0])
            out[row] = min(int(np.searchsorted(cumulative, u[row] * cumulative[-1], side="right")), vocab - 1)
            continue
        ids, values = kept
        x = values.astype(np.float64)
        e = np.exp(x - x.max())
        full = np.zeros((1, vocab))  # softmax's denominator: the same sum over the same (1, vocab) row
        full[0, ids] = e
        cumulative = np.cumsum(e / np.sum(full, axis=-1)[0])
        j = int(np.searchsorted(cumulative, u[row] * cumulative[-1], side="right"))
        out[row] = ids[j] if j < len(ids) else vocab - 1
    return out


def _kept(scores: np.ndarray, params: SamplingParams):
    """The tokens a sampling row keeps after `_warp` (ids ascending) and their warped scores, or None when the
    row has NaN or +inf scores or nothing finite (then only the general path has the right answer), or when
    top_k keeps everything and no score is -inf (then the general path is as cheap)."""
    top = scores.max()
    if not np.isfinite(top):
        return None
    x = scores
    if params.temperature != 1.0:  # as _warp (the max is finite here)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = (scores - top) / np.float64(params.temperature)
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:  # as apply_top_k: every token scoring at least the k-th best
        kth = np.partition(x, vocab - params.top_k)[vocab - params.top_k]
        ids = np.flatnonzero(x >= kth) if kth > -np.inf else np.flatnonzero(x > -np.inf)
    elif x.min() > -np.inf:  # nothing filtered: the general path is the cheaper one (no gather, no scatter)
        return None
    else:
        ids = np.flatnonzero(x > -np.inf)
    values = x[ids]
    if params.top_p < 1.0:  # as apply_top_p: one row's candidates (all of them when the row is all finite)
        values = _top_p_rows(values[None, :], params.top_p)[0]
        keep = values > -np.inf
        ids, values = ids[keep], values[keep]
    return ids, values


def _greedy_without_copy(logits: np.ndarray, eos_token_id, forbid_eos: bool) -> np.ndarray:
    """argmax of suppress_eos(logits) without copying the (B, vocab) scores: where the plain argmax is not eos it is
    also the argmax with eos at -inf (the first maximum; eos was not it); only rows that chose eos are redone."""
    tokens = np.argmax(logits, axis=-1).astype(np.int64)  # (B,)
    if not forbid_eos or eos_token_id is None:
        return tokens
    for row in np.flatnonzero(tokens == eos_token_id):
        scores = logits[row].astype(np.float32)  # one row's copy
        scores[eos_token_id] = -np.inf
        tokens[row] = int(np.argmax(scores))
    return tokens
