"""Speculative decoding: draft several tokens cheaply, check them all in one graph call, keep what the model agrees
with. The output is the plain loop's: greedy token for token, sampling in distribution.

```
 round:  drafts d1..dn per row (prompt lookup: an n-gram of the text so far; or a draft model, n steps)
         target step on [t, d1..dn] (B, 1+n) ──▶ logits (B, 1+n, vocab)      t: the last emitted token
         j = 0..n: the target's own choice c_j at position j is emitted; d_{j+1} is accepted while it equals c_j
                   (sampling: the speculative sampling rule, Leviathan et al. 2023 / Chen et al. 2023)
         each row keeps t, d1..da in the cache (a accepted), the rest is dropped; c_a is the next round's t
```

A round emits 1 + a tokens per row for one call of the target, which reads its weights once: at the memory
bandwidth roof that is the whole cost of a step, so accepted drafts are close to free.

Rows of a batch accept different counts. Every model's cache is driven through a `_Tape`: `extend` feeds S
right-padded tokens per row, `keep(kept)` keeps the first kept[b] of them. The default ("concat") graph cuts the
cache at the longest row's kept length and masks the rest of each row out (a zero in attention_mask: the graphs
take holes, and their positions come from the count of real tokens); the shared_buffer graph rewinds each row's
length, and the next write overwrites what was dropped.

onnxruntime's GroupQueryAttention (the shared_buffer graph's attention) takes several new tokens after a past at
batch 1 only ("batch_size must be 1 when sequence_length > 1 and past context is given": its input check, which
has no other input form for it on CPU). So at batch > 1 a shared_buffer round checks its drafts row by row: each
row runs alone on its own row of the cache buffers (bound by pointer: `SharedKVCache.bind_row`), fed its own
real tokens only, and finished rows are not run. When few rows have drafts, every row's first token goes in one
batched step and only the drafting rows run alone after it.

```
 batch B, shared_buffer:  rows with drafts R >= B-1:  one call per live row b on [t, d1..dn_b] (1, 1+n_b)
                          R <= B-2:                   one call (B, 1) on every t, then one per drafting row on
                                                      [d1..dn_b] (1, n_b)
```

Speculation backs off when it does not pay (`_Schedule`): K follows transformers' heuristic for assisted
generation (+2 when every draft was accepted, -1 otherwise), and a round with nothing accepted pauses speculation
for 1, 2, 4 .. 32 plain steps, so text the drafts cannot predict costs little more than plain decoding. Every
round is timed whole (drafting and the draft's catch-up, checking, the choices, the caches' bookkeeping), and so
are the plain rounds of the same call, which run the plain loop's own step: a round that took longer than the
plain rounds that emit as many tokens did not pay either, and pauses until what it lost is 5 % of the plain time
since. When not even every draft accepted would have paid, it is the draft's cost (a draft model too slow for
its target on this machine: on CPU both are often bound by the same 50k-wide output layer), and a verdict kept
on the target for that draft and batch size holds later calls plain too, probing again rarely (twice as rarely
after each failed probe); the draft's prefill waits for its first round, so such calls never pay it. A batch
checked row by row costs a call per drafting row, so there every row drafts only while that is measured to pay
(`_RowSchedule`): otherwise one row probes now and then, between plain steps.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

import numpy as np

from .errors import GenerationError
from .kv import SharedKVCache

from .sampling import SamplingParams, next_token_probs, next_tokens, next_tokens_each, sample

INDEX_DIM = "batch_x_positions"  # graphs/shared_kv.py (the runtime does not import graphs)

PROMPT_LOOKUP = "prompt_lookup"
DEFAULT_SPECULATIVE_TOKENS = 5  # K with a draft model (transformers' assisted generation starts at 5)
DEFAULT_LOOKUP_TOKENS = 10  # K with prompt lookup, whose drafts cost nothing (transformers' default is 10 too)
MAX_SPECULATIVE_TOKENS = 64
NGRAM_SIZES = (3, 2, 1)  # prompt lookup: the longest suffix of the text that occurred before wins
MAX_PAUSE = 32  # plain steps at most between two rounds that accepted nothing
PROBE_LOSS = 0.05  # rounds that do not pay may cost this share of the plain decoding between them (`_probe_pause`)
MAX_COST_PAUSE = 4096  # plain steps at most between two probes of a draft too slow for its target (`_Verdict`)
_clock = time.perf_counter  # what times the rounds (tests freeze it: every round then pays)


# -- drafts ------------------------------------------------------------------------------------------------------

class NgramIndex:
    """Prompt lookup for one sequence: where each n-gram (n in NGRAM_SIZES) last occurred, updated as ids arrive.

    `propose(k)` finds the longest suffix of the ids that occurred before (its latest earlier occurrence) and
    proposes the k ids that followed it: a dict lookup per n, not a scan of the text. When fewer than k ids follow
    it (the occurrence is the text's last period: the text is looping, as greedy decoding often does), the copy
    goes on into the drafts themselves, so a loop of period p is drafted k ids ahead, not p.
    """

    def __init__(self, ids: list):
        self.ids = list(ids)
        self.follows = {n: {} for n in NGRAM_SIZES}  # n -> n-gram -> index of the id after its latest occurrence
        self.indexed = 0  # n-grams ending before ids[indexed] are in `follows`

    def append(self, token: int) -> None:
        self.ids.append(token)

    def propose(self, k: int) -> list:
        """Up to k ids that followed the latest earlier occurrence of the longest matching suffix ([] if none)."""
        ids, end = self.ids, len(self.ids) - 1
        for i in range(max(self.indexed, 1), end):  # n-grams ending at i-1 (the suffix itself is not indexed)
            for n in NGRAM_SIZES:
                if i >= n:
                    self.follows[n][tuple(ids[i - n:i])] = i
        self.indexed = max(self.indexed, end)
        for n in NGRAM_SIZES:
            if len(ids) > n:
                at = self.follows[n].get(tuple(ids[-n:]))
                if at is not None:
                    period = len(ids) - at  # ids[at:] then what it drafts: ids[at + j] is ids[at + j - period]
                    return [ids[at + j % period] for j in range(k)]
        return []


class PromptLookup:
    """Drafts from the text itself (prompt and generated ids); the draft distribution is a point mass."""

    def __init__(self, seen: list):
        self.index = [NgramIndex(ids) for ids in seen]
        self.shadows = [None] * len(seen)  # per row: (drafts, where they start) not checked by the target
        self.gains = {}  # row -> tokens a round would have emitted, found since the last `take_gains`

    def take_setup(self) -> float:
        return 0.0  # nothing to set up

    def propose(self, counts: list, params: SamplingParams, rng):
        """Up to counts[b] drafts per row: (id lists, None: point masses)."""
        return [self.index[b].propose(k) if k else [] for b, k in enumerate(counts)], None

    def shadow(self, k: int, rows) -> None:
        """Draft k ids for each of `rows` without checking them: the tokens the target emits next say how many
        a round would have accepted (`take_gains`). Free for prompt lookup, so a batch checked row by row
        knows each row's gain without paying a call for it."""
        for b in rows:
            if self.shadows[b] is None:
                drafts = self.index[b].propose(k)
                if drafts:
                    self.shadows[b] = (drafts, len(self.index[b].ids))

    def accepted(self, emitted: list) -> None:
        """Each row's ids emitted this round, in order."""
        for b, (index, ids) in enumerate(zip(self.index, emitted)):
            for token in ids:
                index.append(token)
            if self.shadows[b] is not None:
                drafts, at = self.shadows[b]
                got = index.ids[at:at + len(drafts)]
                agreed = next((j for j, (d, t) in enumerate(zip(drafts, got)) if d != t), len(got))
                if agreed < len(got) or len(got) == len(drafts):  # decided: a mismatch, or all of them matched
                    self.gains[b] = 1 + agreed
                    self.shadows[b] = None

    def take_gains(self) -> dict:
        gains, self.gains = self.gains, {}
        return gains


class DraftModel:
    """A smaller artifact with the same tokenizer drafts k tokens by decoding them with its own cache.

    Its cache follows the target's text: a round first feeds what the draft has not seen (`pending`: the ids the
    target emitted since, which the draft did not draft and keep), then decodes k drafts; `accepted` rewinds the
    drafts the target rejected. The draft's prefill waits for its first round (a call that never speculates, the
    draft being known not to pay, never pays it); `take_setup` says how long it took.
    """

    def __init__(self, model, input_ids: np.ndarray, mask: np.ndarray, capacity: int, seen: list):
        self.model = model
        self.tape, self.prompt, self.capacity = None, (input_ids, mask), capacity
        self.setup_s = 0.0  # the prefill's seconds, not yet taken by `take_setup`
        self.pending = [[] for _ in seen]  # per row: ids the draft's cache has not seen yet
        self.seen = [list(ids) for ids in seen]  # the draft's repetition-penalty view (its drafts included)
        self.fed = 0  # drafts of the last round that went into the draft's cache

    def take_setup(self) -> float:
        """Seconds the draft's prefill took since the last call (0 when it did not run)."""
        setup, self.setup_s = self.setup_s, 0.0
        return setup

    def _start(self) -> None:
        """The draft's cache and its prefill on the prompt (what was emitted since is `pending`)."""
        began = _clock()
        input_ids, mask = self.prompt
        self.tape = _Tape(self.model.decoder, len(input_ids), self.capacity, self.model.max_positions)
        self.tape.prefill(input_ids, mask)
        self.setup_s += _clock() - began

    def propose(self, counts: list, params: SamplingParams, rng):
        """Up to counts[b] drafts per row, and the distributions they were drawn from (None when greedy)."""
        if self.tape is None:
            self._start()
        batch, k = len(counts), max(counts)
        lengths = [max(len(p), 1) for p in self.pending]  # a row with nothing pending is fed one padding id
        feed = np.full((batch, max(lengths)), self.model.pad_token_id, dtype=np.int64)  # (B, P) right-padded
        for b, ids in enumerate(self.pending):
            feed[b, :len(ids)] = ids
        logits = self.tape.extend(feed, lengths, all_logits=False)[:, 0, :]  # (B, V) after each row's last
        self.tape.keep([len(p) for p in self.pending])
        self.pending = [[] for _ in counts]
        drafts, dists = [[] for _ in counts], None if params.greedy else [[] for _ in counts]
        for j in range(k):
            if params.greedy:
                chosen = next_tokens(logits, params, self.seen, 0, None, rng)  # (B,)
            else:
                probs = next_token_probs(logits, params, self.seen, 0, None)  # (B, V)
                chosen = sample(probs, rng)
            for b, token in enumerate(chosen.tolist()):
                if j < counts[b]:
                    drafts[b].append(token)
                    if dists is not None:
                        dists[b].append(probs[b])
            if j + 1 < k:  # the last draft is not fed: the target's verdict decides what comes next
                logits = self.tape.extend(chosen[:, None], [1] * batch, all_logits=False)[:, 0, :]
                self.tape.keep([1] * batch)
                for ids, token in zip(self.seen, chosen.tolist()):
                    ids.append(token)
        self.fed = max(k - 1, 0)
        return drafts, dists

    def accepted(self, emitted: list) -> None:
        """Each row's ids emitted this round (accepted drafts, then the target's own): rewind the draft's cache to
        the accepted drafts it holds, and queue the rest."""
        keep = []
        for b, ids in enumerate(emitted):
            held = min(max(len(ids) - 1, 0), self.fed)  # accepted drafts the draft's cache already holds
            keep.append(held)
            self.seen[b] = self.seen[b][:len(self.seen[b]) - self.fed] + list(ids)
            self.pending[b] += ids[held:]
        if self.fed:
            self.tape.rewind(self.fed, keep)
        self.fed = 0


# -- one model's cache, both layouts -------------------------------------------------------------------------------

class _Tape:
    """A decoder and its cache, fed right-padded blocks of tokens of which each row keeps a prefix.

    Args:
        decoder: the artifact's Decoder.
        batch: rows.
        capacity: cache slots per row (shared_buffer).
        max_positions: the model's positions (a padding token's position is clipped below it).
    """

    def __init__(self, decoder, batch: int, capacity: int, max_positions: int):
        self.decoder, self.max_positions = decoder, max_positions
        self.cache = decoder.new_cache(batch, capacity=capacity)
        self.shared = isinstance(self.cache, SharedKVCache)
        self.mask = np.zeros((batch, 0), dtype=np.int64)  # concat: the attention mask of the cached columns
        self.real = np.zeros(batch, dtype=np.int64)  # real (unmasked) tokens per row: the next position
        self.width = 0  # tokens per row of the last `extend`, not yet kept
        self.fed = np.zeros(batch, dtype=np.int64)  # shared_buffer: tokens each row wrote in the last `extend`
        self.rowwise = self.shared and batch > 1  # several tokens a row are checked row by row (see the top)
        self.batched, self.row_calls = True, 0  # rowwise: the last extend's batched step and row calls

    def prefill(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The left-padded prompt (B, L); returns the last position's logits (B, 1, V)."""
        position_ids = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)  # (B, L)
        logits = self.decoder.step(input_ids, mask, position_ids, self.cache, logits_to_keep=1)
        self.mask, self.real = mask.copy(), mask.sum(axis=1).astype(np.int64)
        return logits

    def extend(self, tokens: np.ndarray, counts, all_logits: bool = True, live=None) -> np.ndarray:
        """Feed (B, S) tokens, row b's first counts[b] real (the rest padding: causally after them, so unseen by
        them). Follow with `keep`.

        Args:
            live: (B,) bools, rows whose logits are read (None: all); shared_buffer at batch > 1 does not run the
                others when it checks row by row (their cache does not grow; `keep` knows).
        Returns:
            (B, S, V) logits (a padding position's, or a row's that is not live, are meaningless); all_logits
            False: (B, 1, V), each row's at its last real token.
        """
        batch, width = tokens.shape
        positions = np.minimum(self.real[:, None] + np.arange(width), self.max_positions - 1)  # (B, S)
        last = np.asarray(counts, dtype=np.int64) - 1  # (B,)
        if self.rowwise and live is not None:  # a finished row's cache is scratch: a batched step writes its slot 0
            self.cache.lengths[~np.asarray(live, dtype=bool)] = 0  # (the plain loop's padding would grow it)
        self.batched, self.row_calls = True, 0
        if self.rowwise and width > 1 and all_logits:  # GroupQueryAttention: several new tokens at batch 1 only
            logits = self._extend_rows(tokens, positions, np.asarray(counts, dtype=np.int64), live)
        elif self.rowwise and width > 1 and width > _row_calls(np.asarray(counts), batch):
            # a draft's catch-up of many columns (after plain steps): fewer calls row by row
            logits = self._extend_rows(tokens, positions, np.asarray(counts, dtype=np.int64), live)
            logits = logits[np.arange(batch), last][:, None, :]  # (B, 1, V)
        elif self.rowwise and width > 1:  # a draft's catch-up of a few columns: one-token batched steps
            logits = np.stack([_shared_extend(self.decoder, self.cache, tokens[:, j:j + 1], positions[:, j:j + 1],
                                              np.zeros(batch, dtype=np.int64))[:, 0] for j in range(width)], axis=1)
            logits = logits[np.arange(batch), last][:, None, :]  # (B, 1, V)
            self.fed[:] = width
        elif self.shared and width == 1:  # a plain step: the plain loop's own (its request's decode binding)
            logits = self.decoder.step(tokens, None, positions, self.cache)  # (B, 1, V)
            self.fed[:] = 1
        elif self.shared:
            index = np.broadcast_to(np.arange(width), (batch, width)) if all_logits else last
            logits = _shared_extend(self.decoder, self.cache, tokens, positions, index)
            self.fed[:] = width
        else:
            mask = np.concatenate([self.mask, np.ones((batch, width), dtype=np.int64)], axis=1)  # (B, T+S)
            logits = self.decoder.step(tokens, mask, positions, self.cache, logits_to_keep=width)
            self.mask = mask
            if not all_logits:
                logits = logits[np.arange(batch), last][:, None, :]
        self.width = width
        return logits

    def _extend_rows(self, tokens: np.ndarray, positions: np.ndarray, counts: np.ndarray, live) -> np.ndarray:
        """shared_buffer at batch > 1: the live rows' counts[b] tokens, checked row by row (see the top);
        returns (B, S, V)."""
        batch, width = tokens.shape
        live = np.ones(batch, dtype=bool) if live is None else np.asarray(live, dtype=bool)
        drafting = np.flatnonzero(live & (counts > 1))
        logits, start = None, 0
        self.fed[:] = 0
        self.batched = 1 + len(drafting) < int(live.sum())  # fewer calls than one per live row
        if self.batched:  # 1 + R calls beat one per live row: every t in one batched step first
            first = _shared_extend(self.decoder, self.cache, tokens[:, :1], positions[:, :1],
                                   np.zeros(batch, dtype=np.int64))  # (B, 1, V)
            logits = np.zeros((batch, width, first.shape[-1]), dtype=first.dtype)
            logits[:, :1] = first
            self.fed[:] = start = 1
            rows = drafting
        else:
            rows = np.flatnonzero(live)
        self.row_calls = len(rows)
        for b in rows.tolist():
            n = int(counts[b])
            out = _shared_row_extend(self.decoder, self.cache, b, tokens[b:b + 1, start:n],
                                     positions[b:b + 1, start:n])  # (1, n - start, V)
            if logits is None:
                logits = np.zeros((batch, width, out.shape[-1]), dtype=out.dtype)
            logits[b, start:n] = out[0]
            self.fed[b] = n
        return logits

    def keep(self, kept) -> None:
        """Keep the first kept[b] tokens of row b of the last `extend` (the rest is dropped from the cache)."""
        kept = np.asarray(kept, dtype=np.int64)
        if self.shared:  # a row that was not run keeps nothing
            self.cache.lengths = (self.cache.lengths - self.fed + np.minimum(kept, self.fed)).astype(np.int32)
        else:
            before = self.mask.shape[1] - self.width
            self._cut(before, kept)
        self.real += kept
        self.width = 0

    def rewind(self, steps: int, kept) -> None:
        """Undo the last `steps` one-token extends except the first kept[b] of them per row (a draft model's
        rejected drafts)."""
        kept = np.asarray(kept, dtype=np.int64)
        if self.shared:  # one-token extends: every row was run
            self.cache.lengths = (self.cache.lengths - steps + kept).astype(np.int32)
        else:
            self._cut(self.mask.shape[1] - steps, kept)
        self.real += kept - steps

    def _cut(self, before: int, kept: np.ndarray) -> None:
        """concat: keep columns up to before + max(kept); mask out row b's columns past before + kept[b]."""
        columns = before + int(kept.max())
        if columns < self.mask.shape[1]:
            self.cache.truncate(columns)
            self.mask = self.mask[:, :columns].copy()
        for b, n in enumerate(kept.tolist()):
            self.mask[b, before + n:] = 0


def _row_calls(counts: np.ndarray, batch: int) -> int:
    """Calls `_Tape._extend_rows` makes for every row: a batched step then one per row of several tokens, or one
    per row, whichever is fewer."""
    return min(1 + int((counts > 1).sum()), batch)


def _shared_extend(decoder, cache: SharedKVCache, tokens: np.ndarray, positions: np.ndarray,
                   index: np.ndarray) -> np.ndarray:
    """A shared_buffer graph step on S tokens per row after the cached ones: each row's S new K/V go to slots
    lengths[b].. of its buffer (`keep` rewinds the lengths past what is dropped).

    Args:
        index: (B,) one position per row, or (B, S) positions per row: the graph's logits_index (a graph made
            before speculative decoding takes (B,) only).
    Returns:
        (B, 1 or S, V) logits.
    """
    batch, width = tokens.shape
    lengths = cache.lengths.astype(np.int64) + width  # (B,)
    total = int(lengths.max())
    if total > cache.capacity:
        raise ValueError(f"KV cache of {cache.capacity} slots is full")
    if index.ndim == 2 and index.shape[1] > 1:
        _check_positions_index(decoder)
    index = index.reshape(-1)  # (B * n,): n positions per row, row after row
    binding = _bind_inputs(decoder, tokens, positions, lengths, total, index)
    cache.bind(binding)
    decoder.session.run_with_iobinding(binding)
    cache.lengths = lengths.astype(np.int32)
    return binding.get_outputs()[0].numpy()


def _shared_row_extend(decoder, cache: SharedKVCache, row: int, tokens: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """As `_shared_extend` for one row of the cache at batch 1: (1, n) tokens after its cached ones, every
    position's logits; (1, n, V)."""
    width = tokens.shape[1]
    length = int(cache.lengths[row]) + width
    if length > cache.capacity:
        raise ValueError(f"KV cache of {cache.capacity} slots is full")
    if width > 1:
        _check_positions_index(decoder)
    binding = _bind_inputs(decoder, tokens, positions, np.array([length]), length, np.arange(width))
    cache.bind_row(binding, row)
    decoder.session.run_with_iobinding(binding)
    cache.lengths[row] = length
    return binding.get_outputs()[0].numpy()


def _bind_inputs(decoder, tokens, positions, lengths: np.ndarray, total: int, index: np.ndarray):
    """A binding of a shared_buffer step's inputs (lengths: each row's cached length after it) and its logits."""
    binding = decoder.session.io_binding()
    for name, array in (("input_ids", tokens), ("position_ids", positions),
                        ("seqlens_k", (lengths - 1).astype(np.int32)),
                        ("total_sequence_length", np.array(total, dtype=np.int32)),
                        ("logits_index", index.astype(np.int64))):
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    binding.bind_output("logits")
    return binding


def checks_drafts(decoder) -> bool:
    """Whether a shared_buffer graph returns several positions' logits per row (its logits_index is
    `INDEX_DIM`-long), so that one call can check drafts. A graph made before speculative decoding returns one."""
    shape = decoder.__dict__.get("_logits_index_shape")
    if shape is None:
        shape = decoder._logits_index_shape = next(i.shape for i in decoder.session.get_inputs()
                                                   if i.name == "logits_index")
    return shape == [INDEX_DIM]


def _check_positions_index(decoder) -> None:
    """A graph made before speculative decoding returns one position's logits per row: it cannot check drafts."""
    if not checks_drafts(decoder):
        raise GenerationError("this shared_buffer artifact's graph returns one position's logits per row, "
                              "which cannot check drafts: re-export it with this gptexport, or use a concat "
                              "artifact")


# -- how many drafts -----------------------------------------------------------------------------------------------

class _Verdict:
    """What the calls so far found about one draft model on one target at one batch size: its rounds cost more
    than the plain steps they replace even when every draft is accepted (the draft is too slow for its target, on
    this machine). Calls then decode plainly (the draft is not even prefilled) for `wait` plain steps before one
    probes again; each probe that fails again doubles the wait (`failed`), one that could pay clears it."""

    def __init__(self):
        self.pause = 0  # plain steps between probes (0: no verdict)
        self.wait = 0  # plain steps before the next probe

    def failed(self, steps: int) -> None:
        self.pause = min(max(steps, 2 * self.pause, 1), MAX_COST_PAUSE)
        self.wait = self.pause

    def paid(self) -> None:
        self.pause = self.wait = 0

    def holds(self) -> bool:
        """Whether this round is one of the plain steps the verdict asks for (counted)."""
        if self.wait <= 0:
            return False
        self.wait -= 1
        return True


def _verdict(model, draft, batch: int) -> _Verdict:
    """The verdict on `draft` drafting for `model` at `batch` rows (kept on the target while the draft lives)."""
    with _DRAFT_LOCK:
        table = model.__dict__.setdefault("_verdicts", weakref.WeakKeyDictionary())
        return table.setdefault(draft, {}).setdefault(batch, _Verdict())


def _probe_pause(loss: float, step_s: float) -> int:
    """Plain steps after a round that lost `loss` seconds against plain decoding (plain steps of step_s), so that
    such rounds cost at most PROBE_LOSS of the time: a cheap miss (prompt lookup's) pauses little."""
    if loss <= 0:
        return 0
    if step_s <= 0:
        return MAX_COST_PAUSE
    return min(int(np.ceil(loss / (PROBE_LOSS * step_s) - 1e-9)), MAX_COST_PAUSE)  # (not 61 for 60 + rounding)


class _Schedule:
    """K per round: +2 when every draft was accepted, -1 otherwise (transformers' heuristic); a round that accepted
    nothing pauses speculation for 1, 2, 4 .. MAX_PAUSE plain steps (reset by a round that paid).

    Timed (the loop passes each round's wall time, set-up of the draft excluded): a plain round's time is
    `plain_s`, and a round that took longer than the plain rounds that emit as much (its `gain`: tokens of the
    slowest row) did not pay either; it pauses at least until the time it lost is PROBE_LOSS of the plain time
    (`_probe_pause`, the draft's set-up counted in). A round that would not pay even with every draft accepted
    (`best`: 1 + drafts a row) is the draft's cost, not the text's: the `verdict` (kept across calls) then holds
    speculation off for that long, doubling at each failed probe. A draft model's rounds before any plain round
    was timed are judged once one is, and the round after such a round is plain.

    Args:
        k_max: drafts per round at most.
        verdict: a draft model's `_Verdict` (None: prompt lookup, or not timed).
    """

    def __init__(self, k_max: int, verdict: "_Verdict | None" = None):
        self.k_max, self.k = k_max, k_max
        self.pause, self.wait = 0, 0
        self.plain_s = None  # a plain round's seconds, a running mean (timed)
        self.verdict = verdict
        self.unjudged = []  # a draft model's rounds before a plain one was timed: judged once one is

    def next_k(self) -> int:
        if self.verdict is not None and self.verdict.holds():  # this call's own pause runs out meanwhile
            self.wait = max(self.wait - 1, 0)
            return 0
        if self.wait > 0:
            self.wait -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int, round_s=None, gain: int = 1, best: int = 1,
               setup_s: float = 0.0) -> None:
        """A round's outcome: drafts checked and accepted (0 drafted: a plain round); timed, its seconds
        (round_s, the draft's set-up excluded), the tokens its slowest live row emitted (gain) and could have
        with every draft accepted (best), and the draft's set-up seconds this round (setup_s)."""
        if drafted == 0:
            if round_s is not None:
                self.plain_s = _mean(self.plain_s, round_s)
                for outcome in self.unjudged:
                    self._judge(*outcome)
                self.unjudged = []
            return
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, self.k - 1)
        if round_s is not None and self.plain_s is None and self.verdict is not None:
            self.unjudged.append((accepted, round_s, gain, best, setup_s))  # a draft model: time a plain round next
            self.wait = max(self.wait, 1)
            return
        self._judge(accepted, round_s, gain, best, setup_s)

    def _judge(self, accepted: int, round_s, gain: int, best: int, setup_s: float) -> None:
        paid, lost = accepted > 0, 0
        if round_s is not None and self.plain_s is not None:
            loss = round_s - self.plain_s * gain
            paid, lost = paid and loss <= 0, _probe_pause(loss + setup_s, self.plain_s)
            if self.verdict is not None:
                if round_s > self.plain_s * best:  # even every draft accepted would not have paid
                    self.verdict.failed(lost)
                else:
                    self.verdict.paid()
        if paid:
            self.pause = 0
            return
        self.pause = min(max(1, 2 * self.pause), MAX_PAUSE)
        self.wait = max(self.wait, self.pause, lost)


