"""Train the small GPT-2 / GPT-J checkpoints of tests/trained.py (real GPT-2 tokenizer, Python docs and stdlib
sources) into the cache, and print where each is and what it reached. A script, not a test:

    nice -n 10 python bench/train_checkpoint.py gpt2-ci gptj-ci gpt2-bench gptj-bench [--threads 2] [--force]

The tests call `trained.checkpoint("gpt2-ci")` themselves (training on first use); the benchmarks use the
"-bench" presets (up to about half an hour each on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import trained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", choices=sorted(trained.PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    args = parser.parse_args()
    for name in args.presets:
        path = trained.checkpoint(name, threads=args.threads, force=args.force,
                                  log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        report = trained.report(path)
        print(json.dumps({"preset": name, "path": str(path),
                          **{k: report[k] for k in ("heldout_perplexity", "train_tokens", "train_seconds")},
                          "sample": report["sample"]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
