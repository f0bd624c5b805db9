"""`gptrun serve --ray` on a local Ray cluster (127.0.0.1): 2 replicas of a tiny artifact behind Ray Serve's HTTP
proxy, driven by the openai client and httpx: parity with runtime.generate, both replicas serve, a replica killed
under load, SIGTERM drains and leaves no Ray process; and the documented config file through Ray's own `serve run`,
whose replicas refuse an artifact that is not the pinned one.

Marker `ray` (`pytest -m ray`); about 2-3 minutes on 2 cores, most of it Ray starting its processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'gptexport[ray]'")

from serve_helpers import BLOCKED, LAUNCHER, ROOT, Server, wait_ready  # noqa: E402

from gptexport import runtime  # noqa: E402
from gptexport.runtime.manifest import manifest_digest  # noqa: E402

pytestmark = pytest.mark.ray
NAME = "tiny"
KEY = "ray-test-key"
HEADER = "x-gptexport-replica"
REFUSED = "gptexport replica refused to start"
FAILED = "Failed to update the deployments"  # Ray's controller, once a deployment cannot start
PROMPTS = ["Hello, my name is", "Once upon a time", "The quick brown fox", "é à ü 漢字 🙂"]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
STEP_DELAY = "0.02"  # seconds per decode step, so that a SIGTERM or a kill finds requests in flight


def _session_processes(sid: int) -> dict:
    """pid -> command line of every live process in session `sid` (what a start_new_session child spawned)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    return found


def _replica_pids(sid: int) -> list:
    return sorted(pid for pid, cmd in _session_processes(sid).items() if cmd.startswith("ray::ServeReplica"))


def _launch_ray(artifact, *args, key_file) -> subprocess.Popen:
    """`gptrun serve ARTIFACT --ray` in its own session (torch and the exporter unimportable in the driver)."""
    env = {**os.environ, **RAY_ENV, "GPTEXPORT_SERVE_STEP_DELAY": STEP_DELAY}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER.format(blocked=BLOCKED), "serve", str(artifact),
                             "--ray", "--port", "0", "--model-name", NAME, "--api-key-file", str(key_file),
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", start_new_session=True)


def _kill_session(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop `proc` with `sig`, then kill whatever of its session is left (after a failed test)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def ray_served(serve_artifacts, tmp_path_factory):
    """(Server, in-process Model, session id): 2 replicas x 1 CPU, 4 slots each, a key read from a file."""
    _, shared = serve_artifacts("gpt2")
    key_file = tmp_path_factory.mktemp("ray-key") / "key"
    key_file.write_text(KEY + "\n")
    proc = _launch_ray(shared, "--replicas", 2, "--replica-cpus", 1, "--max-batch", 4, "--drain-timeout", 30,
                       key_file=key_file)
    try:
        server = wait_ready(proc, timeout=240)
        yield server, runtime.load(shared), proc.pid
    finally:
        _kill_session(proc)


def _api(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _cases() -> list:
    cases = []
    for i in range(16):
        case = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4 + (i * 5) % 17, "temperature": 0}
        if i % 2:
            case.update(temperature=0.8, seed=1000 + i, top_p=0.9)
        cases.append(case)
    return cases


def _alone(model, case) -> str:
    return model.generate(case["prompt"], max_new_tokens=case["max_tokens"], do_sample=case["temperature"] > 0,
                          temperature=case["temperature"], top_p=case.get("top_p"),
                          seed=case.get("seed"))  # a setting left out: the artifact's default, in both


def test_replicas_give_what_runtime_generate_gives(ray_served):
    server, model, _ = ray_served
    api = _api(server)
    cases = _cases()

    def create(case):
        raw = api.completions.with_raw_response.create(model=NAME, **case)
        return raw.headers.get(HEADER), raw.parse()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(create, cases))
    for case, (_, result) in zip(cases, results):
        (only,) = result.choices
        assert only.text == _alone(model, case), case
        assert result.usage.completion_tokens <= case["max_tokens"]
    replicas = {replica for replica, _ in results}
    assert None not in replicas and len(replicas) == 2, f"both replicas should have served, saw {replicas}"

    pieces = [c.choices[0].text for c in api.completions.create(model=NAME, stream=True, **cases[0])]
    assert "".join(pieces) == _alone(model, cases[0])


def test_same_api_and_key_through_the_proxy(ray_served):
    server, _, _ = ray_served
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}  # no key needed
    no_key = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "hi"}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "temperature": -1},
                     headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    models = httpx.get(server.url + "/v1/models", headers=headers, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert "gptexport_requests_total" in httpx.get(server.url + "/metrics", timeout=30).text


def _post(client: httpx.Client, case: dict):
    """(status, body or error text, replica) of one non-streaming request; a cut connection is status None."""
    try:
        r = client.post("/v1/completions", json={"model": NAME, **case}, timeout=120)
    except httpx.TransportError as e:
        return None, f"{type(e).__name__}: {e}", None
    try:
        body = r.json()
    except ValueError:
        body = r.text
    return r.status_code, body, r.headers.get(HEADER)


def test_a_killed_replica_fails_only_its_requests_and_comes_back(ray_served):
    server, model, sid = ray_served
    before = _replica_pids(sid)
    assert len(before) == 2, _session_processes(sid)
    case = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0}
    expected = _alone(model, case)
    results, stop = [], threading.Event()

    def load(client):
        while not stop.is_set():
            results.append(_post(client, case))

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(load, client) for _ in range(8)]
            deadline = time.monotonic() + 60
            while len(results) < 8 and time.monotonic() < deadline:  # traffic is flowing on both
                time.sleep(0.2)
            os.kill(before[0], signal.SIGKILL)
            time.sleep(5)
            stop.set()
            for f in futures:
                f.result()
        ok = [r for r in results if r[0] == 200]
        failed = [r for r in results if r[0] != 200]
        assert ok, results
        for _, body, _ in ok:  # every 200 is a complete answer
            assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "length"
        for status, body, _ in failed:  # the others say so: a 5xx status (or a cut connection), never a 200
            assert status is None or status >= 500, (status, body)

        deadline = time.monotonic() + 180  # Ray replaces the replica
        while time.monotonic() < deadline:
            now = _replica_pids(sid)
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(1)
        assert len(now) == 2 and before[0] not in now, (before, now)
        seen, deadline = set(), time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:  # retried requests succeed, on both replicas
            status, body, replica = _post(client, case)
            if status == 200:
                assert body["choices"][0]["text"] == expected
                seen.add(replica)
            else:
                time.sleep(0.5)
        assert len(seen) == 2, seen


