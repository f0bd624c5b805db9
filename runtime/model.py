"""Load an artifact and generate text from it: the explicit loop (append tokens, next token, done).

```
 prompts -> tokenize -> left-pad -> prefill step -> [ next_tokens -> emit -> decode step ]* -> detokenize
                                     (B, L)            (B,)                   (B, 1)
```

Batches follow transformers' `generate` exactly, so greedy output is token-for-token the same: position ids are
`cumsum(mask) - 1` (pads 0) at prefill and +1 per step; every row gets a 1 appended to the attention mask per step,
finished rows are fed `pad_token_id`, and the repetition penalty sees each row's prompt and generated ids but
not its left padding, as transformers' processor does (`prompt_ignore_length`, the padding lengths).
"""

import functools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import ArtifactError, GenerationError
from .manifest import check_pin, load_manifest, manifest_digest
from .beam import beam_search
from . import speculative as speculation
from .sampling import SamplingParams, _check_float, next_tokens
from .session import (MODEL_FILE, TOKENIZER_FILE, Decoder, check_cuda_placement, check_threads, create_session,
                      open_artifact_files)

_REPLACEMENT = "\ufffd"
DEFAULT_MAX_BATCH_SIZE = 16  # prompts a generate call runs as one batch; a longer list runs as several
# What a setting left as None becomes when the manifest does not say: transformers' GenerationConfig defaults
# (5.x `_get_default_generation_params`), and our 32 new tokens where transformers stops at max_length 20.
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class Stats:
    """Timings of one generate/stream call (per sequence; a batch decodes its rows together)."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batches: int = 0  # a prompt list longer than max_batch_size runs as several batches, one after the other
    drafted: int = 0  # speculative decoding: draft tokens the model checked (every row of every batch)
    accepted: int = 0  # ... and those it accepted

    def add(self, part: "Stats") -> None:
        """Fold one batch's figures into a call's: rows and times add up, lengths are the longest."""
        self.batch += part.batch
        self.prompt_tokens = max(self.prompt_tokens, part.prompt_tokens)
        self.new_tokens = max(self.new_tokens, part.new_tokens)
        self.prefill_s += part.prefill_s
        self.decode_s += part.decode_s
        self.batches += 1
        self.drafted += part.drafted
        self.accepted += part.accepted

    @property
    def acceptance_rate(self) -> float:
        """Speculative decoding: accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second after the prefill (0 when there were none)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 and steps else 0.0


@dataclass
class Completion:
    """What one prompt produced.

    Attributes:
        text: the continuation, cut before a stop string.
        tokens: the ids that make up `text`: every generated id (eos included when it ended the row), except that
            a stop string's tokens are dropped. A token that holds both the end of `text` and the start of the
            stop string is kept, so `decode(tokens)` starts with `text` (and equals it unless such a token exists).
        logprobs: one log-probability per id of `tokens` (empty for beam search).
        generated_tokens: how many tokens the model generated for this row, those of a cut stop string and eos
            included: what a server reports as usage.
        finish_reason: "eos" (end-of-sequence token), "stop" (a stop string) or "length" (max_new_tokens).
    """

    text: str
    tokens: list
    logprobs: list
    generated_tokens: int
    finish_reason: str


@dataclass
class Result:
    """What `generate(..., return_result=True)` returns: one Completion per prompt, and this call's Stats."""

    completions: list
    stats: Stats

    @property
    def texts(self) -> list:
        """The text of every completion, in prompt order."""
        return [c.text for c in self.completions]


