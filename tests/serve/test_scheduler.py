"""The scheduler in-process, on both caches: the in-place SlotCache and the slower ConcatSlots path.

Sequences join and leave a running batch; each gives what runtime.generate gives alone; cancelled sequences
free their slot; slots are reused; memory is what cache_bytes says.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gptexport import runtime
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Overloaded, Scheduler, Sequence
from gptexport.runtime.slots import ConcatSlots, SlotCache, cache_bytes, make_slots

PROMPTS = ["Hello there", "Once upon a time in a land", "x", "The quick brown fox jumps"]


@pytest.fixture(scope="module", params=["shared", "concat"])
def model(request, serve_artifacts):
    concat, shared = serve_artifacts("gpt2")
    return runtime.load(shared if request.param == "shared" else concat)


def _run(scheduler, model, cases, together=False, seqs=None):
    results, done = [None] * len(cases), threading.Semaphore(0)
    seqs = [] if seqs is None else seqs
    for i, (prompt, kwargs) in enumerate(cases):
        params = SamplingParams.create(kwargs["max_new_tokens"], 0, kwargs.get("do_sample", False),
                                       kwargs.get("temperature", 1.0), kwargs.get("top_k", 0))
        pieces = []

        def on_update(update, pieces=pieces, i=i):
            pieces.append(update)
            if update.final:
                results[i] = ("".join(u.text for u in pieces), update.finish_reason, update.error)
                done.release()

        seqs.append(Sequence(model.tokenizer.encode(prompt).ids, params, kwargs.get("stop", []),
                             kwargs.get("seed"), model.eos_token_id, on_update=on_update,
                             speculative_tokens=kwargs.get("speculative_tokens", 0)))
    if together:  # one request of many choices: admitted at once, prefilled together
        scheduler.submit(seqs)
    for seq in seqs if not together else ():  # one by one: later ones join a running batch
        scheduler.submit([seq])
    for _ in cases:
        assert done.acquire(timeout=60)
    return results


def test_joining_and_leaving_sequences_each_give_what_they_give_alone(model):
    assert isinstance(make_slots(model.decoder, 3, 64), SlotCache if model.decoder.shared else ConcatSlots)
    scheduler = Scheduler(model, make_slots(model.decoder, 3, 64), max_queue=32)
    scheduler.start()
    rng = np.random.default_rng(1)
    cases = []
    for i in range(10):
        kwargs = {"max_new_tokens": int(rng.integers(2, 20)), "do_sample": bool(i % 2), "temperature": 1.2,
                  "seed": i, "top_k": 10 * (i % 3)}
        if i % 4 == 0:
            kwargs["stop"] = ["e"]
        cases.append((PROMPTS[i % 4], kwargs))
    try:
        results = _run(scheduler, model, cases)
    finally:
        scheduler.close()
    for (prompt, kwargs), (text, reason, error) in zip(cases, results):
        assert error is None and text == model.generate(prompt, **kwargs), (prompt, kwargs)
        assert reason in ("stop", "length")
    assert scheduler.steps < sum(k["max_new_tokens"] for _, k in cases)  # sequences really shared steps


# text the tiny random model loops on, so prompt-lookup drafts are accepted and rejected both
LOOPING = ["Hello world, hello world, hello world", "a b c d a b c d a b", "The cat sat on the mat. The cat"]


def test_speculating_sequences_give_what_they_give_alone_among_plain_ones(model):
    """Prompt lookup per sequence (it checks its drafts in its own batch-1 call on its slot, between the batched
    steps of the others): greedy ones give plain greedy's text alone; everyone else is unchanged."""
    scheduler = Scheduler(model, make_slots(model.decoder, 4, 96), max_queue=32)
    scheduler.start()
    cases = []
    for i in range(10):
        kwargs = {"max_new_tokens": 8 + 3 * i, "do_sample": i % 3 == 2, "temperature": 1.2, "seed": i, "top_k": 10}
        if i % 3 != 1:
            kwargs["speculative_tokens"] = (1, 4, 10)[i % 3]
        if i == 4:
            kwargs["stop"] = ["world"]
        cases.append((LOOPING[i % 3], kwargs))
    seqs = []
    try:
        results = _run(scheduler, model, cases, seqs=seqs)
    finally:
        scheduler.close()
    for (prompt, kwargs), (text, reason, error), seq in zip(cases, results, seqs):
        assert error is None and reason in ("stop", "length"), (prompt, kwargs, error)
        k = kwargs.pop("speculative_tokens", 0)
        if not kwargs["do_sample"]:  # sampling draws differently (same distribution: tests/runtime_decoding)
            assert text == model.generate(prompt, **kwargs), (prompt, kwargs, k)
        assert seq.generated == len(seq.row.tokens) <= kwargs["max_new_tokens"]
    speculated = [seq for (_, kwargs), seq in zip(cases, seqs) if seq.lookup is not None]
    assert sum(s.drafted for s in speculated) > 0 and 0 < sum(s.accepted for s in speculated)
    assert all(s.drafted == 0 for s in seqs if s.lookup is None)