class _RowSchedule(_Schedule):
    """Which rows draft, for a shared_buffer batch checked row by row (see the top).

    There a row's check is a call of its own (on CPU about as long as a batched plain step), and a batch is done
    when its slowest row is, so a round pays only when every live row drafts and it takes at most the plain steps
    that emit what its slowest row emits: draft_s + live x row_s <= step_s x min(gain[b]), gain[b] being the
    tokens row b emits in a round (1 + accepted). All are running means timed in this run: step_s over plain
    steps, row_s over checked rows, gain[b] over row b's rounds and, with prompt lookup, over drafts made but not
    checked during plain steps (`PromptLookup.shadow`, free), so such a batch speculates from the first round
    that pays and never pays a call to learn that none does. A draft model's gains are known only by checking,
    and its drafts cost steps of its own (and, after plain steps, feeding it what it missed): one row probes
    (in a round that steps the others batched), the rows not checked yet are taken to gain what the checked
    ones did, and once a probe or round finds that speculation does not pay, the batch decodes plainly to the end;
    when even every draft accepted would not pay (the draft's cost), the `verdict` remembers it across calls, as
    `_Schedule`'s.
    """

    def __init__(self, k_max: int, batch: int, shadowed: bool, verdict: "_Verdict | None" = None):
        super().__init__(k_max)
        self.verdict = verdict  # a draft model's (see `_Schedule`): held off while it says so
        self.wait = 1  # the first round is a plain step: it times one
        self.step_s = self.row_s = None
        self.draft_s = 0.0  # drafting per round (a draft model's steps; prompt lookup's are ~0)
        self.gain = [None] * batch  # per row: tokens a drafting round emits (1 + accepted), a running mean
        self.shadowed = shadowed  # prompt lookup: gains come from unchecked drafts too (`PromptLookup.shadow`)
        self.turn = 0  # the next row to probe (a draft model)
        self.off = False  # a draft model found not to pay: plain decoding to the end

    def rows(self, live: list) -> list:
        """Rows that draft this round: every live one when that pays, else [] (a plain step) or one row (a
        probe, between pauses: a draft model, whose gains are known only by checking)."""
        on = [b for b, flag in enumerate(live) if flag]
        if self.off or (self.verdict is not None and self.verdict.holds()):
            return []
        if self._pays(on):
            return on
        if not self.shadowed and not self._could_pay(on):  # not even free drafts all accepted: no probe now
            return []
        if self.wait > 0 or self.shadowed:
            self.wait = max(self.wait - 1, 0)
            return []
        self.turn = (self.turn + 1) % len(live)
        while not live[self.turn]:
            self.turn = (self.turn + 1) % len(live)
        return [self.turn]

    def _pays(self, on: list) -> bool:
        """Every live row drafting pays: the round (drafting + a call per row) takes at most the plain steps
        that emit what its slowest row emits."""
        gains = [self.gain[b] for b in on]
        known = [g for g in gains if g is not None]
        if not self.shadowed and known:  # a draft model: a row not checked yet gains what the checked ones did
            gains = [sum(known) / len(known) if g is None else g for g in gains]
        if self.step_s is None or not on or None in gains:
            return False
        return self.draft_s + len(on) * self._row_s() <= self.step_s * min(gains)

    def _could_pay(self, on: list) -> bool:
        """The best case pays: drafts at their measured cost (free before one is measured) and every one accepted
        (k_max + 1 tokens a row). A batch whose calls row by row cost more than that many plain steps (live rows >
        k_max + 1 while a row's call ~ a step) cannot gain from a draft model, so it is not probed (a probe costs a
        draft's K steps and a call for nothing) until enough rows have finished."""
        return (self.step_s is None
                or self.draft_s + len(on) * self._row_s() <= self.step_s * (self.k_max + 1))

    def _row_s(self) -> float:
        """A row's call, timed; until it is, a row's call ~ a plain step."""
        return self.step_s if self.row_s is None else self.row_s

    def observe(self, drafting: float, checking: float, batched: bool, row_calls: int, gains: dict,
                live: list, setup_s: float = 0.0) -> None:
        """A round's times (drafting, checking: seconds; checking is the rest of the round), whether its calls
        began with a batched step, how many rows it checked alone, the tokens rows emitted or would have (row ->
        1 + accepted), and the seconds the draft's set-up took this round (not in drafting)."""
        for b, gain in gains.items():
            self.gain[b] = _mean(self.gain[b], gain)
        if not row_calls:  # a plain step
            self.step_s = _mean(self.step_s, checking)
            return
        rest = checking - (self.step_s or 0.0) if batched else checking
        self.row_s = _mean(self.row_s, max(rest, 0.0) / row_calls)
        self.draft_s = _mean(self.draft_s, drafting)
        on = [b for b, flag in enumerate(live) if flag]
        if self._pays(on) or self.shadowed:
            return
        if self.verdict is None or self._could_pay(on):  # the text's drafts did not pay: plain to the end
            self.off = True
        else:  # not even every draft accepted would pay: the draft's cost, remembered (a probe: about a step gained)
            self.verdict.failed(_probe_pause(drafting + checking - self.step_s + setup_s, self.step_s))


