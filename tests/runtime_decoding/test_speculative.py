"""Speculative decoding (runtime/speculative.py) on tiny random models: the output is plain decoding's.

Greedy: token for token what plain greedy gives, for prompt lookup and a draft model, batch 1 and a left-padded
batch, both KV layouts, with stop strings, eos, min_new_tokens and a repetition penalty. Sampling: the acceptance
rule draws from the target's distribution exactly, checked by chi-square on synthetic distributions (with a
negative control that must be rejected) and end to end against plain sampling. The trained-checkpoint cases are
in tests/quality/test_speculative_trained.py.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from gptexport import runtime
from gptexport.exporter.artifact import convert_to_shared_buffer
from gptexport.runtime import speculative as spec
from gptexport.runtime.errors import GenerationError
from gptexport.runtime.sampling import SamplingParams, softmax

from runtime_decoding.test_sampling_distribution import ALPHA, goodness_of_fit, two_sample

# Text the tiny random models loop on, so drafts get accepted and rejected both
PROMPTS = ["Hello world, hello world, hello world", "a b c d a b c d a b", "The cat sat on the mat. The cat"]
NEW = 24


@pytest.fixture(autouse=True)
def free_rounds(monkeypatch):
    """Rounds timed by a stopped clock cost nothing, so every round pays and these tests speculate whatever the
    machine's speed (whether a round pays is timed: tested with injected costs below, `timed_sessions`)."""
    monkeypatch.setattr(spec, "_clock", lambda: 0.0)


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory):
    """(target, draft dir, shared_buffer target, its dir): tiny GPT-2, its n_inner variant as draft (same tokenizer)."""
    _, target_dir, _ = tiny_export("gpt2")
    _, draft_dir, _ = tiny_export("gpt2-n_inner")
    shared_dir = tmp_path_factory.mktemp("spec-shared") / "artifact"
    convert_to_shared_buffer(target_dir, shared_dir)
    return runtime.load(target_dir), draft_dir, runtime.load(shared_dir), shared_dir


def assert_same_tokens(model, prompt, speculative, k=None, **settings):
    plain = model.generate(prompt, return_result=True, **settings)
    fast = model.generate(prompt, return_result=True, speculative=speculative, num_speculative_tokens=k, **settings)
    for i, (a, b) in enumerate(zip(plain.completions, fast.completions)):
        assert b.tokens == a.tokens, f"row {i}: speculative {b.tokens} != plain {a.tokens}"
        assert (b.text, b.finish_reason, b.generated_tokens) == (a.text, a.finish_reason, a.generated_tokens)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
    return fast.stats


@pytest.mark.parametrize("k", [1, 3, 8])
def test_prompt_lookup_greedy_equals_plain_batch_and_single(models, k):
    model, _, _, _ = models
    stats = assert_same_tokens(model, PROMPTS, "prompt_lookup", k, max_new_tokens=NEW)
    assert_same_tokens(model, PROMPTS[1], "prompt_lookup", k, max_new_tokens=NEW)
    assert stats.drafted > 0 and 0 < stats.accepted <= stats.drafted  # drafts were made, some kept


def test_draft_model_greedy_equals_plain(models):
    model, draft_dir, _, _ = models
    stats = assert_same_tokens(model, PROMPTS, str(draft_dir), 4, max_new_tokens=NEW)
    assert stats.drafted > 0
    assert_same_tokens(model, PROMPTS[0], draft_dir, 4, max_new_tokens=NEW)


def test_shared_buffer_layout_rewinds_and_equals_plain(models):
    model, draft_dir, shared, shared_dir = models
    for prompt in PROMPTS:
        assert_same_tokens(shared, prompt, "prompt_lookup", 4, max_new_tokens=NEW)
    assert_same_tokens(shared, PROMPTS[1], str(draft_dir), 3, max_new_tokens=NEW)
    assert_same_tokens(shared, PROMPTS, "prompt_lookup", 4, max_new_tokens=NEW, max_batch_size=1)
    # the shared draft model with a batch feeds its catch-up tokens one step at a time
    assert_same_tokens(model, PROMPTS, str(shared_dir), 3, max_new_tokens=NEW)


# left-padded: four lengths; the last ends early on its eos (a finished row is no longer run, row by row)
BATCH = PROMPTS + ["x"]


@pytest.fixture
def every_row_drafts(monkeypatch):
    """A shared_buffer batch drafts on every row every round (whether that pays is timed, so not testable)."""
    monkeypatch.setattr(spec._RowSchedule, "_pays", lambda self, on: bool(on))


