"""Long runs on one loaded model: resident memory settles, and concurrent callers get exactly the serial outputs.

Sized for CI on a tiny real export (2 layers, 64 wide, the real GPT-2 vocabulary): short prompts, few new tokens.
"""

import inspect
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gptexport import runtime
ROOT = Path(__file__).resolve().parents[2]
WARMUP, CALLS, MAX_GROWTH = 100, 1000, 0.05
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time", "é你😀 unicode", "1 2 3 4", "A", "Why?", "Edge"]


@pytest.fixture(scope="module")
def model(tiny_export):
    return runtime.load(tiny_export("gpt2")[1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _call(model, i: int):
    """The i-th call of a varied workload: greedy, seeded sampling, a padded batch, stop strings, streaming."""
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = i % 5
    if kind == 0:
        return model.generate(prompt, max_new_tokens=4, return_tokens=True)
    if kind == 1:
        return model.generate(prompt, max_new_tokens=4, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                              repetition_penalty=1.2, seed=i, return_tokens=True)
    if kind == 2:
        return model.generate([prompt, "Hi"], max_new_tokens=3, return_tokens=True)
    if kind == 3:
        return model.generate(prompt, max_new_tokens=4, stop=["e", "\n"], return_tokens=True)
    return "".join(model.stream(prompt, max_new_tokens=4, do_sample=True, seed=i))


CHILD = """
import os, sys
from gptexport import runtime
PROMPTS = {prompts!r}
WARMUP, CALLS = {warmup}, {calls}
{rss}
{call}
model = runtime.load(sys.argv[1])
for i in range(WARMUP):
    _call(model, i)
settled = peak = _rss_bytes()
for i in range(CALLS):
    _call(model, WARMUP + i)
    if i % 50 == 0:
        peak = max(peak, _rss_bytes())
print(settled, peak, _rss_bytes())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_resident_memory_settles_over_1000_calls(tiny_export):
    """In a fresh process with only the runtime imported, so the figure is the runtime's own (no torch)."""
    code = CHILD.format(prompts=PROMPTS, warmup=WARMUP, calls=CALLS, rss=inspect.getsource(_rss_bytes),
                        call=inspect.getsource(_call))
    result = subprocess.run([sys.executable, "-c", code, str(tiny_export("gpt2")[1])], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    settled, peak, final = map(int, result.stdout.split())
    growth = (max(peak, final) - settled) / settled
    print(f"RSS settled {settled / 2**20:.1f} MiB after {WARMUP} calls; after {CALLS} more {final / 2**20:.1f} MiB "
          f"(peak {peak / 2**20:.1f} MiB): growth {growth * 100:.2f} %")
    assert growth <= MAX_GROWTH, f"RSS grew {growth * 100:.1f} % over {CALLS} calls ({settled} -> {final} bytes)"


def test_eight_threads_give_the_serial_outputs(model):
    calls = list(range(48))
    serial = [_call(model, i) for i in calls]
    start = threading.Barrier(8)

    def worker(offset):
        start.wait()  # all eight threads generate at once
        return [(i, _call(model, i)) for i in calls[offset::8]]

    with ThreadPoolExecutor(8) as pool:
        results = dict(pair for chunk in pool.map(worker, range(8)) for pair in chunk)
    assert [results[i] for i in calls] == serial


def test_module_generate_loads_once_under_threads(tiny_export, monkeypatch):
    import gptexport.runtime.model as rm

    monkeypatch.setattr(rm, "_CACHE", rm._ModelCache())
    loads, real = [], rm.load
    monkeypatch.setattr(rm, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    artifact = tiny_export("gpt2")[1]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: runtime.generate(artifact, p, max_new_tokens=3), PROMPTS))
    assert len(loads) == 1 and all(isinstance(t, str) for t in texts)
