"""Continuous batching: one loop owns the KV slots and runs one decode step over every running sequence.

```
 submit ──▶ waiting (bounded) ──admit──▶ prefill into the lowest free slots ─▶ running ◀─┐
                                                                                 │       │
                                    one decode step over all running slots ─────┴───────┘
                                    a finished / cancelled / timed-out sequence leaves at once; its slot is reused
```

Sequences admitted in the same step on consecutive slots are prefilled in one run when the cache can (the in-place
`SlotCache`: right-padded prompts, one graph call): a burst of requests reaches its first tokens sooner than with
one prefill run each.

Each sequence keeps its own settings (greedy or sampling, its own seeded RNG, stop strings, max_new_tokens). A
step chooses every sequence's token at once (`sampling.next_tokens_each`: one argmax over the greedy rows, each
sampling row from its own Generator, what `next_tokens` gives it alone), then each goes through `Model._advance`,
the very step `Model.generate` runs (one sampling, one stop-string implementation), so a request gives the tokens
it gives alone through `runtime.generate` with the same seed.

A sequence may speculate (prompt lookup, runtime/speculative.py): it leaves the batched step while it has
drafts, and checks [its last token, d1..dn] in its own batch-1 call on its slot (`extend`; GroupQueryAttention
takes several new tokens after a past at batch 1 only), emits the tokens the acceptance rule keeps, exactly as
`Model.generate(..., speculative="prompt_lookup")` would, and drops the rest (`rewind`). Its K backs off as there;
paused, or with nothing to draft, it steps in the batch. The others wait for its call: a speculating sequence
gains (1 + accepted) tokens a call while each other sequence waits one call.

The loop runs in one thread; callers on other threads `submit`, `cancel` and read the gauges. Updates go back
through each sequence's `on_update` callback, called on the loop's thread with an immutable `Update`.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import speculative
from .model import Model, _Row
from .sampling import SamplingParams, next_tokens_each

log = logging.getLogger("gptexport.serve")
_REPLACEMENT = "\ufffd"


class Overloaded(Exception):
    """The waiting queue is full: try again later (HTTP 429)."""


class NotAccepting(Exception):
    """The scheduler is draining or stopped (HTTP 503)."""


@dataclass(frozen=True)
class Token:
    """A generated token as reported with logprobs: id, log-probability, top alternatives, offset in the text."""

    id: int
    logprob: float
    top: tuple  # ((id, logprob), ...) best first
    offset: int


@dataclass(frozen=True)
class Update:
    """What one loop step did for one sequence.

    text: the new stable text since the previous update (never splits a character or shows a partial stop).
    tokens: the `Token`s whose text is now sent (only when logprobs were asked for).
    finish_reason: "stop" (eos or a stop string) or "length" once the sequence is done, else None.
    error, error_kind: a failure ("server_error", "timeout", "shutdown") that ended the sequence.
    generated: tokens generated so far (usage).
    """

    text: str = ""
    tokens: tuple = ()
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None
    generated: int = 0
    time: float = 0.0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Sequence:
    """One sequence to generate (one choice of one prompt of a request).

    Args:
        prompt: the prompt's token ids (non-empty).
        params: validated SamplingParams.
        stops: stop strings (validated).
        seed: seeds this sequence's own Generator (None: fresh entropy).
        eos: the end-of-sequence id, or None.
        top_logprobs: None for no logprobs; k >= 0 to report each token's logprob and its k best alternatives.
        deadline: time.monotonic() after which the sequence fails as timed out (None: never).
        on_update: called with each `Update`, on the scheduler's thread; must not block.
        speculative_tokens: 0, or K: speculate with prompt lookup, up to K drafts a round.
    """

    def __init__(self, prompt: list, params: SamplingParams, stops=(), seed=None, eos=None, top_logprobs=None,
                 deadline=None, on_update=None, speculative_tokens: int = 0):
        self.row = _Row(prompt=list(prompt))
        self.seen = list(prompt)  # the repetition penalty's view: prompt + generated
        self.params, self.stops, self.eos = params, list(stops), eos
        self.rng = np.random.default_rng(seed)
        self.top_logprobs, self.deadline = top_logprobs, deadline
        self.on_update = on_update or (lambda update: None)
        self.abort = None  # a shutdown message: fail at the next step
        self.fault = False  # tests: fail this sequence at its second token (GPTEXPORT_SERVE_FAULT)
        self.cancelled = self.finished = False
        self.slot = None
        self.generated = 0
        self.emitted = ""  # text already sent
        self.pending: list = []  # (id, logprob, top) of tokens whose text is not sent yet
        self.start_offset = 0  # text offset where the first pending token starts
        self.submitted = self.admitted = self.first_token = self.last_token = None
        self.lookup = speculative.NgramIndex(prompt) if speculative_tokens else None
        self.schedule = speculative._Schedule(speculative_tokens) if speculative_tokens else None
        self.drafted = self.accepted = 0

    def drafts(self) -> list:
        """This step's prompt-lookup drafts ([]: step in the batch), as `speculative.run` makes them."""
        if self.lookup is None:
            return []
        k = min(self.schedule.next_k(), self.params.max_new_tokens - self.generated - 1)
        if k <= 0:
            return []
        for token in self.seen[len(self.lookup.ids):]:  # what was emitted since (batched steps included)
            self.lookup.append(token)
        return self.lookup.propose(k)


