"""Prefill memory with and without logits_to_keep (issue 17 item 13): one process, one long prompt, one token.

    python bench/prefill_memory.py ARTIFACT --tokens 1000 --batch 1 --logits last   # the runtime as it is
    python bench/prefill_memory.py ARTIFACT --tokens 1000 --batch 1 --logits all    # every position (before)

Run each in a fresh process (farm-bench --vs 'A' -- B, A B A B). Loading the artifact has its own, higher peak
(the verified graph bytes and the session's weights), so the script resets the kernel's high-water mark after the
load (/proc/self/clear_refs) and prints the peak RSS of the prefill alone, above what was resident before it.
"""

from __future__ import annotations

import argparse
import gc
import os

import numpy as np

from gptexport import runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=1000, help="prompt length in tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--logits", choices=["last", "all"], default="last",
                        help="last: logits_to_keep=1 (the runtime); all: every position (the graph without it)")
    args = parser.parse_args()
    model = runtime.load(args.artifact, threads=1)
    model.decoder.keeps_logits = args.logits == "last"
    ids = np.random.default_rng(0).integers(0, 50000, size=(args.batch, args.tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(args.tokens, dtype=np.int64), ids.shape).copy()
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    logits = model.decoder.step(ids, mask, positions, model.decoder.new_cache(args.batch), logits_to_keep=1)
    peak = _status("VmHWM")
    print(f"logits {args.logits}: batch {args.batch} x {args.tokens} tokens, logits {tuple(logits.shape)} "
          f"{logits.nbytes / 2**20:.1f} MiB; RSS before prefill {before / 1024:.0f} MiB, prefill peak "
          f"{peak / 1024:.0f} MiB (+{(peak - before) / 1024:.0f} MiB)")


def _status(key: str) -> int:
    """A /proc/self/status figure in KiB."""
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


if __name__ == "__main__":
    main()