@pytest.mark.parametrize("k", [1, 4, 10])
def test_shared_buffer_batch_checks_row_by_row_and_equals_plain(models, every_row_drafts, k):
    """GroupQueryAttention takes several new tokens after a past at batch 1 only: a shared_buffer batch checks its
    drafts row by row on each row of the in-place cache, with per-row lengths; the tokens are plain greedy's."""
    _, draft_dir, shared, shared_dir = models
    stats = assert_same_tokens(shared, BATCH, "prompt_lookup", k, max_new_tokens=NEW)
    assert stats.drafted > 0 and 0 < stats.accepted <= stats.drafted, stats
    for draft in (str(draft_dir), str(shared_dir)):  # both layouts as the draft
        assert_same_tokens(shared, BATCH, draft, k, max_new_tokens=NEW)
    eos = shared.generate(BATCH[3], max_new_tokens=NEW, return_tokens=True)[1][3]
    assert_same_tokens(shared, BATCH, "prompt_lookup", k, max_new_tokens=NEW, eos_token_id=eos)
    assert_same_tokens(shared, BATCH, "prompt_lookup", k, max_new_tokens=NEW, repetition_penalty=1.3)


def test_shared_buffer_batch_schedule_as_measured_equals_plain(models, monkeypatch):
    """The real schedule (rows draft when it is measured to pay; a draft model probes one row at a time)."""
    monkeypatch.setattr(spec, "_clock", time.perf_counter)
    _, draft_dir, shared, _ = models
    assert_same_tokens(shared, BATCH[0], str(draft_dir), 4, max_new_tokens=NEW)  # batch 1: `_Schedule`, timed
    for source in ("prompt_lookup", str(draft_dir)):
        assert_same_tokens(shared, BATCH, source, 4, max_new_tokens=NEW)


def test_row_schedule_drafts_every_row_only_when_it_pays():
    s = spec._RowSchedule(6, 3, shadowed=True)
    assert s.rows([True] * 3) == []  # nothing known: a plain step (which times one)
    s.observe(0.0, 0.010, True, 0, {0: 7, 1: 7}, [True] * 3)
    assert s.rows([True] * 3) == []  # row 2's gain is unknown
    s.observe(0.0, 0.010, True, 0, {2: 3}, [True] * 3)  # 3 calls of ~a step each for 3 tokens: it pays
    assert s.rows([True] * 3) == [0, 1, 2]
    s.observe(0.0, 0.060, False, 3, {0: 2, 1: 2, 2: 2}, [True] * 3)  # 20 ms a row call, 2 tokens each: no
    assert s.rows([True] * 3) == []
    assert s.rows([True, False, False]) == [0]  # row 0 alone: 20 ms for its 4.5 tokens (mean of 7 and 2) pays
    probe = spec._RowSchedule(6, 3, shadowed=False)  # a draft model: gains are known by checking, one row
    assert probe.rows([True] * 3) == []  # the first round is a plain step: it times one
    probe.observe(0.0, 0.010, True, 0, {}, [True] * 3)
    assert [probe.rows([True, False, True]) for _ in range(2)] == [[2], [0]]  # live rows in turn
    probe.observe(0.0, 0.040, True, 1, {0: 2}, [True] * 3)  # 30 ms for 2 tokens a row, rows 1-2 taken alike
    assert probe.off and probe.rows([True] * 3) == []  # a draft model that does not pay: plain to the end
    wide = spec._RowSchedule(5, 8, shadowed=False)  # 8 row calls of ~a step each for at most 6 tokens a row
    wide.observe(0.0, 0.010, True, 0, {}, [True] * 8)
    assert [wide.rows([True] * 8) for _ in range(3)] == [[]] * 3  # cannot pay even if all were accepted: no probe
    assert [wide.rows([True] * 2 + [False] * 6) for _ in range(2)] == [[], [1]]  # 2 rows left: it could (after a wait)


def test_prompt_lookup_shadow_measures_what_a_round_would_accept():
    lookup = spec.PromptLookup([[1, 2, 3, 1, 2], [4, 5, 6]])
    lookup.shadow(3, [0, 1])  # row 0 would draft 3, 1, 2; row 1 has nothing to draft
    lookup.accepted([[3], [7]])
    assert lookup.take_gains() == {}  # undecided: one of three matched so far
    lookup.accepted([[1], [7]])
    lookup.accepted([[9], [7]])  # a mismatch at the third: a round would have emitted 1 + 2
    assert lookup.take_gains() == {0: 3} and lookup.take_gains() == {}