class TextStream:
    """The iterator `Model.stream` returns: str pieces as they become stable.

    Once it is exhausted, `completion` (a `Completion`) and `stats` (a `Stats`) describe this call, whichever
    thread iterated it.
    """

    def __init__(self, pieces, row, stats: Stats):
        self._pieces, self._row, self.stats = pieces, row, stats

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (as a generator's close)."""
        self._pieces.close()

    @property
    def completion(self):
        """The Completion so far (final once the stream is exhausted)."""
        return self._row.completion()


@dataclass
class _Row:
    """One sequence of a request: its prompt ids and what it has generated."""

    prompt: list
    tokens: list = field(default_factory=list)  # every generated id, a stop string's included
    logprobs: list = field(default_factory=list)  # log-softmax of the model's logits at each generated token
    text: str = ""
    done: bool = False
    kept: int | None = None  # a stop string ended the row: the first `kept` tokens make up `text`
    finish_reason: str = "length"

    def completion(self) -> Completion:
        keep = len(self.tokens) if self.kept is None else self.kept
        return Completion(self.text, self.tokens[:keep], self.logprobs[:keep], len(self.tokens),
                          self.finish_reason)


def _log_softmax_at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[b, tokens[b]] per row (B, vocab) -> (B,) float64.

    exp runs in float32 (numpy's vectorised kernel, 10x float64's on a 50k vocabulary: this ran every step) and
    sums in float64; the terms are in (0, 1] after the shift, so the result agrees with an all-float64 log-softmax
    to about 1e-7.
    """
    x = logits.astype(np.float32, copy=False)
    top = x.max(axis=-1, keepdims=True)  # (B, 1)
    total = np.exp(x - top).sum(axis=-1, dtype=np.float64)  # (B,)
    rows = np.arange(len(tokens))
    return x[rows, tokens].astype(np.float64) - top[:, 0].astype(np.float64) - np.log(total)


def _stop_index(text: str, stops: list):
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _normalize_stops(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else [None]
    if any(not isinstance(s, str) or not s for s in stops):
        raise GenerationError(f"stop strings must be non-empty strings (a str or a list of str), got {_short(stop)}")
    for s in stops:
        _check_text("stop string", s)
    return stops


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_text(what: str, text: str) -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate: e.g. invalid UTF-8 bytes on a command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not valid UTF-8 text (lone surrogate {text[e.start]!r} at index "
                              f"{e.start})") from None


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise GenerationError(f"seed must be None or an integer >= 0, got {_short(seed)}")


def _check_beam(num_beams, length_penalty, early_stopping, do_sample) -> float:
    """Validate the beam-search settings; returns length_penalty as a float."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer >= 1, got {_short(num_beams)}")
    length_penalty = _check_float("length_penalty", length_penalty)
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise GenerationError(f"early_stopping must be True, False or 'never', got {_short(early_stopping)}")
    if num_beams > 1 and do_sample is True:
        raise GenerationError("beam sampling is not supported (num_beams > 1 with do_sample=True); "
                              "use num_beams=1 to sample, or do_sample=False for beam search")
    return length_penalty


def _artifact_path(artifact_dir) -> Path:
    if isinstance(artifact_dir, bytes):
        artifact_dir = os.fsdecode(artifact_dir)
    if not isinstance(artifact_dir, (str, os.PathLike)):
        raise ArtifactError(f"artifact_dir must be a path, got {type(artifact_dir).__name__}")
    return Path(artifact_dir)


