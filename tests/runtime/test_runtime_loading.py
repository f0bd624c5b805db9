"""Issue 17 items 11, 12 and 14: the model cache behind runtime.generate, thread counts from the cores this process
may use, and an artifact pinned by its manifest's digest and loaded from the bytes that were verified."""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest

import fake_artifact as fa
from fake_artifact import CONTINUATION
from gptexport import runtime
from gptexport.runtime import model as rm
from gptexport.runtime import session as rs
from gptexport.runtime.errors import ArtifactError, ProviderError

ROOT = Path(__file__).resolve().parents[2]


def _digest(directory) -> str:
    return hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest()


def _replace_like_force(target: Path, next_map: dict, tmp_path: Path) -> None:
    """What `gptexport --force` does to an existing target: a new artifact renamed into its place."""
    staging = tmp_path / "staging"
    fa.build(staging, next_map=next_map)
    old = tmp_path / "old"
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old)


@pytest.fixture
def cache(monkeypatch):
    fresh = rm._ModelCache(size=2)
    monkeypatch.setattr(rm, "_CACHE", fresh)
    return fresh


# -- item 11: the module-level cache --------------------------------------------------------------------------

def test_generate_picks_up_an_artifact_replaced_in_place(artifact, tmp_path, cache):
    assert runtime.generate(artifact, "xa", max_new_tokens=20) == CONTINUATION
    _replace_like_force(artifact, fa.chain("a", "NEW!"), tmp_path)
    assert runtime.generate(artifact, "xa", max_new_tokens=20) == "NEW!"
    assert len(cache.models) == 1  # the stale model was dropped, not kept beside the new one


