"""/v1/completions as the openai client meets it: parity with runtime.generate under concurrency, streaming,
choices, token-id prompts, echo, logprobs, the other endpoints, bad input (and a hypothesis fuzz over HTTP)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptexport import runtime

NAME = "tiny"
PROMPTS = ["Hello, my name is", "Once upon a time", "The quick brown fox jumps over", "x", "é à ü 漢字 🙂"]


def _serve(serve_artifacts, start_server, name):
    _, shared = serve_artifacts(name)
    server = start_server(shared, "--max-batch", 4, "--max-queue", 64, "--model-name", NAME)
    return server, runtime.load(shared)


@pytest.fixture(scope="module")
def served(serve_artifacts, start_server):
    """(server, in-process Model) on the tiny GPT-2 shared_buffer artifact; 4 slots, so requests queue and join."""
    return _serve(serve_artifacts, start_server, "gpt2")


@pytest.fixture(scope="module", params=["gpt2", "gptj-partial-rotary"])
def served_any(request, serve_artifacts, start_server, served):
    """As `served`, for each architecture (GPT-J's rotary and untied head go through the same scheduler)."""
    return served if request.param == "gpt2" else _serve(serve_artifacts, start_server, request.param)


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


def _cases() -> list:
    """Mixed settings: greedy and seeded sampling, top_k/top_p, penalties, stop strings, lengths."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(16):
        case = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": int(rng.integers(1, 24))}
        if i % 2:
            case.update(temperature=float(rng.choice([0.7, 1.0, 1.5])), seed=int(rng.integers(0, 2 ** 31)))
            if i % 3 == 1:
                case["top_p"] = 0.9
            if i % 4 == 1:
                case["top_k"] = 20
        else:
            case["temperature"] = 0
        if i % 5 == 2:
            case["stop"] = ["e", "th"]
        if i % 7 == 3:
            case["repetition_penalty"] = 1.3
        if i % 6 == 4:
            case["min_tokens"] = case["max_tokens"]
        cases.append(case)
    return cases


def _alone(model, case) -> str:
    """What runtime.generate gives this request alone (a setting left out: the artifact's default, in both)."""
    return model.generate(case["prompt"], max_new_tokens=case["max_tokens"], min_new_tokens=case.get("min_tokens", 0),
                          do_sample=case["temperature"] > 0, temperature=case["temperature"],
                          top_k=case.get("top_k"), top_p=case.get("top_p"),
                          repetition_penalty=case.get("repetition_penalty"), seed=case.get("seed"),
                          stop=case.get("stop"))


def _create(api: openai.OpenAI, case: dict, **kwargs):
    extra = {k: case[k] for k in ("top_k", "repetition_penalty", "min_tokens") if k in case}
    standard = {k: v for k, v in case.items() if k not in extra and k != "extra"}
    extra.update(case.get("extra", {}))  # our extensions (e.g. speculative)
    return api.completions.create(model=NAME, extra_body=extra or None, **standard, **kwargs)


def test_concurrent_mixed_requests_give_what_each_gives_alone(served_any):
    server, model = served_any
    api, cases = client(server), _cases()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: _create(api, case), cases))
    for case, result in zip(cases, results):
        (only,) = result.choices
        assert only.text == _alone(model, case), case
        assert only.finish_reason in ("stop", "length")
        assert result.usage.prompt_tokens == len(model.tokenizer.encode(case["prompt"]).ids)
        assert 1 <= result.usage.completion_tokens <= case["max_tokens"]
        if only.finish_reason == "length":
            assert result.usage.completion_tokens == case["max_tokens"]
    metrics = httpx.get(server.url + "/metrics").text
    assert "gptexport_batch_occupancy_bucket" in metrics


LOOPING = ["Hello world, hello world, hello world", "a b c d a b c d a b", "The cat sat on the mat. The cat"]