def _mean(old, new: float) -> float:
    """A running mean that follows the recent rounds (the machine's speed moves)."""
    return new if old is None else 0.5 * (old + new)


# -- the loop ------------------------------------------------------------------------------------------------------

def check_tokens(k, speculative=None) -> int:
    """Validate num_speculative_tokens (None: the default for `speculative`, prompt lookup's or a draft model's)."""
    if k is None:
        return DEFAULT_LOOKUP_TOKENS if speculative == PROMPT_LOOKUP else DEFAULT_SPECULATIVE_TOKENS
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise GenerationError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
                              f"got {k!r}")
    return int(k)


_DRAFT_LOCK = threading.Lock()


def resolve(model, speculative):
    """`speculative` as given to generate -> PROMPT_LOOKUP or a loaded draft Model (cached on the target).

    Raises:
        GenerationError: neither "prompt_lookup" nor a loadable artifact, or a draft whose tokenizer or vocabulary
            differs from the target's.
        ArtifactError: the draft artifact is incomplete or modified (as `load`).
    """
    from .model import Model, load

    if speculative == PROMPT_LOOKUP or isinstance(speculative, Model):
        draft = speculative
    elif isinstance(speculative, (str, os.PathLike)):
        if not os.path.isdir(speculative):
            raise GenerationError(f"speculative must be {PROMPT_LOOKUP!r} or a draft artifact directory, got "
                                  f"{str(speculative)!r} (no such directory)")
        key = os.path.realpath(speculative)
        with _DRAFT_LOCK:
            drafts = model.__dict__.setdefault("_drafts", {})
            if key not in drafts:
                # the target's threads, not spinning: the two sessions take turns on the same cores, and a
                # draft's idle threads spinning through the target's calls slowed both (bench/speculative_bench.py)
                threads = model.decoder.session.get_session_options().intra_op_num_threads or None
                loaded = load(speculative, provider=model.decoder.provider, threads=threads, spin_threads=False)
                _compare_vocabularies(model, loaded)  # once: loaded here, no one else holds it
                drafts[key] = loaded
            return drafts[key]
    else:
        raise GenerationError(f"speculative must be None, {PROMPT_LOOKUP!r} or a draft artifact directory, got "
                              f"{type(speculative).__name__}")
    if draft is not PROMPT_LOOKUP:
        _check_draft(model, draft)  # a Model the caller passed: it may have changed since (see `_check_draft`)
    return draft