def test_speculating_sampled_sequences_have_plain_sampling_distribution(model):
    """The acceptance rule in the scheduler's own round: seeded speculative sequences of 4 tokens against plain
    sampling of the same prompt (runtime.generate), the 4th token and the (t3, t4) pairs by two-sample chi-square."""
    from collections import Counter

    from runtime_decoding.test_sampling_distribution import ALPHA, two_sample

    runs = 120
    scheduler = Scheduler(model, make_slots(model.decoder, 8, 64), max_queue=runs)
    settings = {"max_new_tokens": 4, "do_sample": True, "temperature": 0.1, "top_k": 8}
    cases = [(LOOPING[0], {**settings, "seed": 10_000 + i, "speculative_tokens": 2}) for i in range(runs)]
    seqs = []
    scheduler.start()
    try:
        _run(scheduler, model, cases, together=True, seqs=seqs)
    finally:
        scheduler.close()
    assert sum(s.drafted for s in seqs) > runs // 4  # the rule was exercised
    plain = [tuple(model.generate(LOOPING[0], seed=i, return_tokens=True, **settings)[1])
             for i in range(runs)]
    spec = [tuple(s.row.tokens) for s in seqs]
    for what, key in (("fourth token", lambda t: t[3]), ("pair", lambda t: t[2:])):
        a, b = [key(t) for t in plain if len(t) == 4], [key(t) for t in spec if len(t) == 4]
        probs = {k: v / (len(a) + len(b)) for k, v in Counter(a + b).items()}
        statistic, df, pvalue = two_sample(a, b, probs)
        assert pvalue > ALPHA, f"{what}: chi-square {statistic:.1f} on {df} df, p={pvalue:.2g}"


def test_cancel_frees_the_slot_and_the_queue_is_bounded(model):
    scheduler = Scheduler(model, make_slots(model.decoder, 1, 64), max_queue=1, step_delay=0.02)
    scheduler.start()
    params = SamplingParams.create(50, 50)
    started = threading.Event()
    running = Sequence([15496], params, on_update=lambda u: started.set())
    waiting = Sequence([15496], params)
    try:
        scheduler.submit([running])
        scheduler.submit([waiting])
        with pytest.raises(Overloaded):
            scheduler.submit([Sequence([15496], params)])
        assert started.wait(30)
        scheduler.cancel([running, waiting])
        for _ in range(200):
            if scheduler.idle():
                break
            threading.Event().wait(0.01)
        assert scheduler.idle() and scheduler.running == 0 and scheduler.queue_depth == 0
        assert _run(scheduler, model, [("x", {"max_new_tokens": 3})])[0][0] == model.generate("x", max_new_tokens=3)
    finally:
        scheduler.close()