class Scheduler:
    """Owns the slots and runs the continuous-batching loop in a thread.

    Args:
        model: the loaded Model (its tokenizer, eos and `_advance` step).
        cache: a slot cache from runtime/slots.py (`SlotCache` or `ConcatSlots`).
        max_queue: sequences that may wait for a slot beyond the free ones.
        observer: optional object with `admitted(queue_s)`, `token(first, seconds)` (first: from submission)
            and `step(running)` (sequences in each decode step); `speculated(drafted, accepted)` if it has it.
        step_delay: tests only: sleep this long before each decode step, so that requests are reliably in
            flight when a test disconnects, overloads or stops the server.
    """

    def __init__(self, model: Model, cache, max_queue: int, observer=None, step_delay: float = 0.0):
        self.model, self.cache, self.max_queue, self.observer = model, cache, max_queue, observer
        self.step_delay = step_delay  # tests: seconds slept per decode step (GPTEXPORT_SERVE_STEP_DELAY)
        self._free = list(range(cache.slots))  # a heap: the lowest free slot first
        self._waiting: deque = deque()
        self._running: dict = {}  # slot -> Sequence
        self._cond = threading.Condition()
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._loop, name="gptexport-scheduler", daemon=True)
        self.steps = 0

    # -- callers' side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        """No sequence is waiting or running."""
        with self._cond:
            return not self._waiting and not self._running

    def submit(self, seqs: list) -> None:
        """Queue the sequences of one request, all or none.

        Raises:
            Overloaded: they do not fit in the free slots plus the queue.
            NotAccepting: the scheduler is draining or stopped.
        """
        now = time.perf_counter()
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue + len(self._free):
                raise Overloaded(f"the server is at capacity ({len(self._running)} running, "
                                 f"{len(self._waiting)} waiting, queue limit {self.max_queue})")
            for seq in seqs:
                seq.submitted = now
                self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seqs: list) -> None:
        """Cancel sequences (a client went away): a waiting one is dropped now, a running one leaves at the next
        step and its slot is freed. Finished ones are left alone."""
        with self._cond:
            for seq in seqs:
                if seq.finished:
                    continue
                seq.cancelled = True
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    seq.finished = True
            self._cond.notify()

    def stop_accepting(self) -> None:
        """Refuse new submissions (draining); what is queued or running goes on."""
        with self._cond:
            self._accepting = False

    def abort_all(self, message: str) -> None:
        """Fail every waiting and running sequence with `message` (kind "shutdown") at the next step."""
        with self._cond:
            for seq in list(self._waiting) + list(self._running.values()):
                seq.abort = message
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop thread (after `abort_all`, or when idle)."""
        with self._cond:
            self._accepting, self._stopping = False, True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    return
                self._reap()
                admitted = []
                while self._waiting and self._free:
                    seq = self._waiting.popleft()
                    seq.slot = heapq.heappop(self._free)
                    self._running[seq.slot] = seq
                    admitted.append(seq)
            for group in _prefill_groups(admitted, hasattr(self.cache, "prefill_many")):
                self._prefill(group)
            if self._running:
                self._decode()

    def _reap(self) -> None:
        """(locked) Remove cancelled, timed-out and aborted sequences, waiting or running."""
        now = time.monotonic()
        for seq in list(self._waiting) + list(self._running.values()):
            if seq.cancelled:
                self._finish(seq, None)
            elif seq.abort:
                self._finish(seq, Update(error=seq.abort, error_kind="shutdown", generated=seq.generated))
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, Update(error="request timed out", error_kind="timeout", generated=seq.generated))

    def _finish(self, seq: Sequence, update: Update | None) -> None:
        """Take a sequence out (waiting or running), free its slot, send its last update."""
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot is not None and self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.cache.release(seq.slot)
            heapq.heappush(self._free, seq.slot)
        seq.finished = True
        if update is not None:
            self._send(seq, update)

    def _prefill(self, group: list) -> None:
        """Prefill sequences that hold consecutive slots, in one run when there are several (a failure then
        retries them one at a time, so that it fails only the sequence that causes it)."""
        now = time.perf_counter()
        for seq in group:
            seq.admitted = now
            if self.observer:
                self.observer.admitted(seq.admitted - seq.submitted)
        rows = None
        if len(group) > 1:
            try:
                rows = self.cache.prefill_many(group[0].slot, [seq.row.prompt for seq in group])
            except Exception:  # noqa: BLE001 - find the failing sequence: prefill each alone
                rows = None
        tokens = self._choose(group, rows) if rows is not None else None
        for i, seq in enumerate(group):
            try:
                logits = rows[i] if rows is not None else self.cache.prefill(seq.slot, seq.row.prompt)
                self._advance(seq, logits, None if tokens is None else tokens[i])
            except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
                self._fail(seq, e)

    def _decode(self) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        seqs, speculating = [], []
        for seq in self._running.values():
            drafts = seq.drafts()
            if drafts:
                speculating.append((seq, drafts))
            else:
                seqs.append(seq)
        if seqs:
            self._step(seqs)
        for seq, drafts in speculating:
            try:
                self._speculate(seq, drafts)
            except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
                self._fail(seq, e)

    def _speculate(self, seq: Sequence, drafts: list) -> None:
        """One speculative round of `seq` in its own call: the target's verdict on [t, d1..dn], each emitted token
        reported as a plain step's, the rejected positions dropped from its slot."""
        logits = self.cache.extend(seq.slot, [seq.seen[-1]] + drafts)  # (1+n, vocab)
        self.steps += 1
        if self.observer:
            self.observer.step(1)  # a batch of one
        emitted = 0
        for j in range(len(drafts) + 1):
            draft = drafts[j] if j < len(drafts) else None
            token, agreed = speculative._choose(seq.row, seq.seen, logits[j], draft, None, seq.params, seq.rng,
                                                seq.eos)
            self._advance(seq, logits[j], token)
            emitted += 1
            if not agreed or seq.finished:
                break
        if not seq.finished:  # a finished sequence's slot is released already
            self.cache.rewind(seq.slot, len(drafts) + 1 - emitted)
        seq.drafted += len(drafts)
        seq.accepted += emitted - 1
        seq.schedule.update(len(drafts), emitted - 1)
        if self.observer and hasattr(self.observer, "speculated"):
            self.observer.speculated(len(drafts), emitted - 1)

    def _step(self, seqs: list) -> None:
        """One decode step of `seqs` in one batched call."""
        slots, tokens = [s.slot for s in seqs], [s.seen[-1] for s in seqs]
        rows = None  # ConcatSlots steps each slot alone anyway: a failure then touches one sequence only
        if self.cache.preallocated:
            try:
                rows = self.cache.decode(slots, tokens)
            except Exception:  # noqa: BLE001 - find the failing sequence: step each alone (lengths unchanged)
                rows = None
        self.steps += 1
        if self.observer:
            self.observer.step(len(seqs))
        chosen = self._choose(seqs, rows) if rows is not None else None
        for i, seq in enumerate(seqs):
            try:
                logits = rows[i] if rows is not None else self.cache.decode([seq.slot], [tokens[i]])[0]
                self._advance(seq, logits, None if chosen is None else chosen[i])
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)

    def _choose(self, seqs: list, rows: np.ndarray):
        """Every sequence's next token from its row of `rows` (len(seqs), vocab) in one call, or None when that
        fails (each sequence then chooses alone, so that only a faulty one fails)."""
        drawing = [s for s in seqs if not s.params.greedy]
        states = [s.rng.bit_generator.state for s in drawing]  # a failure halfway must not have used up draws
        try:
            return next_tokens_each(rows, [s.params for s in seqs], [s.seen for s in seqs],
                                    [s.generated for s in seqs], [s.eos for s in seqs], [s.rng for s in seqs])
        except Exception:  # noqa: BLE001
            for seq, state in zip(drawing, states):
                seq.rng.bit_generator.state = state
            return None

    def _advance(self, seq: Sequence, logits: np.ndarray, token=None) -> None:
        """Emit and report one token of `seq` from its logits (vocab,): `token` when it was chosen with the
        batch's (`_choose`), else chosen here."""
        if seq.fault and seq.generated >= 1:
            raise RuntimeError("injected fault (GPTEXPORT_SERVE_FAULT)")
        logits = logits[None, :]  # (1, vocab)
        self.model._advance([seq.row], [seq.seen], logits, seq.params, seq.generated, seq.stops, True, seq.eos,
                            seq.rng, logprobs=seq.top_logprobs is not None,  # only logprobs requests report them
                            tokens=None if token is None else np.array([token], dtype=np.int64))
        seq.generated += 1
        now = time.perf_counter()
        if self.observer:
            first = seq.first_token is None  # time to first token counts from submission (queue included)
            self.observer.token(first, now - (seq.submitted if first else seq.last_token))
        seq.first_token = seq.first_token or now
        seq.last_token = now
        if seq.top_logprobs is not None:
            seq.pending.append((seq.row.tokens[-1], seq.row.logprobs[-1], _top(logits[0], seq.top_logprobs)))
        done = seq.row.done or seq.generated >= seq.params.max_new_tokens
        text = seq.row.text if done else Model._stable(seq.row.text, seq.stops)
        if not text.startswith(seq.emitted):  # cannot happen (appending tokens only appends text); be safe
            text = seq.emitted
        reason = ("stop" if seq.row.done else "length") if done else None
        update = Update(text=text[len(seq.emitted):], tokens=self._report(seq, len(text), done),
                        finish_reason=reason, generated=seq.generated, time=now)
        seq.emitted = text
        if done:
            with self._cond:
                self._finish(seq, update)
        else:
            self._send(seq, update)

    def _report(self, seq: Sequence, sent: int, done: bool) -> tuple:
        """The pending logprob tokens whose text is within the first `sent` characters (at the end: every token
        that contributes to the text, or all of them when no stop string cut it)."""
        if seq.top_logprobs is None:
            return ()
        out, base = [], len(seq.row.tokens) - len(seq.pending)
        cut = done and seq.row.done and seq.row.tokens[-1] != seq.eos  # a stop string ended it
        while seq.pending:
            end = len(self.model._decode(seq.row.tokens[:base + len(out) + 1]).rstrip(_REPLACEMENT))
            if not done and end > sent or (cut and seq.start_offset >= sent):
                break
            token, logprob, top = seq.pending.pop(0)
            out.append(Token(int(token), float(logprob), top, seq.start_offset))
            seq.start_offset = max(seq.start_offset, end)
        if done:
            seq.pending.clear()
        return tuple(out)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        log.error("sequence failed: %s: %s", type(error).__name__, error, exc_info=error)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        update = Update(error=f"internal error while generating: {type(error).__name__}: {first}"[:500],
                        error_kind="server_error", generated=seq.generated)
        with self._cond:
            self._finish(seq, update)

    def _send(self, seq: Sequence, update: Update) -> None:
        try:
            seq.on_update(update)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the loop
            log.exception("update listener failed")