def test_speculative_requests_give_what_each_gives_alone_among_plain_ones(served):
    """`"speculative": "prompt_lookup"`: greedy requests give runtime.generate's plain text, streamed or not,
    while plain requests run beside them; drafts are checked and accepted (the metrics count them)."""
    server, model = served
    api = client(server)
    before = _speculative_counts(server)
    spec = [{"prompt": LOOPING[i % 3], "max_tokens": 12 + 4 * i, "temperature": 0,
             "extra": {"speculative": "prompt_lookup", **({"num_speculative_tokens": i + 1} if i % 2 else {})}}
            for i in range(6)]
    cases = spec + _cases()[:6]
    streamed = {1, 4}

    def run(i_case):
        i, case = i_case
        if i in streamed:
            return "".join(c.choices[0].text for c in _create(api, case, stream=True))
        return _create(api, case).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(run, enumerate(cases)))
    for case, text in zip(cases, texts):
        assert text == _alone(model, case), case
    drafted, accepted = (after - b for after, b in zip(_speculative_counts(server), before))
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    sampled = _create(api, {"prompt": LOOPING[0], "max_tokens": 16, "temperature": 1.0, "seed": 3,
                            "extra": {"speculative": "prompt_lookup"}})
    assert sampled.choices[0].finish_reason == "length" and sampled.usage.completion_tokens == 16


def _speculative_counts(server) -> tuple:
    metrics = httpx.get(server.url + "/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("gptexport_speculative_")}
    return (value.get("gptexport_speculative_draft_tokens_total", 0.0),
            value.get("gptexport_speculative_accepted_tokens_total", 0.0))


def test_streams_concurrently_give_the_pieces_of_model_stream(served_any):
    server, model = served_any
    api, cases = client(server), _cases()[:8]

    def stream(case):
        return [chunk.choices[0].text for chunk in _create(api, case, stream=True) if chunk.choices]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, cases))
    for case, texts in zip(cases, results):
        alone = model.stream(case["prompt"], max_new_tokens=case["max_tokens"],
                             min_new_tokens=case.get("min_tokens", 0), do_sample=case["temperature"] > 0,
                             temperature=case["temperature"], top_k=case.get("top_k"),
                             top_p=case.get("top_p"), repetition_penalty=case.get("repetition_penalty"),
                             seed=case.get("seed"), stop=case.get("stop"))
        assert [t for t in texts if t] == list(alone), case  # same pieces: no split character, no partial stop


def test_stream_wire_format_ends_with_done_and_usage(served):
    server, _ = served
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])


def test_choices_prompt_lists_and_token_ids(served):
    server, model = served
    api = client(server)
    result = api.completions.create(model=NAME, prompt=PROMPTS[:2], n=3, max_tokens=6, temperature=1.0, seed=7)
    assert [c.index for c in result.choices] == list(range(6))
    for c in result.choices:  # choice i of a prompt: what seed + i gives alone
        prompt, i = PROMPTS[c.index // 3], c.index % 3
        assert c.text == model.generate(prompt, max_new_tokens=6, do_sample=True, seed=7 + i)
    ids = model.tokenizer.encode(PROMPTS[2]).ids
    by_ids = api.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = api.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = api.completions.create(model=NAME, prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert len(both.choices) == 2 and both.usage.prompt_tokens == len(ids) + 2


def test_echo_and_logprobs(served):
    server, model = served
    api = client(server)
    echoed = api.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + model.generate(PROMPTS[0], max_new_tokens=4)
    result = api.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3,
                                    extra_body={"min_tokens": 8})
    lp = result.choices[0].logprobs
    text, tokens, expected = model.generate(PROMPTS[1], max_new_tokens=8, min_new_tokens=8, return_tokens=True,
                                            return_logprobs=True)
    assert len(lp.tokens) == len(tokens) == 8
    np.testing.assert_allclose(lp.token_logprobs, expected, atol=1e-4)
    for chosen, top, logprob in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        # greedy: the chosen token is the best (its logprob is float32 log-softmax, the top list float64)
        assert len(top) == 3 and max(top.values()) >= logprob - 1e-5
        assert top.get(chosen) == pytest.approx(logprob)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if "bytes:" not in "".join(lp.tokens):
        assert "".join(lp.tokens) == text
        assert [text[o:] for o in lp.text_offset] == ["".join(lp.tokens[i:]) for i in range(len(lp.tokens))]


def test_models_health_metrics_and_chat(served):
    server, _ = served
    api = client(server)
    assert [m.id for m in api.models.list().data] == [NAME]
    assert api.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics")
    for name in ("gptexport_requests_total", "gptexport_prompt_tokens_total", "gptexport_generation_tokens_total",
                 "gptexport_time_to_first_token_seconds_bucket", "gptexport_inter_token_latency_seconds_bucket",
                 "gptexport_queue_time_seconds_bucket", "gptexport_queue_depth", "gptexport_running_sequences",
                 "gptexport_batch_occupancy_bucket"):
        assert name in metrics.text, name
    with pytest.raises(openai.NotFoundError, match="/v1/completions"):
        api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])


