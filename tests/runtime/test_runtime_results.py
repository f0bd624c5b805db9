"""Issue 17 items 7 and 10: what a call returns (tokens that make up the text, usage, finish reason) and stats
that belong to the call and to the calling thread."""

import threading

import fake_artifact as fa
from fake_artifact import CONTINUATION


def test_stop_string_cuts_tokens_and_logprobs_with_the_text(model):
    # "hello" -> p q r s t u ...: the stop string "rs" is generated as r, s; neither makes up the text "pq"
    text, tokens, logprobs = model.generate("hello", max_new_tokens=12, stop="rs", return_tokens=True,
                                            return_logprobs=True)
    assert (text, tokens, len(logprobs)) == ("pq", fa.byte_ids("pq"), 2)


def test_result_keeps_the_generated_count_apart_from_the_returned_tokens(model):
    result = model.generate(["hello", "xa", "k"], max_new_tokens=12, stop="😀", return_result=True)
    stopped, eos_free, length = result.completions
    assert result.texts == ["pqrstuvwxyz{", "é你", "lmnopqrstuvw"]
    # row 1: é 你 are 5 bytes, 😀 4 more; the stop string's tokens count as generated (usage) but are not returned
    assert (eos_free.tokens, eos_free.generated_tokens, eos_free.finish_reason) == (fa.byte_ids("é你"), 9, "stop")
    assert len(eos_free.logprobs) == len(eos_free.tokens) and all(p <= 0 for p in eos_free.logprobs)
    assert (stopped.generated_tokens, stopped.finish_reason) == (12, "length")
    assert len(stopped.tokens) == len(stopped.logprobs) == 12
    assert result.stats.batch == 3 and result.stats.new_tokens == 12


def test_finish_reason_eos_keeps_the_eos_token(model):
    completion = model.generate("xa", max_new_tokens=20, return_result=True).completions[0]
    assert completion.text == CONTINUATION and completion.finish_reason == "eos"
    assert completion.tokens == fa.byte_ids(CONTINUATION) + [fa.EOS]
    assert completion.generated_tokens == len(completion.tokens) == len(completion.logprobs)


def test_a_stop_string_at_the_start_returns_no_tokens(model):
    completion = model.generate("hello", max_new_tokens=12, stop="p", return_result=True).completions[0]
    assert (completion.text, completion.tokens, completion.logprobs) == ("", [], [])
    assert completion.generated_tokens == 1


def test_stream_reports_its_completion_and_stats(model):
    stream = model.stream("hello", max_new_tokens=12, stop="tu")
    assert "".join(stream) == "pqrs"
    assert stream.completion.tokens == fa.byte_ids("pqrs") and stream.completion.generated_tokens == 6
    assert stream.stats.batch == 1 and stream.stats.new_tokens == 6


def test_last_stats_belong_to_the_calling_thread(model):
    """Thread A generates, then waits while the main thread generates a batch of 3; A still reads its own."""
    generated, resume, seen = threading.Event(), threading.Event(), {}

    def worker():
        model.generate("hello", max_new_tokens=3)
        generated.set()
        resume.wait(timeout=30)
        stats = model.last_stats
        seen["a"] = (stats.batch, stats.new_tokens)

    thread = threading.Thread(target=worker)
    thread.start()
    assert generated.wait(timeout=30)
    model.generate(["a", "bc", "def"], max_new_tokens=5)
    resume.set()
    thread.join(timeout=30)
    assert seen["a"] == (1, 3)
    assert (model.last_stats.batch, model.last_stats.new_tokens) == (3, 5)


def test_stats_returned_with_the_call_under_concurrent_callers(model):
    """Eight threads at once, each with its own batch size: every Result carries its own call's figures."""
    barrier, out = threading.Barrier(8), {}

    def worker(i):
        barrier.wait(timeout=30)
        for _ in range(5):
            result = model.generate(["hello"] * (i + 1), max_new_tokens=i + 1, return_result=True)
            out.setdefault(i, []).append((result.stats.batch, result.stats.new_tokens))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == {i: [(i + 1, i + 1)] * 5 for i in range(8)}