def test_shared_buffer_row_by_row_writes_only_its_row(models):
    """A row's check (bound by pointer to its row of the buffers) leaves the other rows' cache bytes as they were,
    and its rejected positions are dropped from its length only."""
    _, _, shared, _ = models
    decoder = shared.decoder
    tape = spec._Tape(decoder, 3, 64, shared.max_positions)
    ids, mask = shared._left_pad([runtime.model._Row(prompt=p) for p in ([5, 6, 7], [8, 9], [1, 2, 3, 4])])
    tape.prefill(ids, mask)
    before = {name: buffer.numpy().copy() for name, buffer in tape.cache.buffers.items()}
    feed = np.array([[7, 7, 7, 7], [1, 0, 0, 0], [4, 4, 0, 0]])  # row 1 has no drafts
    logits = tape.extend(feed, [4, 1, 2], live=[True, False, True])
    assert logits.shape[:2] == (3, 4)
    for name, buffer in tape.cache.buffers.items():
        after = buffer.numpy()
        np.testing.assert_array_equal(after[1], before[name][1], err_msg=f"{name}: row 1 was written")
        assert not np.array_equal(after[0, :, 3:7], before[name][0, :, 3:7]), f"{name}: row 0 not written"
    tape.keep([2, 1, 1])
    assert tape.cache.lengths.tolist() == [5, 0, 5]  # row 1 was not run: its cache is scratch now
    assert tape.real.tolist() == [5, 3, 5]
    # one drafting row of three: every row's first token in one batched step, then row 0's drafts alone
    logits = tape.extend(np.array([[3, 3, 3], [0, 0, 0], [2, 0, 0]]), [3, 1, 1], live=[True, True, True])
    assert tape.fed.tolist() == [3, 1, 1] and np.abs(logits[0, 2]).sum() > 0
    tape.keep([3, 1, 1])
    assert tape.cache.lengths.tolist() == [8, 1, 6]


def test_endings_stops_and_processors_equal_plain(models):
    model, draft_dir, _, _ = models
    tokens = model.generate(PROMPTS[0], max_new_tokens=NEW, return_tokens=True)[1]
    eos = tokens[5]  # a token the greedy text emits: it ends the row there
    for source in ("prompt_lookup", str(draft_dir)):
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=NEW, eos_token_id=eos)
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=NEW, eos_token_id=eos, min_new_tokens=10)
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=NEW, repetition_penalty=1.3)
        text = model.generate(PROMPTS[1], max_new_tokens=NEW)
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=NEW, stop=[text[4:7]])
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=1)
        assert_same_tokens(model, PROMPTS, source, 4, max_new_tokens=2)


def test_stream_pieces_join_to_the_text(models):
    model, _, _, _ = models
    pieces = model.stream(PROMPTS[1], max_new_tokens=NEW, speculative="prompt_lookup")
    text = "".join(pieces)
    assert text == model.generate(PROMPTS[1], max_new_tokens=NEW)
    assert pieces.stats.drafted > 0


def test_bad_settings_are_one_clear_error(models, tmp_path):
    model, _, _, _ = models
    cases = [(dict(speculative="prompt_lookup", num_speculative_tokens=0), "num_speculative_tokens must be"),
             (dict(speculative="prompt_lookup", num_speculative_tokens=True), "num_speculative_tokens must be"),
             (dict(num_speculative_tokens=3), "needs speculative"),
             (dict(speculative=str(tmp_path / "missing")), "no such directory"),
             (dict(speculative=3), "speculative must be"),
             (dict(speculative="prompt_lookup", num_beams=2), "not supported with beam search")]
    for kwargs, message in cases:
        with pytest.raises(GenerationError, match=message):
            model.generate("hi", max_new_tokens=3, **kwargs)


def test_a_draft_with_another_vocabulary_is_refused(models, tiny_export):
    model, _, _, _ = models
    other = runtime.load(tiny_export("gpt2")[1])
    other.manifest = {**other.manifest, "config": {**other.manifest["config"], "vocab_size": 1000}}
    with pytest.raises(GenerationError, match="vocabulary has 1000 tokens"):
        model.generate("hi", max_new_tokens=3, speculative=other)