def _slow_load(monkeypatch, delay=0.3):
    """Replace load() by one that records how many loads run at once."""
    state = {"active": 0, "peak": 0, "calls": []}
    lock, real = threading.Lock(), rm.load

    def slow(directory, **kwargs):
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            state["calls"].append(Path(directory).name)
        time.sleep(delay)
        try:
            return real(directory, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(rm, "load", slow)
    return state


def test_two_artifacts_load_in_parallel_and_one_loads_once(tmp_path, monkeypatch, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    fa.build(a, next_map=fa.chain("a", CONTINUATION))
    fa.build(b, next_map=fa.chain("a", "bcd"))
    state = _slow_load(monkeypatch)
    jobs = [a, b] * 4
    out = [None] * len(jobs)

    def call(i):
        out[i] = runtime.generate(jobs[i], "xa", max_new_tokens=20)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == [CONTINUATION, "bcd"] * 4
    assert sorted(state["calls"]) == ["a", "b"]  # each artifact loaded once for 4 callers
    assert state["peak"] == 2  # and the two loads overlapped: neither waited for the other's lock


def test_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch, cache):
    dirs = [tmp_path / name for name in "abc"]
    for d in dirs:
        fa.build(d, next_map=fa.chain("a", CONTINUATION))
    state = _slow_load(monkeypatch, delay=0)
    for d in [dirs[0], dirs[1], dirs[0], dirs[2], dirs[0], dirs[1]]:  # b is least recently used when c arrives
        runtime.generate(d, "xa", max_new_tokens=1)
    assert state["calls"] == ["a", "b", "c", "b"]
    assert len(cache.models) == 2 and rm.GENERATE_CACHE_SIZE >= 2


# -- item 12: threads ------------------------------------------------------------------------------------------

def _cgroup(tmp_path, monkeypatch, proc_line: str, files: dict):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    monkeypatch.setattr(rs, "CGROUP_ROOT", root)
    monkeypatch.setattr(rs, "PROC_SELF_CGROUP", proc)


def test_cores_follow_the_cpu_affinity_not_the_machine(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, "0::/", {})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert rs.available_cores() == 3


@pytest.mark.parametrize("proc_line, files, cores", [
    ("0::/box", {"box/cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 CPUs rounds up
    ("0::/box/inner", {"box/cpu.max": "200000 100000\n", "box/inner/cpu.max": "max 100000\n"}, 2),  # an ancestor's
    ("0::/", {"cpu.max": "100000 100000\n"}, 1),  # a container sees its own cgroup at the root
    ("0::/box", {"box/cpu.max": "max 100000\n"}, 8),  # no quota: the affinity
    ("4:cpu,cpuacct:/docker/x", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
                                 "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ("4:cpu,cpuacct:/docker/x", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "-1\n",
                                 "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 8),  # v1, no quota
])
def test_cores_are_capped_by_a_cgroup_quota(tmp_path, monkeypatch, proc_line, files, cores):
    _cgroup(tmp_path, monkeypatch, proc_line, files)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert rs.available_cores() == cores


def _intra_op(model) -> int:
    return int(model.decoder.session.get_session_options().intra_op_num_threads)


def test_sessions_use_the_available_cores_and_threads_overrides(artifact, tmp_path, monkeypatch, cache):
    _cgroup(tmp_path, monkeypatch, "0::/", {"cpu.max": "200000 100000\n"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert _intra_op(runtime.load(artifact)) == 2
    assert _intra_op(runtime.load(artifact, threads=5)) == 5
    runtime.generate(artifact, "xa", max_new_tokens=1, threads=3)
    assert [_intra_op(m) for m in cache.models.values()] == [3]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ProviderError, match="threads must be None .* or an integer >= 1"):
            runtime.load(artifact, threads=bad)


def _spinning(model):
    """The session's allow_spinning entry ("0": off), or None when unset (onnxruntime's default: on)."""
    try:
        return model.decoder.session.get_session_options().get_session_config_entry(rs.SPINNING)
    except RuntimeError:  # "does not have configuration with key"
        return None


def test_a_server_s_sessions_do_not_spin_between_runs(artifact):
    """gptrun serve loads with spin_threads=False: the idle intra-op threads sleep; generate keeps the default."""
    from gptexport.runtime.serve.loader import load_for_serving

    assert _spinning(load_for_serving(artifact)[0]) == "0"
    assert _spinning(load_for_serving(artifact, spin_threads=True)[0]) is None
    assert _spinning(runtime.load(artifact)) is None


# -- item 14: pinning the manifest, loading the verified bytes -------------------------------------------------

def test_a_pinned_manifest_loads_and_any_other_is_refused(artifact):
    digest = _digest(artifact)
    model = runtime.load(artifact, manifest_sha256=digest.upper())
    assert model.manifest_sha256 == digest
    # an attacker who can write the directory rewrites the graph and the manifest to match: checksums pass
    onnx.save(fa.make_graph(fa.make_table(fa.chain("a", "evil"))), str(artifact / "model.onnx"))
    runtime.write_manifest(artifact, fa.manifest_body())
    assert runtime.load(artifact).generate("xa", max_new_tokens=20) == "evil"
    with pytest.raises(ArtifactError, match=f"has sha256 {_digest(artifact)}, not the pinned {digest}") as info:
        runtime.load(artifact, manifest_sha256=digest)
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match="not the pinned"):
        runtime.generate(artifact, "xa", manifest_sha256=digest)


@pytest.mark.parametrize("bad", ["abc", "g" * 64, 12, b"0" * 64])
def test_a_malformed_pin_is_one_line(artifact, bad):
    with pytest.raises(ArtifactError, match="manifest_sha256 must be a sha256 digest"):
        runtime.load(artifact, manifest_sha256=bad)


def test_gptrun_pins_the_manifest(artifact):
    def gptrun(*args):
        return subprocess.run([sys.executable, "-m", "gptexport.runtime.cli", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    digest = _digest(artifact)
    ok = gptrun("generate", artifact, "xa", "--max-new-tokens", 20, "--manifest-sha256", digest, "--threads", 1)
    assert ok.returncode == 0 and ok.stdout == CONTINUATION + "\n", ok.stderr
    info = gptrun("info", artifact)
    assert f"manifest sha256: {digest}" in info.stdout
    bad = gptrun("generate", artifact, "xa", "--manifest-sha256", "0" * 64)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("gptrun: error:") and "not the pinned" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    threads = gptrun("generate", artifact, "xa", "--threads", 0)
    assert threads.returncode == 2 and "threads must be" in threads.stderr


def test_the_graph_onnxruntime_loads_is_the_one_verified(artifact, monkeypatch):
    """model.onnx swapped after it was hashed but before onnxruntime opens it: the verified bytes are used."""
    real = rm.create_session
    evil = artifact.parent / "evil.onnx"
    onnx.save(fa.make_graph(fa.make_table(fa.chain("a", "evil"))), str(evil))

    def swap_then_open(path, *args, **kwargs):
        os.replace(evil, path)  # the window: after verification, before onnxruntime reads the file
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rm, "create_session", swap_then_open)
    assert runtime.load(artifact, verify="full").generate("xa", max_new_tokens=20) == CONTINUATION


def test_the_tokenizer_loaded_is_the_one_verified(artifact, monkeypatch):
    from gptexport.runtime import manifest as rmanifest  # runtime.load reads its files through it

    real = rmanifest.read_verified
    calls = []

    def spy(directory, name, manifest, verify="auto"):
        data = real(directory, name, manifest, verify)
        calls.append(name)
        (Path(directory) / name).write_bytes(b"{}")  # rewritten right after the verified read
        return data

    monkeypatch.setattr(rmanifest, "read_verified", spy)
    assert runtime.load(artifact, verify="full").generate("xa", max_new_tokens=20) == CONTINUATION
    assert calls == ["tokenizer.json", "model.onnx"]


def test_a_file_modified_after_the_manifest_is_still_refused(artifact):
    graph = (artifact / "model.onnx").read_bytes()
    (artifact / "model.onnx").write_bytes(graph[:-1] + bytes([graph[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="checksum of model.onnx does not match"):
        runtime.load(artifact, verify="full")
