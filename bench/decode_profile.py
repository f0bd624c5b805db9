"""Where a decode step's time goes: onnxruntime's profiler per op type, and a Python profile of the loop.

    python bench/decode_profile.py ARTIFACT [--batch 1 8] [--new-tokens 64] [--threads N] [--top 12]

For each batch size: one warm-up generate, then
  1. the generate call under cProfile: wall time, the share inside `InferenceSession.run` / `run_with_iobinding`
     (onnxruntime's own work) and the rest (the Python loop: binding, sampling, log-softmax, bookkeeping), with the
     functions that cost most outside onnxruntime;
  2. the same call with onnxruntime's profiler on (a second session, `enable_profiling`): per op type the summed
     kernel time per decode step, and the gap between a run's wall time and its kernels (onnxruntime's own
     overhead: input/output binding, allocation, thread-pool dispatch).
Prints one markdown section; nothing is asserted. A 32-token prompt, greedy, every row decodes --new-tokens.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptexport import runtime  # noqa: E402
from gptexport.runtime import session as session_mod  # noqa: E402

PROMPT = ("The history of the city begins with a small settlement on the river, where traders met to exchange salt, "
          "grain and cloth. Over the centuries the market grew into a town")


def _is_ort_run(func: tuple) -> bool:
    """cProfile's key of the C methods that run the graph (InferenceSession.run / run_with_iobinding)."""
    name = func[2]
    return "onnxruntime" in name and (name.startswith("<method 'run'") or "run_with_iobinding" in name)


def prompts(model, batch: int) -> list:
    ids = model.tokenizer.encode(PROMPT * 4).ids
    return [model.tokenizer.decode(ids[7 * i:7 * i + 32]) for i in range(batch)]


def python_profile(model, texts: list, new: int, top: int) -> list:
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    model.generate(texts, max_new_tokens=new, min_new_tokens=new)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    in_ort = sum(row[2] for func, row in stats.stats.items() if _is_ort_run(func))
    steps = new  # the prefill plus new - 1 decode steps
    lines = [f"- generate: {wall * 1e3:.1f} ms for {new} tokens ({wall / steps * 1e3:.2f} ms per step, under "
             f"cProfile); inside onnxruntime's run: {in_ort * 1e3:.1f} ms ({in_ort / wall:.0%}); the Python loop "
             f"around it: {(wall - in_ort) / steps * 1e3:.3f} ms per step ({(wall - in_ort) / wall:.0%})",
             "", "| function (outside onnxruntime) | calls | own ms | own ms per step |", "|---|---|---|---|"]
    rows = sorted(((row[2], row[0], func) for func, row in stats.stats.items()
                   if not _is_ort_run(func)), reverse=True)[:top]
    for own, calls, func in rows:
        where = f"{Path(func[0]).name}:{func[1]} {func[2]}" if func[0] != "~" else func[2]
        lines.append(f"| `{where}` | {calls} | {own * 1e3:.1f} | {own / steps * 1e3:.3f} |")
    return lines


def ort_profile(artifact: Path, threads, texts: list, new: int) -> list:
    """Generate once with a profiling session and sum the kernel times per op type over the decode steps."""
    original = session_mod.session_options
    out_dir = tempfile.mkdtemp(prefix="decode-profile-")

    def profiling(threads=None, spin_threads=True):
        options = original(threads, spin_threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(out_dir, "ort")
        return options

    session_mod.session_options = profiling
    try:
        model = runtime.load(artifact, verify="size", threads=threads)
    finally:
        session_mod.session_options = original
    model.generate(texts, max_new_tokens=new, min_new_tokens=new)
    trace = json.loads(Path(model.decoder.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[-(new - 1):]  # the first run is the prefill (and the load's warm-up runs come before)
    lo, hi = decode_runs[0]["ts"], decode_runs[-1]["ts"] + decode_runs[-1]["dur"]
    by_op, kernels = defaultdict(float), 0.0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
            kernels += e["dur"]
    steps = len(decode_runs)
    run_us = sum(r["dur"] for r in decode_runs) / steps
    lines = [f"- onnxruntime profiler, {steps} decode steps: model_run {run_us / 1e3:.3f} ms per step, of which "
             f"kernels {kernels / steps / 1e3:.3f} ms; the rest ({(run_us - kernels / steps) / 1e3:.3f} ms) is "
             "onnxruntime's own per-run work (feeds, fetches, allocation, dispatch)",
             "", "| op type | ms per step | share of kernels |", "|---|---|---|"]
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {us / steps / 1e3:.3f} | {us / kernels:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    model = runtime.load(args.artifact, verify="size", threads=args.threads)
    manifest = model.manifest
    print(f"## decode profile: {args.artifact.name} (dtype {manifest.get('dtype')}, kv layout "
          f"{manifest.get('kv_layout', 'concat')}), {args.new_tokens} new tokens, 32-token prompts")
    for batch in args.batch:
        texts = prompts(model, batch)
        model.generate(texts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)  # warm-up
        print(f"\n### batch {batch}\n")
        print("\n".join(python_profile(model, texts, args.new_tokens, args.top)))
        print()
        print("\n".join(ort_profile(args.artifact, args.threads, texts, args.new_tokens)))


if __name__ == "__main__":
    main()