# -- the schedule and the lookup -------------------------------------------------------------------------------------

def test_schedule_grows_shrinks_and_pauses():
    s = spec._Schedule(6)
    s.update(6, 6)
    assert s.next_k() == 6
    s.update(6, 2)
    assert s.next_k() == 5
    s.update(5, 0)  # nothing accepted: one plain step, then speculation again at a smaller K
    assert [s.next_k(), s.next_k()] == [0, 4]
    s.update(4, 0)
    assert [s.next_k() for _ in range(3)] == [0, 0, 3]
    for _ in range(10):
        s.update(1, 0)
        while s.next_k() == 0:
            pass
    assert s.pause == spec.MAX_PAUSE and s.k == 1
    s.update(1, 1)
    assert s.pause == 0 and s.next_k() == 3


def test_timed_schedule_switches_a_slow_draft_off_and_keeps_one_that_pays():
    """Injected timings: a plain round takes 3 ms; a round of 5 drafts, all accepted (6 tokens), 25 ms (its 6
    plain steps: 18 ms) is the draft's cost; the verdict holds speculation off for the plain steps that make the
    loss PROBE_LOSS of the time, across calls, and doubles at the next failed probe."""
    verdict = spec._Verdict()
    s = spec._Schedule(5, verdict)
    assert s.next_k() == 5  # the first round speculates
    s.update(5, 5, 0.025, gain=6, best=6, setup_s=0.002)
    assert verdict.pause == 0 and s.next_k() == 0  # not judged before a plain round is timed: the next is one
    s.update(0, 0, 0.003)  # judged now: 7 ms lost, + 2 ms of the draft's prefill
    pause = 60  # 9 ms lost: 5 % of 60 plain steps of 3 ms
    assert verdict.pause == pause
    assert [s.next_k() for _ in range(pause)] == [0] * pause and s.next_k() == 5  # then one probe
    s.update(5, 5, 0.025, gain=6, best=6)
    assert verdict.pause == 2 * pause  # failed again: twice as long
    later = spec._Schedule(5, verdict)  # the next call starts where this one left off: plain
    assert [later.next_k() for _ in range(2 * pause)] == [0] * 2 * pause and later.next_k() == 5
    paying = spec._Schedule(5, spec._Verdict())  # 12 ms for 6 tokens that cost 18 ms plainly
    assert paying.next_k() == 5
    paying.update(5, 5, 0.012, gain=6, best=6)
    assert paying.next_k() == 0
    paying.update(0, 0, 0.003)
    for _ in range(20):
        assert paying.next_k() == 5
        paying.update(5, 5, 0.012, gain=6, best=6)
    assert paying.verdict.pause == 0
    text = spec._Schedule(5, spec._Verdict())  # cheap drafts the text rejects: a pause, no verdict
    text.plain_s = 0.003
    text.update(5, 1, 0.009, gain=2, best=6)  # 2 tokens in 9 ms (3 ms lost), but 6 tokens would have paid
    assert text.verdict.pause == 0 and [text.next_k() for _ in range(20)] == [0] * 20 and text.next_k() == 4


class _TimedSession:
    """An onnxruntime session whose every run advances a fake clock by `cost` seconds (injected timings)."""

    def __init__(self, session, clock: list, cost: float):
        self.session, self.clock, self.cost, self.runs = session, clock, cost, 0

    def _tick(self):
        self.clock[0] += self.cost
        self.runs += 1

    def run(self, *args, **kwargs):
        self._tick()
        return self.session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self._tick()
        return self.session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.fixture
def timed_sessions(monkeypatch):
    """(load): a fresh target whose own artifact drafts for it (every draft accepted), each session's runs costing
    the given seconds on the clock that times the rounds."""
    clock = [0.0]
    monkeypatch.setattr(spec, "_clock", lambda: clock[0])

    def load(artifact_dir, target_s: float, draft_s: float):
        target = runtime.load(artifact_dir)
        draft = spec.resolve(target, str(artifact_dir))
        target.decoder.session = _TimedSession(target.decoder.session, clock, target_s)
        draft.decoder.session = _TimedSession(draft.decoder.session, clock, draft_s)
        return target, draft

    return load


