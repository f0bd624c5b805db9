"""Overload, disconnects, faults, timeouts and SIGTERM, against the real server.

The servers here sleep GPTEXPORT_SERVE_STEP_DELAY seconds per decode step, so that requests are reliably in
flight when a test overloads, disconnects from or stops the server (a tiny model would finish first otherwise).
"""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gptexport import runtime
from serve_helpers import launch, wait_ready

NAME = "tiny"
DELAY = 0.05
LONG = {"model": NAME, "prompt": "Hello", "max_tokens": 40, "min_tokens": 40, "temperature": 0}


def _gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _events(response) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def slow(serve_artifacts, start_server):
    _, shared = serve_artifacts("gpt2")
    server = start_server(shared, "--max-batch", 2, "--max-queue", 2, "--model-name", NAME,
                          env={"GPTEXPORT_SERVE_STEP_DELAY": str(DELAY), "GPTEXPORT_SERVE_FAULT": "BOOM"})
    return server, runtime.load(shared)


def test_past_the_queue_429_with_retry_after_and_nothing_accepted_is_lost(slow):
    server, model = slow
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True})
                   for _ in range(4)]  # 2 running + 2 queued: all accepted (headers come back)
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * 4
            refused = http.post(server.url + "/v1/completions", json=LONG)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model=NAME, prompt="Hello", max_tokens=4)
            texts = ["".join(e["choices"][0]["text"] for e in _events(r)[:-1]) for r in responses]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    expected = model.generate("Hello", max_new_tokens=40, min_new_tokens=40)
    assert texts == [expected] * 4


def test_a_client_that_disconnects_has_its_slot_freed_within_a_step(slow):
    server, _ = slow
    body = {**LONG, "max_tokens": 100, "min_tokens": 100, "stream": True}  # 5 s of steps if never cancelled
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the first chunk: the sequence is running
            assert _gauge(server, "gptexport_running_sequences") == 1, server.output()
        gone = time.monotonic()
        while _gauge(server, "gptexport_running_sequences") and time.monotonic() - gone < 10:
            time.sleep(DELAY)
        freed = time.monotonic() - gone
    assert _gauge(server, "gptexport_running_sequences") == 0
    assert freed < 1.5, f"slot freed after {freed:.2f} s"
    time.sleep(0.3)
    assert re.search(r"status=499 prompt_tokens=1 completion_tokens=\d+", server.output())


def test_a_non_streaming_client_that_gives_up_has_its_sequence_cancelled(slow):
    server, _ = slow
    body = {**LONG, "max_tokens": 100, "min_tokens": 100}  # 5 s of steps if never cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    gone = time.monotonic()
    while _gauge(server, "gptexport_running_sequences") and time.monotonic() - gone < 10:
        time.sleep(DELAY)
    assert time.monotonic() - gone < 2.5  # noticed at the next disconnect poll (0.5 s), freed at the next step
    assert _gauge(server, "gptexport_running_sequences") == 0


def test_an_exception_in_one_request_fails_only_that_request(slow):
    server, model = slow
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def call(prompt):
        try:
            return api.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        except openai.InternalServerError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(call, ["BOOM here", "Once upon"])
    assert isinstance(bad, openai.InternalServerError) and "injected fault" in str(bad)
    assert good == model.generate("Once upon", max_new_tokens=6)
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": NAME, "prompt": "BOOM", "max_tokens": 6, "stream": True}) as response:
        events = _events(response)
    assert "error" in events[-2] and events[-1] == "[DONE]"  # an error event, not a cut connection
    assert api.completions.create(model=NAME, prompt="still", max_tokens=2).choices  # still serving


def test_a_request_past_its_timeout_fails_with_504(serve_artifacts, start_server):
    _, shared = serve_artifacts("gpt2")
    server = start_server(shared, "--model-name", NAME, "--request-timeout", 0.5,
                          env={"GPTEXPORT_SERVE_STEP_DELAY": str(DELAY)})
    response = httpx.post(server.url + "/v1/completions", json=LONG, timeout=60)
    assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}) as stream:
        events = _events(stream)
    assert events[-2]["error"]["code"] == "timeout"
    assert httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 2, "min_tokens": 0}).status_code == 200


def test_sigterm_drains_the_requests_in_flight_then_exits_0(serve_artifacts):
    _, shared = serve_artifacts("gpt2")
    server = wait_ready(launch(shared, "--model-name", NAME, env={"GPTEXPORT_SERVE_STEP_DELAY": str(DELAY)}))
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(server.url + "/health").status_code == 503
            refused = httpx.post(server.url + "/v1/completions", json=LONG)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            rest = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines
                    if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
        assert "stopped" in server.output()
    finally:
        server.stop()


def test_past_the_drain_timeout_requests_fail_with_an_error_event(serve_artifacts):
    _, shared = serve_artifacts("gpt2")
    server = wait_ready(launch(shared, "--model-name", NAME, "--drain-timeout", 0.3,
                               env={"GPTEXPORT_SERVE_STEP_DELAY": str(DELAY)}))
    try:
        body = {**LONG, "max_tokens": 100, "min_tokens": 100, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "shutdown" and "drain timeout" in error["message"]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