def test_the_cache_is_allocated_at_start_and_sized_from_slots_and_context(serve_artifacts):
    _, shared = serve_artifacts("gpt2")
    decoder = runtime.load(shared).decoder
    cache = SlotCache(decoder, 4, 32)
    config = runtime.load(shared).manifest["config"]
    per_row = 2 * config["num_layers"] * config["num_heads"] * 32 * config["head_size"] * 4  # fp32 K and V
    assert cache.nbytes == cache_bytes(decoder, 4, 32) == 4 * per_row
    assert sum(b.nbytes for b in cache._keep.values()) == cache.nbytes


def test_sequences_admitted_together_share_one_prefill_and_give_what_they_give_alone(model):
    """A burst of prompts of mixed lengths on consecutive slots: the in-place cache prefills them in one
    right-padded run (ConcatSlots one by one); every sequence still gives what it gives alone."""
    cache = make_slots(model.decoder, 6, 64)
    runs = []
    if hasattr(cache, "prefill_many"):
        batched = cache.prefill_many
        cache.prefill_many = lambda first, prompts: runs.append(len(prompts)) or batched(first, prompts)
    scheduler = Scheduler(model, cache, max_queue=8)
    cases = [(PROMPTS[i % 4] + " and" * i, {"max_new_tokens": 6 + i, "do_sample": bool(i % 2), "seed": i,
                                            "temperature": 1.0, "top_k": 0})
             for i in range(6)]
    scheduler.start()
    try:
        results = _run(scheduler, model, cases, together=True)
    finally:
        scheduler.close()
    for (prompt, kwargs), (text, _, error) in zip(cases, results):
        assert error is None and text == model.generate(prompt, **kwargs), (prompt, kwargs)
    if model.decoder.shared:
        assert runs and max(runs) > 1, runs  # at least one run prefilled several prompts


def test_a_batched_prefill_writes_what_one_at_a_time_writes(serve_artifacts):
    _, shared = serve_artifacts("gpt2")
    model = runtime.load(shared)
    prompts = [model.tokenizer.encode(p).ids for p in PROMPTS]
    one, many = SlotCache(model.decoder, 4, 32), SlotCache(model.decoder, 4, 32)
    alone = np.stack([one.prefill(slot, ids) for slot, ids in enumerate(prompts)])
    together = many.prefill_many(0, prompts)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert list(many.lengths) == list(one.lengths) == [len(ids) for ids in prompts]
    tokens = [int(np.argmax(row)) for row in alone]  # the next step reads the cache each wrote
    np.testing.assert_allclose(many.decode([0, 1, 2, 3], tokens), one.decode([0, 1, 2, 3], tokens),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        many.prefill_many(0, [[1] * 40])


def test_prefill_groups_follow_consecutive_slots_and_bound_the_padding():
    from gptexport.runtime.scheduler import PREFILL_TOKENS, _prefill_groups

    def seqs(spec):
        out = []
        for slot, n in spec:
            seq = Sequence([1] * n, SamplingParams.create(1, 0))
            seq.slot = slot
            out.append(seq)
        return out

    def slots(groups):
        return [[s.slot for s in g] for g in groups]

    assert slots(_prefill_groups(seqs([(2, 5), (0, 5), (1, 6)]), True)) == [[0, 1, 2]]
    assert slots(_prefill_groups(seqs([(0, 5), (2, 5)]), True)) == [[0], [2]]  # a running slot between
    assert slots(_prefill_groups(seqs([(0, 4), (1, 4), (2, 4), (3, 100)]), True)) == [[0, 1, 2], [3]]  # padding > 2x
    big = PREFILL_TOKENS // 2
    assert slots(_prefill_groups(seqs([(0, big), (1, big), (2, big)]), True)) == [[0, 1], [2]]
    assert slots(_prefill_groups(seqs([(0, 5), (1, 5)]), False)) == [[0], [1]]