class Model:
    """A loaded artifact: manifest, tokenizer and decoder session.

    Use `load()` to build one. Safe to share between threads: each call has its own rows, cache and Stats.
    `last_stats` is a convenience holding the Stats of the latest generate/stream call made *by the calling
    thread* (threading.local, so concurrent callers never read each other's); `return_result=True` returns them
    with the call.
    """

    def __init__(self, manifest: dict, tokenizer: Tokenizer, decoder: Decoder, manifest_sha256: str | None = None):
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256  # of the manifest.json bytes loaded (None: a manifest dict)
        self.tokenizer = tokenizer
        self.decoder = decoder
        special = manifest["special_tokens"]
        self.eos_token_id = special.get("eos_token_id")
        pad = special.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.max_positions = manifest["config"]["max_positions"]
        self.defaults = manifest.get("generation", {})
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        # manifests before issue 17 wrote fixed settings ("top_k": 0), not the checkpoint's: only their length counts
        self._carried = "source" in self.defaults
        self._local = threading.local()

    @property
    def last_stats(self) -> Stats:
        """Stats of the latest generate/stream call made by this thread on this model (empty Stats before one)."""
        return getattr(self._local, "stats", None) or Stats()

    @last_stats.setter
    def last_stats(self, stats: Stats) -> None:
        self._local.stats = stats

    # -- public API ------------------------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens=None, min_new_tokens=0, do_sample=None, temperature=None,
                 top_k=None, top_p=None, repetition_penalty=None, seed=None, stop=None, return_tokens=False,
                 return_logprobs=False, num_beams=1, length_penalty=1.0, early_stopping=False, eos_token_id=None,
                 return_result=False, max_batch_size=None, speculative=None, num_speculative_tokens=None):
        """Generate a continuation for one prompt or a left-padded batch of prompts.

        Args:
            prompt: a str, or a list of str (one batch).
            max_new_tokens: tokens to generate at most (None: the manifest's generation default: the checkpoint's
                max_new_tokens, or its max_length minus the longest prompt, else 32).
            min_new_tokens: eos is forbidden until this many tokens were generated.
            do_sample, temperature, top_k, top_p, repetition_penalty: as transformers' `generate` (temperature 0
                with do_sample means greedy). None: the checkpoint's generation_config.json as the manifest carries
                it, else transformers' defaults (greedy; top_k 50 when sampling).
            seed: seeds numpy's Generator for sampling (None: fresh entropy).
            stop: a str or list of str; a row stops when its text contains one, and its text is cut before it
                (and its tokens and logprobs after the token that completes the text: see `Completion.tokens`).
            return_tokens: also return the token ids that make up each text (eos included when emitted).
            return_logprobs: also return each generated token's log-probability under the model (log-softmax of
                the raw logits, as transformers' `compute_transition_scores(..., normalize_logits=True)` on
                `output_logits`), shaped like the token ids.
            num_beams: > 1 runs beam search (do_sample=False), as transformers' `generate(num_beams=...)`; the
                best hypothesis per prompt is returned. stop strings and return_logprobs are not supported there.
            length_penalty: beam search: a finished hypothesis scores sum_logprobs / generated_len ** length_penalty.
            early_stopping: beam search: False (transformers' heuristic), True (stop once num_beams hypotheses are
                finished) or "never" (stop only when no better hypothesis is possible).
            eos_token_id: the end-of-sequence id (None: the manifest's); generation stops there and min_new_tokens
                suppresses it.
            return_result: return a `Result` (a `Completion` per prompt: text, tokens, logprobs, generated_tokens,
                finish_reason; and this call's `Stats`) instead of text; return_tokens/return_logprobs are then
                ignored.
            max_batch_size: prompts run as one batch at most (None: `model.max_batch_size`, 16 by default); a
                longer list runs as consecutive batches, with the same greedy and beam outputs as one batch (and
                seeded sampling as reproducible, one random stream across the batches), so memory stays bounded.
            speculative: None (plain decoding), "prompt_lookup" (drafts are n-grams of the prompt and the text so
                far) or a draft artifact directory (a smaller model with the same tokenizer; or a loaded Model):
                drafted tokens are checked in one graph call, so greedy output is the same token for token and
                sampling has the same distribution (runtime/speculative.py); Stats count drafted/accepted.
            num_speculative_tokens: drafts per round at most (None: 10 with prompt lookup, 5 with a draft model);
                fewer while drafts are rejected.
        Returns:
            The continuation text (str, or list of str for a list prompt); with `return_tokens` and/or
            `return_logprobs`, a tuple (text(s), [token ids], [log-probabilities]) in that order; with
            `return_result`, a `Result`.
        Raises:
            GenerationError: empty prompt/list, invalid setting, or prompt + max_new_tokens too long.
        """
        single = isinstance(prompt, str)
        rows = self._encode(prompt)
        params = self._params(max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                              repetition_penalty, rows)
        stops = _normalize_stops(stop)
        _check_seed(seed)
        eos = self._eos(eos_token_id)
        length_penalty = _check_beam(num_beams, length_penalty, early_stopping, params.do_sample)
        size = self._batch_size(max_batch_size)
        run = self._runner(speculative, num_speculative_tokens, num_beams)
        if num_beams > 1:
            if stops:
                raise GenerationError("stop strings are not supported with beam search (num_beams > 1)")
            if return_logprobs:
                raise GenerationError("return_logprobs is not supported with beam search (num_beams > 1)")
        stats, rng = Stats(), np.random.default_rng(seed)
        for first in range(0, len(rows), size):
            chunk, part = rows[first:first + size], Stats()
            if num_beams > 1:
                self._beam(chunk, params, int(num_beams), length_penalty, early_stopping, eos, part)
            else:
                for _ in run(chunk, params, rng, stops, live_text=bool(stops), eos=eos, stats=part,
                             logprobs=return_logprobs or return_result):
                    pass
            stats.add(part)
        self.last_stats = stats  # this thread's
        completions = [row.completion() for row in rows]
        if return_result:
            return Result(completions, stats)
        texts = [c.text for c in completions]
        tokens = [c.tokens for c in completions]
        logprobs = [c.logprobs for c in completions]
        if single:
            texts, tokens, logprobs = texts[0], tokens[0], logprobs[0]
        extra = ([tokens] if return_tokens else []) + ([logprobs] if return_logprobs else [])
        return (texts, *extra) if extra else texts

    def stream(self, prompt: str, max_new_tokens=None, min_new_tokens=0, do_sample=None, temperature=None,
               top_k=None, top_p=None, repetition_penalty=None, seed=None, stop=None, num_beams=1, length_penalty=1.0,
               early_stopping=False, eos_token_id=None, speculative=None, num_speculative_tokens=None):
        """Generate for one prompt, yielding text pieces as they become stable.

        A piece never splits a multi-byte character (text ending in U+FFFD is held back) and never shows the
        start of a stop string that may still complete; "".join(pieces) equals `generate()`'s text.

        Args:
            prompt: a str (batch of one); the other arguments are those of `generate`.
        Returns:
            A `TextStream`: an iterator of str pieces; once exhausted, its `completion` and `stats` describe the
            call. Argument errors are raised at the call, not at the first `next()`.
        Raises:
            GenerationError: as `generate`; num_beams > 1 is refused (beam search cannot stream token by token:
                the best hypothesis is known only at the end).
        """
        _check_beam(num_beams, length_penalty, early_stopping, do_sample)
        if num_beams > 1:
            raise GenerationError("stream does not support beam search (num_beams > 1): the best hypothesis is "
                                  "known only at the end; use generate")
        if not isinstance(prompt, str):
            raise GenerationError(f"stream takes one prompt (str), got {type(prompt).__name__}")
        rows = self._encode(prompt)
        params = self._params(max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                              repetition_penalty, rows)
        _check_seed(seed)
        stats = Stats()
        run = self._runner(speculative, num_speculative_tokens, num_beams)
        pieces = self._stream(rows, params, np.random.default_rng(seed), _normalize_stops(stop),
                              self._eos(eos_token_id), stats, run)
        return TextStream(pieces, rows[0], stats)

    # -- the loop --------------------------------------------------------------------------------------------

    def _runner(self, speculative, num_speculative_tokens, num_beams):
        """The loop of a call: `_run`, or speculative decoding's (runtime/speculative.py) with its draft resolved."""
        if speculative is None:
            if num_speculative_tokens is not None:
                raise GenerationError("num_speculative_tokens needs speculative ('prompt_lookup' or a draft "
                                      "artifact directory)")
            return self._run
        k = speculation.check_tokens(num_speculative_tokens, speculative)
        if num_beams > 1:
            raise GenerationError("speculative decoding is not supported with beam search (num_beams > 1)")
        draft = speculation.resolve(self, speculative)
        return functools.partial(speculation.run, self, draft, k)

    def _stream(self, rows: list, params: SamplingParams, rng, stops: list, eos, stats: Stats, run=None):
        row, emitted = rows[0], ""
        stats.batches = 1
        for _ in (run or self._run)(rows, params, rng, stops, live_text=True, eos=eos, stats=stats):
            text = row.text if row.done else self._stable(row.text, stops)
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
                emitted = text
        if row.text != emitted:  # flush (only reached if a held-back tail remained)
            yield row.text[len(emitted):]

    @staticmethod
    def _stable(text: str, stops: list) -> str:
        """The prefix of `text` that cannot change: no trailing U+FFFD, no trailing partial stop string."""
        text = text.rstrip(_REPLACEMENT)
        # k <= len(text): a huge stop string costs O(len(text)) per step, not O(len(stop)) slices
        hold = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        return text[:len(text) - hold]

    def _run(self, rows: list, params: SamplingParams, rng, stops: list, live_text: bool, eos, stats: Stats,
             logprobs: bool = True):
        """Generate into `rows` (one batch), yielding after every step; `stats` is filled in as it goes.

        `rng` (a numpy Generator) draws the samples. The graph returns the last position's logits only
        (`logits_to_keep=1` where the graph has the input), never (B, L, vocab) at prefill.

        Rows' tokens and done flags are updated every step; their text every step when `live_text` (streaming,
        stop strings), otherwise once at the end, so plain generation does not re-decode a growing text.
        `logprobs` False leaves the rows' logprobs empty (a call that returns none skips the log-softmax).
        """
        input_ids, mask = self._left_pad(rows)  # (B, L)
        position_ids = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)  # (B, L)
        seen = [list(row.prompt) for row in rows]  # transformers' penalty skips left padding (prompt_ignore_length)
        cache = self.decoder.new_cache(len(rows), capacity=input_ids.shape[1] + params.max_new_tokens)
        stats.batch, stats.prompt_tokens = len(rows), int(input_ids.shape[1])
        self.last_stats = stats  # this thread's
        start = time.perf_counter()
        logits = self.decoder.step(input_ids, mask, position_ids, cache, logits_to_keep=1)  # (B, 1, vocab)
        stats.prefill_s = time.perf_counter() - start
        for step in range(params.max_new_tokens):
            tokens = self._advance(rows, seen, logits[:, -1, :], params, step, stops, live_text, eos, rng, logprobs)
            stats.new_tokens = step + 1
            stats.decode_s = time.perf_counter() - start - stats.prefill_s
            yield step
            if all(row.done for row in rows) or step + 1 == params.max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)  # (B, T+1)
            position_ids = position_ids[:, -1:] + 1  # (B, 1)
            logits = self.decoder.step(tokens[:, None], mask, position_ids, cache, logits_to_keep=1)
        stats.decode_s = time.perf_counter() - start - stats.prefill_s
        if not live_text:
            for row in rows:
                row.text = self._decode([t for t in row.tokens if t != eos])

    def _advance(self, rows: list, seen: list, logits: np.ndarray, params: SamplingParams, step: int, stops: list,
                 live_text: bool, eos, rng, logprobs: bool = True, tokens=None) -> np.ndarray:
        """One step of the loop, shared with the server's scheduler (runtime/scheduler.py): choose every row's
        next token from its last position's logits (B, vocab), append it, and emit it into each live row
        (with its log-probability when `logprobs`). `tokens` (B,): the ids already chosen by the same rule
        (the scheduler chooses a whole running batch's at once, `sampling.next_tokens_each`).

        Returns:
            (B,) the ids fed to the next step (pad_token_id for rows that were already done).
        """
        active = np.array([not row.done for row in rows])
        if tokens is None:
            tokens = next_tokens(logits, params, seen, step, eos, rng)
        tokens = np.where(active, tokens, self.pad_token_id)  # (B,)
        values = _log_softmax_at(logits, tokens).tolist() if logprobs else [None] * len(rows)  # (B,)
        for row, ids, token, live, logprob in zip(rows, seen, tokens.tolist(), active, values):
            ids.append(token)
            if live:
                if logprobs:
                    row.logprobs.append(logprob)
                self._emit(row, token, stops, live_text, eos)
        return tokens

    def _beam(self, rows: list, params: SamplingParams, num_beams: int, length_penalty: float, early_stopping,
              eos, stats: Stats) -> None:
        """Beam search (runtime/beam.py) into `rows`: each row gets its best hypothesis' tokens and text."""
        if params.do_sample:
            raise GenerationError("beam sampling is not supported")
        input_ids, mask = self._left_pad(rows)  # (B, L)
        batch = len(rows)
        position_ids = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)  # (B, L)
        cache = self.decoder.new_cache(batch, capacity=input_ids.shape[1] + params.max_new_tokens)
        stats.batch, stats.prompt_tokens = batch, int(input_ids.shape[1])
        self.last_stats = stats  # this thread's
        start = time.perf_counter()
        logits = self.decoder.step(input_ids, mask, position_ids, cache, logits_to_keep=1)[:, -1, :]  # (B, V)
        # transformers' _expand_inputs_for_generation: each prompt's row repeated num_beams times
        expand = np.repeat(np.arange(batch), num_beams)  # (B*N,)
        cache.reorder(expand)
        state = {"mask": mask[expand], "positions": position_ids[expand][:, -1:]}
        stats.prefill_s = time.perf_counter() - start

        def decode(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
            cache.reorder(beam_idx)
            state["mask"] = np.concatenate([state["mask"], np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
            state["positions"] = state["positions"] + 1  # (B*N, 1)
            out = self.decoder.step(tokens[:, None].astype(np.int64), state["mask"], state["positions"], cache,
                                    logits_to_keep=1)
            return out[:, -1, :]

        best = beam_search(logits[expand], decode, input_ids, mask, num_beams, params.max_new_tokens,
                           params.min_new_tokens, params.repetition_penalty, length_penalty, early_stopping, eos,
                           self.pad_token_id)
        stats.new_tokens = max(len(tokens) for tokens in best)
        stats.decode_s = time.perf_counter() - start - stats.prefill_s
        for row, tokens in zip(rows, best):
            row.tokens, row.done = tokens, True
            row.finish_reason = "eos" if tokens and tokens[-1] == eos else "length"
            row.text = self._decode([t for t in tokens if t != eos])

    def _batch_size(self, max_batch_size) -> int:
        size = self.max_batch_size if max_batch_size is None else max_batch_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise GenerationError(f"max_batch_size must be None or an integer >= 1, got {_short(size)}")
        return int(size)

    def _eos(self, eos_token_id):
        """The end-of-sequence id of a call: an override (validated against the vocabulary) or the manifest's."""
        if eos_token_id is None:
            return self.eos_token_id
        vocab = self.manifest["config"]["vocab_size"]
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, (int, np.integer)) \
                or not 0 <= eos_token_id < vocab:
            raise GenerationError(f"eos_token_id must be None or an integer in [0, {vocab}), got "
                                  f"{_short(eos_token_id)}")
        return int(eos_token_id)

    def _emit(self, row: _Row, token: int, stops: list, live_text: bool, eos) -> None:
        """Add one generated token to a live row: eos ends it; a stop string ends it and cuts its text (and
        marks how many of its tokens make up the text that is left)."""
        row.tokens.append(token)
        if token == eos:
            row.done, row.finish_reason = True, "eos"
            return
        if not live_text:
            return
        row.text = self._decode(row.tokens)
        cut = _stop_index(row.text, stops) if stops else None
        if cut is not None:
            row.text, row.done, row.finish_reason = row.text[:cut], True, "stop"
            row.kept = self._covering(row.tokens, row.text)

    def _covering(self, tokens: list, text: str) -> int:
        """The fewest leading `tokens` whose text starts with `text` (a stop string is a few tokens: few decodes)."""
        keep = len(tokens)
        while keep > 0 and self._decode(tokens[:keep - 1]).startswith(text):
            keep -= 1
        return keep

    def _decode(self, ids: list) -> str:
        """Text of generated ids; special tokens are dropped, as `decode(..., skip_special_tokens=True)`."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- inputs ----------------------------------------------------------------------------------------------

    def _encode(self, prompt) -> list:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or any(not isinstance(p, str) for p in prompts):
            raise GenerationError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if not prompts:
            raise GenerationError("prompt list is empty")
        rows = []
        for i, text in enumerate(prompts):
            _check_text("prompt" if isinstance(prompt, str) else f"prompt {i} of the list", text)
            ids = self.tokenizer.encode(text).ids if text else []
            if not ids:
                where = "" if isinstance(prompt, str) else f" (prompt {i} of the list)"
                raise GenerationError(f"prompt is empty{where}")
            rows.append(_Row(prompt=ids))
        return rows

    def _default(self, name: str, value):
        """An explicit argument wins; then the checkpoint's setting from the manifest; then transformers'."""
        if value is not None:
            return value
        carried = self.defaults.get(name) if self._carried else None
        return carried if carried is not None else TRANSFORMERS_DEFAULTS[name]

    def _default_length(self, longest: int):
        """max_new_tokens when the call gives none: the manifest's, or its max_length minus the prompt."""
        if self.defaults.get("max_new_tokens") is not None or not self._carried:
            return self.defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        max_length = self.defaults.get("max_length")
        if max_length is None:
            return DEFAULT_MAX_NEW_TOKENS
        if longest >= max_length:
            raise GenerationError(f"prompt ({longest} tokens) reaches the artifact's default max_length "
                                  f"({max_length} tokens, prompt included); pass max_new_tokens")
        return max_length - longest

    def _params(self, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                repetition_penalty, rows) -> SamplingParams:
        longest = max(len(row.prompt) for row in rows)
        if max_new_tokens is None:
            max_new_tokens = self._default_length(longest)
        params = SamplingParams.create(max_new_tokens, min_new_tokens, self._default("do_sample", do_sample),
                                       self._default("temperature", temperature), self._default("top_k", top_k),
                                       self._default("top_p", top_p),
                                       self._default("repetition_penalty", repetition_penalty))
        if longest + params.max_new_tokens > self.max_positions:
            raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                  f"exceeds the model's {self.max_positions} positions")
        return params

    def _left_pad(self, rows: list):
        """(B, L) int64 input ids and attention mask, padding on the left with pad_token_id."""
        length = max(len(row.prompt) for row in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row.prompt):] = row.prompt
            mask[i, length - len(row.prompt):] = 1
        return input_ids, mask


