"""/v1/embeddings and /v1/classifications (issue 14) as clients meet them: the real server in a subprocess with
torch blocked, the openai client's `embeddings.create`, and plain HTTP for the classification route."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from gptexport import runtime

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog because", "Hi"]
ATOL = 1e-5  # the server runs the same graph as runtime.embed: only summation order differs


@pytest.fixture(scope="module")
def embed_server(head_export, start_server):
    artifact = head_export("gpt2", "feature-extraction")[0]
    return start_server(artifact, "--model-name", "emb"), artifact


@pytest.fixture(scope="module")
def classify_server(head_export, start_server):
    artifact = head_export("gpt2", "text-classification")[0]
    return start_server(artifact, "--model-name", "cls"), artifact


def test_openai_client_embeddings_equal_the_runtime(embed_server):
    server, artifact = embed_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = runtime.embed(artifact, TEXTS)
    got = client.embeddings.create(model="emb", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "emb"
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=ATOL, rtol=0)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    floats = client.embeddings.create(model="emb", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[1], atol=ATOL, rtol=0)
    mean = httpx.post(server.url + "/v1/embeddings", json={"model": "emb", "input": TEXTS, "pooling": "mean"},
                      timeout=60).json()
    np.testing.assert_allclose([d["embedding"] for d in mean["data"]], runtime.embed(artifact, TEXTS, "mean"),
                               atol=ATOL, rtol=0)
    assert "task feature-extraction" in server.output()


def test_embeddings_bad_requests_are_one_clear_error(embed_server):
    server, _ = embed_server
    url = server.url
    cases = [({"model": "emb", "input": ""}, 400, "input 0 is empty"),
             ({"model": "emb", "input": []}, 400, "'input' must be"),
             ({"model": "emb", "input": "word " * 200}, 400, "the model takes at most 128"),
             ({"model": "emb", "input": [[1, 2, 99999999]]}, 400, "outside the vocabulary"),
             ({"model": "emb", "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
             ({"model": "other", "input": "hi"}, 404, "does not exist")]
    for body, status, fragment in cases:
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == status and fragment in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url + "/v1/completions", json={"model": "emb", "prompt": "hi"}, timeout=60)
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/classifications", json={"model": "emb", "input": "hi"}, timeout=60)
    assert r.status_code == 400 and "feature-extraction" in r.json()["error"]["message"]


def test_classifications_route_equals_the_runtime(classify_server):
    server, artifact = classify_server
    r = httpx.post(server.url + "/v1/classifications", json={"model": "cls", "input": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    body, want = r.json(), runtime.classify(artifact, TEXTS)
    assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
    for d, w in zip(body["data"], want):
        assert d["scores"].keys() == w["scores"].keys()
        assert max(abs(d["scores"][k] - w["scores"][k]) for k in w["scores"]) < ATOL
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "cls", "input": "hi"}, timeout=60)
    assert r.status_code == 400 and "/v1/classifications" in r.json()["error"]["message"]