def _check_draft(model, draft) -> None:
    """Refuse a draft whose vocabulary is not the target's. Comparing two 50k-token vocabularies costs ~0.1 s, so
    a draft found equal is remembered with its tokenizer object and vocabulary size: a new or grown tokenizer
    (`add_tokens`) is compared again."""
    tokenizers = (draft.tokenizer, model.tokenizer)  # held, so that an id is never another object's
    sizes = tuple(t.get_vocab_size(with_added_tokens=True) for t in tokenizers) + (
        model.manifest["config"]["vocab_size"], draft.manifest["config"]["vocab_size"])
    with _DRAFT_LOCK:
        checked = model.__dict__.setdefault("_checked_drafts", weakref.WeakKeyDictionary())
        seen = checked.get(draft)
        if seen is not None and all(a is b for a, b in zip(seen[0], tokenizers)) and seen[1] == sizes:
            return
    _compare_vocabularies(model, draft)
    with _DRAFT_LOCK:
        checked[draft] = (tokenizers, sizes)


def _compare_vocabularies(model, draft) -> None:
    ours, theirs = model.manifest["config"]["vocab_size"], draft.manifest["config"]["vocab_size"]
    if ours != theirs:
        raise GenerationError(f"draft model's vocabulary has {theirs} tokens, the target's {ours}: a draft must "
                              f"use the target's tokenizer")
    if draft.tokenizer.get_vocab(with_added_tokens=True) != model.tokenizer.get_vocab(with_added_tokens=True):
        raise GenerationError("draft model's tokenizer differs from the target's (another vocabulary): a draft "
                              "must use the target's tokenizer")