def load(artifact_dir, provider: str = "cpu", verify: str = "auto", manifest: dict | None = None, threads=None,
         manifest_sha256: str | None = None, spin_threads: bool = True) -> Model:
    """Verify an artifact and load it for generation.

    The graph (when it has no external data: models under 2 GB) and the tokenizer are read once, and the bytes
    read are the bytes hashed and the bytes onnxruntime and tokenizers load, so a file swapped after verification
    is never used. With external data, onnxruntime opens model.onnx.data itself after it was hashed: the window
    between hashing and opening remains for that file (keep the artifact directory writable only by its owner).

    Args:
        artifact_dir: the artifact directory.
        provider: "cpu" or "cuda".
        verify: manifest verification policy, "auto", "full" or "size" (see runtime.manifest).
        manifest: a manifest dict to use instead of manifest.json (for the exporter's validation of a staged
            artifact); verified the same way.
        threads: onnxruntime intra-op threads (None: the cores this process may run on, see
            `session.available_cores`: CPU affinity and cgroup quota).
        manifest_sha256: refuse the artifact unless manifest.json's sha256 is this (the digest gptexport prints).
        spin_threads: False: onnxruntime's idle intra-op threads sleep instead of spinning (`gptrun serve`).
    Returns:
        A Model (`model.manifest_sha256` is the digest of the manifest it loaded).
    Raises:
        ArtifactError: the artifact is incomplete, modified, newer, not loadable, or not the pinned one.
        ProviderError: the provider is unknown or unavailable, or `threads` is not an integer >= 1.
    """
    directory = _artifact_path(artifact_dir)
    check_threads(threads)
    manifest, digest = load_manifest(directory, verify=verify, manifest=manifest, manifest_sha256=manifest_sha256,
                                     deferred=(MODEL_FILE, TOKENIZER_FILE))
    if manifest.get("task", "text-generation") != "text-generation":  # runtime/heads.py serves the other tasks
        from .heads import refuse_task

        refuse_task(manifest, directory, "text-generation")
    if provider == "cuda":  # a node with no CUDA kernel would run on the CPU, copying its tensors every step
        check_cuda_placement(manifest, directory)
    create = functools.partial(create_session, spin_threads=spin_threads)
    tokenizer, session = open_artifact_files(directory, manifest, verify, provider, threads, create)
    return Model(manifest, tokenizer, Decoder(session, provider, manifest), manifest_sha256=digest)