BAD = [  # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"", 400, None, "empty"),
    ([1, 2], 400, None, "JSON object"),
    ({"prompt": "hi"}, 400, "model", "model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
    ({"model": NAME}, 400, "prompt", "required"),
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "empty"),
    ({"model": NAME, "prompt": ["a", ""]}, 400, "prompt", "prompt 1 of the list is empty"),
    ({"model": NAME, "prompt": 5}, 400, "prompt", "5"),
    ({"model": NAME, "prompt": [1, "a"]}, 400, "prompt", "list"),
    ({"model": NAME, "prompt": [99999999]}, 400, "prompt", "99999999"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens", "'8'"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", "context"),
    ({"model": NAME, "prompt": "hi", "temperature": -0.5}, 400, "temperature", "-0.5"),
    ({"model": NAME, "prompt": "hi", "temperature": True}, 400, "temperature", "True"),
    ({"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"model": NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p", "1.5"),
    ({"model": NAME, "prompt": "hi", "n": 1000}, 400, "n", "1000"),
    ({"model": NAME, "prompt": ["hi"] * 10, "n": 16}, 400, "n", "160 sequences"),
    ({"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream", "'yes'"),
    ({"model": NAME, "prompt": "hi", "logprobs": 9}, 400, "logprobs", "9"),
    ({"model": NAME, "prompt": "hi", "logprobs": 1, "echo": True}, 400, "echo", "echo"),
    ({"model": NAME, "prompt": "hi", "seed": -1}, 400, "seed", "-1"),
    ({"model": NAME, "prompt": "hi", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens", "50"),
    ({"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": NAME, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"model": NAME, "prompt": "\ud800"}, 400, "prompt", "UTF-8"),
    ({"model": NAME, "prompt": "hi", "speculative": "medusa"}, 400, "speculative", "'medusa'"),
    ({"model": NAME, "prompt": "hi", "speculative": "/tmp/draft"}, 400, "speculative", "'prompt_lookup'"),
    ({"model": NAME, "prompt": "hi", "speculative": "prompt_lookup", "num_speculative_tokens": 0}, 400,
     "num_speculative_tokens", "[1, 64]"),
    ({"model": NAME, "prompt": "hi", "speculative": "prompt_lookup", "num_speculative_tokens": 65}, 400,
     "num_speculative_tokens", "65"),
    ({"model": NAME, "prompt": "hi", "speculative": "prompt_lookup", "num_speculative_tokens": True}, 400,
     "num_speculative_tokens", "True"),
    ({"model": NAME, "prompt": "hi", "num_speculative_tokens": 4}, 400, "num_speculative_tokens", "needs"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_an_openai_error_naming_it(served, body, status, param, words):
    server, _ = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error


def test_body_over_the_limit_is_413_and_unknown_routes_404(served):
    server, _ = served
    response = httpx.post(server.url + "/v1/completions", content=b" " * (2 << 20))
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(server.url + "/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4), max_leaves=8)
_FIELD = {"model": st.just(NAME) | _JSON, "prompt": st.text(max_size=12) | st.lists(st.integers(-5, 60000),
                                                                                   max_size=5) | _JSON,
          "max_tokens": st.integers(-2, 6) | _JSON, "temperature": st.floats(-1, 3) | _JSON,
          "top_p": st.floats(-0.5, 1.5) | _JSON, "n": st.integers(-1, 3) | _JSON, "stream": st.booleans() | _JSON,
          "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | _JSON,
          "logprobs": st.integers(-1, 6) | _JSON, "echo": st.booleans() | _JSON, "seed": st.integers(-3, 9) | _JSON,
          "top_k": st.integers(-2, 5) | _JSON, "min_tokens": st.integers(-1, 4) | _JSON}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=_FIELD) | _JSON)
def test_fuzzed_bodies_never_get_a_500_or_a_traceback(served, body):
    server, _ = served
    response = httpx.post(server.url + "/v1/completions", content=json.dumps(body).encode(), timeout=60)
    assert response.status_code in (200, 400, 404), response.text
    assert "Traceback" not in response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