def run(model, draft, k_max: int, rows: list, params: SamplingParams, rng, stops: list, live_text: bool, eos,
        stats, logprobs: bool = True):
    """Speculative `Model._run`: generate into `rows` (one batch), yielding after every round.

    Args:
        model: the target Model.
        draft: PROMPT_LOOKUP or a draft Model (see `resolve`).
        k_max: drafts per round at most.
        rows, params, rng, stops, live_text, eos, stats, logprobs: as `Model._run`; stats also count drafted and
            accepted.
    """
    input_ids, mask = model._left_pad(rows)  # (B, L)
    batch = len(rows)
    seen = [list(row.prompt) for row in rows]  # the repetition penalty's view, as `Model._run`
    capacity = input_ids.shape[1] + params.max_new_tokens + k_max + 1  # a round may write k_max + 1 past the end
    stats.batch, stats.prompt_tokens = batch, int(input_ids.shape[1])
    model.last_stats = stats  # this thread's
    start = time.perf_counter()
    tape = _Tape(model.decoder, batch, capacity, model.max_positions)
    logits = tape.prefill(input_ids, mask)[:, -1, :]  # (B, V)
    drafter = (PromptLookup(seen) if draft == PROMPT_LOOKUP
               else DraftModel(draft, input_ids, mask, capacity, seen))
    stats.prefill_s = time.perf_counter() - start
    for b, row in enumerate(rows):  # the first token comes from the prefill, as in the plain loop
        token, _ = _choose(row, seen[b], logits[b], None, None, params, rng, eos)
        _emit(model, row, seen[b], logits[b], token, stops, live_text, eos, logprobs)
    drafter.accepted([list(row.tokens) for row in rows])
    verdict = None if draft == PROMPT_LOOKUP else _verdict(model, draft, batch)
    schedule = (_RowSchedule(k_max, batch, draft == PROMPT_LOOKUP, verdict) if tape.rowwise
                else _Schedule(k_max, verdict))
    stats.new_tokens = 1
    yield 1
    while True:
        live = [_live(row, params) for row in rows]
        if not any(live):
            break
        began = _clock()  # the whole round is timed: drafting, checking, the choices, the caches' bookkeeping
        if tape.rowwise:
            drafting_rows = set(schedule.rows(live))
            k = schedule.k if drafting_rows else 0
            if not drafting_rows and schedule.shadowed:
                drafter.shadow(schedule.k, [b for b, on in enumerate(live) if on])
        else:
            k, drafting_rows = schedule.next_k(), None
        room = [min(k, params.max_new_tokens - len(row.tokens) - 1)
                if on and (drafting_rows is None or b in drafting_rows) else 0
                for b, (row, on) in enumerate(zip(rows, live))]
        drafts, dists = drafter.propose(room, params, rng) if max(room) > 0 else ([[] for _ in rows], None)
        setup = drafter.take_setup()  # a draft model's deferred prefill: once a call, not a round's cost
        drafting = _clock() - began - setup
        feed = np.full((batch, 1 + max(len(d) for d in drafts)), model.pad_token_id, dtype=np.int64)  # (B, 1+n)
        for b, ids in enumerate(drafts):
            feed[b, 0] = seen[b][-1]  # t: the last emitted id (a finished row: padding, as the plain loop)
            feed[b, 1:1 + len(ids)] = ids
        logits = tape.extend(feed, [1 + len(d) for d in drafts], live=live)  # (B, 1+n, V)
        emitted, kept = [], []
        if feed.shape[1] == 1:  # no drafts: a plain step, every row's choice at once (as `Model._advance`)
            emitted, kept = _plain_round(model, rows, seen, logits[:, 0, :], live, params, rng, stops, live_text,
                                         eos, logprobs)
        for b, row in enumerate(rows if feed.shape[1] > 1 else ()):
            if not live[b]:  # a finished row is fed padding and keeps one column per round, as in the plain loop
                seen[b].append(model.pad_token_id)
                emitted.append([])
                kept.append(1)
                continue
            got = _verify(model, row, seen[b], logits[b], drafts[b], dists[b] if dists else None, params, rng,
                          stops, live_text, eos, logprobs)
            emitted.append(row.tokens[len(row.tokens) - got:])
            kept.append(got)  # t and the accepted drafts
        tape.keep(kept)
        drafter.accepted(emitted)
        drafted = sum(len(d) for d in drafts)
        accepted = sum(len(e) - 1 for e in emitted if e)
        round_s = _clock() - began - setup
        if tape.rowwise:  # several calls a round: which rows draft is decided on measured tokens per second
            gains = drafter.take_gains() if schedule.shadowed else {}
            gains.update({b: len(e) for b, (e, d) in enumerate(zip(emitted, drafts)) if d})
            schedule.observe(drafting, round_s - drafting, tape.batched, tape.row_calls, gains, live, setup)
            if drafted:
                schedule.k = min(schedule.k + 2, k_max) if accepted == drafted else max(1, schedule.k - 1)
        else:  # a batch is done when its slowest row is: that row's tokens are what the round gained
            going = [len(e) for e, row in zip(emitted, rows) if e and _live(row, params)]
            schedule.update(drafted, accepted, round_s if going or not drafted else None,
                            min(going, default=1), 1 + max(len(d) for d in drafts), setup)
        stats.drafted += drafted
        stats.accepted += accepted
        stats.new_tokens = max(len(row.tokens) for row in rows)
        stats.decode_s = time.perf_counter() - start - stats.prefill_s
        yield stats.new_tokens
    stats.decode_s = time.perf_counter() - start - stats.prefill_s
    if not live_text:
        for row in rows:
            row.text = model._decode([t for t in row.tokens if t != eos])