def test_sigterm_drains_and_leaves_no_ray_process(ray_served):
    server, model, sid = ray_served
    proc = server.proc
    case = {"prompt": PROMPTS[1], "max_tokens": 100, "temperature": 0}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(_post, client, case)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            status, body, _ = inflight.result()
    assert proc.wait(120) == 0, server.output()
    assert status == 200 and body["choices"][0]["text"] == _alone(model, case), (status, body)
    output = server.output()
    assert "draining" in output and "stopped" in output, output
    deadline = time.monotonic() + 30
    while _session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(sid), _session_processes(sid)


def test_config_file_replicas_refuse_another_artifact(serve_artifacts, tmp_path):
    """deploy/ray-serve.yaml through Ray's `serve run`: a replica whose artifact is not the pinned one refuses."""
    import yaml

    (concat, shared) = serve_artifacts("gpt2")
    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    app = config["applications"][0]
    config["http_options"] = {"host": "127.0.0.1", "port": _free_port()}
    app["args"] = {"artifact": str(shared), "manifest_sha256": manifest_digest(concat), "max_batch": 2}
    deployment = app["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 1})
    path = tmp_path / "ray-serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    serve_cli = "from ray.serve.scripts import cli; cli()"  # Ray's `serve` command, from this interpreter
    proc = subprocess.Popen([sys.executable, "-c", serve_cli, "run", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(FAILED in line for line in lines):  # Ray gave up after its constructor retries
                break
            time.sleep(0.5)
    finally:
        _kill_session(proc, signal.SIGINT)  # Ctrl-C, as a user stops `serve run`; then whatever is left
    output = "".join(lines)
    refusals = [line for line in output.splitlines() if REFUSED in line]
    assert refusals, output
    assert re.search(rf"has sha256 {manifest_digest(shared)}, not the pinned {manifest_digest(concat)}",
                     refusals[-1]), refusals[-1]
    assert FAILED in output and "Deployed app" not in output, output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gptrun_serve_ray_refuses_an_artifact_that_is_not_the_pinned_one(serve_artifacts, tmp_path):
    """The driver checks its own copy first: one line, exit 2, before any Ray process starts."""
    concat, shared = serve_artifacts("gpt2")
    key = tmp_path / "key"
    key.write_text(KEY)
    proc = _launch_ray(shared, "--manifest-sha256", manifest_digest(concat), key_file=key)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptrun: error: ") and "not the pinned" in lines[0], output
    assert not _session_processes(proc.pid)


def test_ray_options_need_ray(serve_artifacts):
    _, shared = serve_artifacts("gpt2")
    result = subprocess.run([sys.executable, "-m", "gptexport.runtime.cli", "serve", str(shared), "--replicas", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "gptrun: error: --replicas can only be used with --ray"


def test_app_builder_names_a_bad_argument(serve_artifacts):
    from gptexport.runtime.errors import GptexportError
    from gptexport.runtime.serve.ray_app import app_builder

    _, shared = serve_artifacts("gpt2")
    with pytest.raises(GptexportError, match=r"unknown gptexport argument\(s\) 'max_batchs'; accepted: .*max_batch"):
        app_builder({"artifact": str(shared), "max_batchs": 4})
    with pytest.raises(GptexportError, match="args.artifact is required"):
        app_builder({"max_batch": 4})
    with pytest.raises(GptexportError, match="verify must be one of full, auto, got 'size'"):
        app_builder({"artifact": str(shared), "verify": "size"})
    with pytest.raises(GptexportError, match="manifest_sha256 must be a sha256 digest"):
        app_builder({"artifact": str(shared), "manifest_sha256": "abc"})
    assert app_builder({"artifact": str(shared), "max_batch": 2}) is not None  # pins the digest of `artifact`


def test_ray_health_check_is_the_replica_s_own_health():
    """Ray's check_health passes only when /health would answer 200 and the decode loop runs."""
    from types import SimpleNamespace

    from gptexport.runtime.serve.ray_app import GptexportReplica

    check = GptexportReplica.func_or_class.check_health
    running = threading.Event()
    loop = threading.Thread(target=running.wait)
    loop.start()
    try:
        def replica(state, thread):
            service = SimpleNamespace(state=state, error=None, scheduler=SimpleNamespace(_thread=thread))
            return SimpleNamespace(service=service, replica="r1")

        check(replica("ready", loop))
        for state in ("loading", "draining", "failed"):
            with pytest.raises(RuntimeError, match=f"replica r1 is {state}"):
                check(replica(state, loop))
        with pytest.raises(RuntimeError, match="the decode loop has stopped"):
            check(replica("ready", threading.Thread()))
    finally:
        running.set()
        loop.join()