PREFILL_TOKENS = 4096  # padded prompt tokens in one prefill run at most


def _prefill_groups(admitted: list, batched: bool) -> list:
    """Split sequences just given slots into runs of consecutive slots to prefill together (one run each when the
    cache cannot batch a prefill). A run stops where its padding would more than double its tokens or it would
    pass PREFILL_TOKENS, so one long prompt does not make short ones pay for its length."""
    if not batched:
        return [[seq] for seq in admitted]
    groups: list = []
    for seq in sorted(admitted, key=lambda s: s.slot):
        n = len(seq.row.prompt)
        if groups:
            group = groups[-1]
            longest = max(n, max(len(s.row.prompt) for s in group))
            real = n + sum(len(s.row.prompt) for s in group)
            padded = longest * (len(group) + 1)
            if group[-1].slot + 1 == seq.slot and padded <= min(2 * real, PREFILL_TOKENS):
                group.append(seq)
                continue
        groups.append([seq])
    return groups


def _top(logits: np.ndarray, k: int) -> tuple:
    """The k most likely tokens and their log-probabilities (log-softmax of the raw logits), best first."""
    if k <= 0:
        return ()
    x = logits.astype(np.float64)
    k = min(k, len(x))
    ids = np.argpartition(-x, k - 1)[:k]
    ids = ids[np.argsort(-x[ids], kind="stable")]
    norm = x.max() + np.log(np.exp(x - x.max()).sum())
    return tuple((int(i), float(x[i] - norm)) for i in ids)