def _plain_round(model, rows: list, seen: list, logits: np.ndarray, live: list, params, rng, stops, live_text,
                 eos, logprobs: bool):
    """A round without drafts: each live row's next token from its (V,) logits, chosen for the batch at once by
    the plain loop's rule (`next_tokens_each`: one argmax for greedy rows), its log-probability in one pass.
    Returns (emitted, kept) as the drafting rounds' (a finished row: fed padding, one column kept)."""
    from .model import _log_softmax_at

    on = [b for b, flag in enumerate(live) if flag]
    tokens = next_tokens_each(logits[on], [params] * len(on), [seen[b] for b in on],
                              [len(rows[b].tokens) for b in on], [eos] * len(on), [rng] * len(on)).tolist()
    values = _log_softmax_at(logits[on], np.array(tokens)).tolist() if logprobs else None
    emitted = [[] for _ in rows]
    for b in range(len(rows)):
        if not live[b]:
            seen[b].append(model.pad_token_id)
    for i, (b, token) in enumerate(zip(on, tokens)):
        seen[b].append(token)
        if logprobs:
            rows[b].logprobs.append(values[i])
        model._emit(rows[b], token, stops, live_text, eos)
        emitted[b] = [token]
    return emitted, [1] * len(rows)


def _live(row, params) -> bool:
    return not row.done and len(row.tokens) < params.max_new_tokens


