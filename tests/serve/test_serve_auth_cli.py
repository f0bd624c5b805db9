"""Auth (key from a file or the environment, constant-time compare), a concat artifact on the slower path, and
`gptrun serve`'s bad input (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gptexport import runtime
from serve_helpers import ROOT

KEY = "s3cret-key"


def test_a_key_from_a_file_guards_v1_but_not_health(serve_artifacts, start_server, tmp_path):
    _, shared = serve_artifacts("gpt2")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server = start_server(shared, "--api-key-file", key_file, "--model-name", "tiny")
    assert KEY not in " ".join(map(str, server.proc.args))  # not visible in ps
    assert httpx.get(server.url + "/health").status_code == 200
    missing = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=3).choices[0].text is not None
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"Basic {KEY}"}).status_code == 401


def test_a_key_from_the_environment_and_no_cors_by_default(serve_artifacts, start_server):
    _, shared = serve_artifacts("gpt2")
    server = start_server(shared, env={"GPTEXPORT_API_KEY": KEY})
    headers = {"authorization": f"Bearer {KEY}", "origin": "http://evil.example"}
    response = httpx.get(server.url + "/v1/models", headers=headers)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_a_concat_artifact_is_served_on_the_slower_path_with_the_same_tokens(serve_artifacts, start_server):
    concat, _ = serve_artifacts("gpt2")
    server = start_server(concat, "--model-name", "tiny", "--max-batch", 3)
    assert "kv concat: slower path" in server.output()
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompts = ["Once upon a time", "Hello", "The quick brown fox"]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: api.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0.9,
                                                             seed=5).choices[0].text, prompts))
    assert got == [runtime.generate(concat, p, max_new_tokens=12, do_sample=True, temperature=0.9, seed=5)
                   for p in prompts]


@pytest.mark.parametrize("args,words", [
    (["/nonexistent/artifact"], "/nonexistent/artifact"),
    (["{artifact}", "--max-batch", "0"], "--max-batch"),
    (["{artifact}", "--port", "70000"], "--port"),
    (["{artifact}", "--api-key-file", "/nonexistent/key"], "/nonexistent/key"),
    (["{artifact}", "--api-key", ""], "empty"),
    (["{artifact}", "--provider", "tpu"], "tpu"),
])
def test_bad_serve_arguments_are_one_line_and_exit_2(serve_artifacts, args, words):
    _, shared = serve_artifacts("gpt2")
    argv = [a.format(artifact=shared) for a in args]
    result = subprocess.run([sys.executable, "-m", "gptexport.runtime.cli", "serve", *argv, "--port", "0"]
                            if "--port" not in argv else [sys.executable, "-m", "gptexport.runtime.cli", "serve",
                                                          *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptrun: error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