@pytest.mark.parametrize("layout", ["concat", "shared_buffer"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_draft_that_costs_more_than_it_saves_is_switched_off(models, tiny_export, timed_sessions, layout, batch):
    """Every draft accepted, but a draft step costs 1.5 target steps: the call probes once and finishes plain,
    the next call with this draft and batch drafts nothing and does not even prefill the draft; the tokens are
    plain greedy's."""
    artifact = models[3] if layout == "shared_buffer" else tiny_export("gpt2")[1]
    target, draft = timed_sessions(artifact, 0.010, 0.015)
    prompts = PROMPTS[:batch]
    first = assert_same_tokens(target, prompts, str(artifact), 4, max_new_tokens=NEW)
    assert 0 < first.drafted <= 4 * batch, first  # one probe (a row of a shared_buffer batch: one row)
    runs = draft.decoder.session.runs
    again = assert_same_tokens(target, prompts, str(artifact), 4, max_new_tokens=NEW)
    assert again.drafted == 0 and draft.decoder.session.runs == runs, again


@pytest.mark.parametrize("layout", ["concat", "shared_buffer"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_draft_that_pays_keeps_speculating(models, tiny_export, timed_sessions, layout, batch):
    """A draft step at a tenth of a target step, every draft accepted: speculation runs the whole call, and
    again in the next."""
    artifact = models[3] if layout == "shared_buffer" else tiny_export("gpt2")[1]
    target, _ = timed_sessions(artifact, 0.010, 0.001)
    for _ in range(2):
        stats = assert_same_tokens(target, PROMPTS[:batch], str(artifact), 4, max_new_tokens=NEW)
        assert stats.accepted >= batch * NEW // 2, stats


def test_ngram_index_proposes_the_latest_continuation_of_the_longest_suffix():
    index = spec.NgramIndex([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3])
    assert index.propose(3) == [4, 5, 7]  # suffix (2, 3): its latest earlier occurrence is followed by 4, 5, 7
    index.append(4)
    assert index.propose(2) == [5, 7]  # suffix (2, 3, 4)
    assert spec.NgramIndex([1, 2, 3]).propose(4) == []
    index.append(8)
    assert index.propose(2) == []  # 8 never occurred before


def test_ngram_index_drafts_a_loop_past_its_period():
    # the latest earlier occurrence of the suffix ends the text's last period: the copy runs on into the drafts
    assert spec.NgramIndex([5, 1, 2, 1, 2, 1, 2]).propose(5) == [1, 2, 1, 2, 1]  # suffix (1, 2, 1, 2) ... period 2
    assert spec.NgramIndex([9, 7, 7, 7]).propose(4) == [7, 7, 7, 7]  # period 1: not one draft a round
    assert spec.NgramIndex([1, 2, 3, 9, 1, 2, 3]).propose(6) == [9, 1, 2, 3, 9, 1]  # 4 ids follow, then the copy
    assert spec.NgramIndex([3, 4, 5, 6]).propose(3) == []  # nothing repeats: no drafts


# -- sampling: the acceptance rule keeps the target's distribution ---------------------------------------------------

# Draws per acceptance-rule check. At 2000 the biased rule of the negative control (its distribution is known in
# closed form: min(p, q) + (1 - sum min(p, q)) p) has a chi-square noncentrality of 285 on 11 df, so it escapes
# rejection at ALPHA with probability ~2e-25 (1e-8 at 1000); the fits of the true rule fail falsely at ALPHA at any N.
N_RULE = 2000


def _draws(logits, draft_dist, draft_token_of, n, seed, rule=spec._choose):
    """n tokens emitted at one position by the acceptance rule: a draft drawn from q (or fixed), then checked."""
    params = SamplingParams.create(4, do_sample=True, temperature=1.0, top_k=0)
    rng = np.random.default_rng(seed)
    row = runtime.model._Row(prompt=[0])
    out = []
    for _ in range(n):
        draft = draft_token_of(rng)
        out.append(rule(row, [0], logits, draft, draft_dist, params, rng, None)[0])
    return out


@pytest.fixture(scope="module")
def target():
    logits = np.random.default_rng(1).normal(0, 1.5, size=12).astype(np.float32)
    return logits, softmax(logits[None, :])[0]


@pytest.mark.parametrize("source", ["point mass (prompt lookup)", "draft distribution"])
def test_acceptance_rule_draws_from_the_target_distribution(target, source):
    logits, p = target
    if source == "draft distribution":
        q = softmax(np.random.default_rng(2).normal(0, 1.5, size=12)[None, :])[0]
        draws = _draws(logits, q, lambda rng: int(rng.choice(12, p=q)), N_RULE, 0)
    else:  # a fixed draft token: every emission is either it (accepted) or from the residual
        draws = _draws(logits, None, lambda rng: 3, N_RULE, 0)
    statistic, df, pvalue = goodness_of_fit(draws, dict(enumerate(p)))
    assert pvalue > ALPHA, f"{source}: chi-square {statistic:.1f} on {df} df, p={pvalue:.2g}"


def test_a_wrong_acceptance_rule_is_detected(target):
    """Negative control: accepting with min(1, p/q) but then drawing from p (not the residual) is biased."""
    logits, p = target
    q = softmax(np.random.default_rng(2).normal(0, 1.5, size=12)[None, :])[0]

    def biased(row, seen, logits, draft, dist, params, rng, eos):
        if rng.random() * dist[draft] < p[draft]:
            return draft, True
        return int(rng.choice(12, p=p)), False

    draws = _draws(logits, q, lambda rng: int(rng.choice(12, p=q)), N_RULE, 0, rule=biased)
    _, _, pvalue = goodness_of_fit(draws, dict(enumerate(p)))
    assert pvalue < ALPHA


N_RUNS = 200
SAMPLED = dict(max_new_tokens=3, min_new_tokens=3, do_sample=True, temperature=0.1, top_k=8)


def _sampled_runs(model, **extra) -> tuple:
    """(t1, t2, t3) of N_RUNS seeded runs of PROMPTS[0], and the drafts they made."""
    runs, drafted = [], 0
    for seed in range(N_RUNS):
        result = model.generate(PROMPTS[0], seed=seed, return_result=True, **SAMPLED, **extra)
        runs.append(tuple(result.completions[0].tokens))
        drafted += result.stats.drafted
    return runs, drafted


@pytest.fixture(scope="module")
def plain_runs(models):
    """Plain sampling's runs: the reference of both sources, drawn once."""
    return _sampled_runs(models[0])[0]


@pytest.mark.parametrize("source", ["prompt_lookup", "draft"])
def test_sampled_text_has_plain_sampling_distribution(models, plain_runs, source):
    """Seeded runs of 3 tokens, speculative against plain: the third token (past the first round) and the
    (t2, t3) pairs are indistinguishable by a two-sample chi-square."""
    model, draft_dir, _, _ = models
    speculative = "prompt_lookup" if source == "prompt_lookup" else str(draft_dir)
    runs, drafted = _sampled_runs(model, speculative=speculative, num_speculative_tokens=2)
    assert drafted > N_RUNS // 4  # the rule was exercised
    for what, key in (("third token", lambda t: t[2]), ("pair", lambda t: t[1:])):
        a, b = [key(t) for t in plain_runs], [key(t) for t in runs]
        probs = {k: v / (len(a) + len(b)) for k, v in Counter(a + b).items()}  # pooled, for the bins
        statistic, df, pvalue = two_sample(a, b, probs)
        assert pvalue > ALPHA, f"{source} {what}: chi-square {statistic:.1f} on {df} df, p={pvalue:.2g}"


def test_shared_buffer_batch_sampling_has_plain_distribution(models, every_row_drafts):
    """The acceptance rule on a shared_buffer batch checked row by row: row 0 of a left-padded pair, speculative,
    against plain sampling of its prompt alone (the 4th token and the (t3, t4) pairs)."""
    _, _, shared, _ = models
    settings = {**SAMPLED, "max_new_tokens": 4, "min_new_tokens": 4}
    plain, runs, drafted = [], [], 0
    for seed in range(N_RUNS):
        plain.append(tuple(shared.generate(PROMPTS[0], seed=seed, return_result=True, **settings)
                           .completions[0].tokens))
        result = shared.generate([PROMPTS[0], PROMPTS[2]], seed=seed, return_result=True,
                                 speculative="prompt_lookup", num_speculative_tokens=2, **settings)
        runs.append(tuple(result.completions[0].tokens))
        drafted += result.stats.drafted
    assert drafted > N_RUNS // 4  # the rule was exercised
    for what, key in (("fourth token", lambda t: t[3]), ("pair", lambda t: t[2:])):
        a, b = [key(t) for t in plain], [key(t) for t in runs]
        probs = {k: v / (len(a) + len(b)) for k, v in Counter(a + b).items()}
        statistic, df, pvalue = two_sample(a, b, probs)
        assert pvalue > ALPHA, f"shared_buffer batch {what}: chi-square {statistic:.1f} on {df} df, p={pvalue:.2g}"