def _verify(model, row, seen: list, logits: np.ndarray, drafts: list, dists, params, rng, stops, live_text, eos,
            logprobs: bool) -> int:
    """Emit the target's tokens for one row from its (1+n, V) logits: position j's choice is emitted, and the next
    position counts only while the choice was the draft. Returns how many tokens were emitted (1 + accepted)."""
    for j in range(len(drafts) + 1):
        draft = drafts[j] if j < len(drafts) else None
        token, agreed = _choose(row, seen, logits[j], draft, dists[j] if dists and draft is not None
                                else None, params, rng, eos)
        _emit(model, row, seen, logits[j], token, stops, live_text, eos, logprobs)
        if not agreed or row.done or len(row.tokens) >= params.max_new_tokens:
            return j + 1
    return len(drafts) + 1


def _choose(row, seen: list, logits: np.ndarray, draft, dist, params: SamplingParams, rng, eos):
    """The token the target emits at one position, and whether it is the draft (which then counts as accepted).

    Greedy: the argmax, as the plain loop. Sampling: the draft is accepted with probability min(1, p(d) / q(d))
    (q a point mass for prompt lookup: p(d)); otherwise the token is drawn from max(p - q, 0), renormalised. The
    emitted token is then distributed as p exactly (Leviathan et al. 2023, appendix A.1).
    """
    generated = len(row.tokens)
    scores = logits[None, :]  # (1, V)
    if params.greedy:
        token = int(next_tokens(scores, params, [seen], generated, eos, rng)[0])
        return token, draft is not None and token == draft
    p = next_token_probs(scores, params, [seen], generated, eos)[0]  # (V,) float64
    if draft is None:
        return int(sample(p[None, :], rng)[0]), False
    q_d = 1.0 if dist is None else float(dist[draft])
    if q_d > 0 and rng.random() * q_d < p[draft]:
        return int(draft), True
    if dist is None:
        residual = p.copy()
        residual[draft] = 0.0
    else:
        residual = np.maximum(p - dist, 0.0)
    if residual.sum() <= 0:  # p == q: a rejection had probability 0 (rounding); p itself is the answer
        residual = p
    return int(sample((residual / residual.sum())[None, :], rng)[0]), False


def _emit(model, row, seen: list, logits: np.ndarray, token: int, stops, live_text, eos, logprobs: bool) -> None:
    """As `Model._advance` for one live row: append to the penalty's view, the logprob (when asked), then emit."""
    from .model import _log_softmax_at

    seen.append(token)
    if logprobs:
        row.logprobs.append(float(_log_softmax_at(logits[None, :], np.array([token]))[0]))
    model._emit(row, token, stops, live_text, eos)