GENERATE_CACHE_SIZE = 4  # artifacts `runtime.generate` keeps loaded; the least recently used is dropped


class _ModelCache:
    """The models behind `runtime.generate`, keyed by (realpath, provider, threads, sha256 of manifest.json).

    The manifest's digest is read on every call (one small file), so an artifact replaced in place (`gptexport
    --force` to the same path) is loaded afresh and the stale model dropped. Loading runs outside the cache's
    lock, under a lock of its own key: two artifacts load in parallel, one artifact loads once however many
    threads ask for it.
    """

    def __init__(self, size: int = GENERATE_CACHE_SIZE):
        self.size = size
        self.models = OrderedDict()  # key -> Model, least recently used first
        self.loading = {}  # key -> Lock held while that key loads
        self.lock = threading.Lock()

    def get(self, artifact_dir, provider, threads=None, manifest_sha256=None) -> Model:
        directory = _artifact_path(artifact_dir)
        check_threads(threads)
        pin = check_pin(manifest_sha256)
        digest = manifest_digest(directory)
        if pin is not None and digest != pin:  # load() refuses it too; say so without loading
            load_manifest(directory, verify="size", manifest_sha256=pin)
        place = (os.path.realpath(directory), repr(provider), threads)
        key = place + (digest,)
        with self.lock:
            model = self._hit(key)
            if model is not None:
                return model
            loading = self.loading.setdefault(key, threading.Lock())
        with loading:
            with self.lock:
                model = self._hit(key)
                if model is not None:
                    return model
            try:
                model = load(directory, provider=provider, threads=threads, manifest_sha256=pin)
            except BaseException:
                with self.lock:
                    self.loading.pop(key, None)
                raise
            with self.lock:
                # stored under the digest actually loaded (the manifest may have been replaced meanwhile);
                # every other version of this artifact is dropped
                for stale in [k for k in self.models if k[:3] == place]:
                    del self.models[stale]
                self.models[place + (model.manifest_sha256,)] = model
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
                self.loading.pop(key, None)
        return model

    def _hit(self, key):
        model = self.models.get(key)
        if model is not None:
            self.models.move_to_end(key)
        return model

    def clear(self) -> None:
        """Drop every cached model."""
        with self.lock:
            self.models.clear()


_CACHE = _ModelCache()


def generate(artifact_dir, prompt, provider: str = "cpu", threads=None, manifest_sha256: str | None = None,
             **kwargs):
    """Load (cached: see `_ModelCache`, at most GENERATE_CACHE_SIZE artifacts) and generate.

    Args:
        artifact_dir, provider, threads, manifest_sha256: as `load`.
        prompt, kwargs: as `Model.generate`.
    Returns:
        As `Model.generate`.
    Raises:
        ArtifactError, ProviderError, GenerationError: as `load` and `Model.generate`.
    """
    return _CACHE.get(artifact_dir, provider, threads, manifest_sha256).generate(prompt, **kwargs)
