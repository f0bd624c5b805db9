"""Optimum both ways, on tiny checkpoints: our artifacts load in Optimum, Optimum's exports are adopted by us.

    python bench/optimum_interop.py [--venv build/optimum-venv] [--work DIR] [--models gpt2 gptj-partial-rotary]

optimum-onnx pins transformers below 4.58 and imports torch, so it runs in its own virtual environment, made here
once (`python -m venv`, torch==2.13.0 first, then optimum-onnx[onnxruntime] and transformers<4.58). For each
tiny checkpoint (seeded random weights, tests/tiny_models.py):

    ours -> Optimum   gptexport CKPT -o OURS; ORTModelForCausalLM.from_pretrained(OURS) greedy == our runtime's
    Optimum -> ours   optimum-cli export onnx --task text-generation-with-past; gptexport adopt OPT -o ADOPTED
                      --checkpoint CKPT; our runtime on ADOPTED greedy == Optimum's on OPT; then again with our
                      passes (--fuse --kv-layout shared_buffer --strict: every fusion count reached), greedy ==
                      Optimum's and == our own export's

Greedy tokens are compared for each prompt alone and for a left-padded batch of all of them. Prints a table;
exits 1 if any pair differs. BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the test suite's seeded checkpoints

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog because", "In 1991, the remains of"]
NEW_TOKENS = 16

# Runs in the Optimum venv: greedy tokens of ORTModelForCausalLM for each prompt alone, then as one padded batch.
OPTIMUM_GREEDY = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
directory, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(directory)
tok.pad_token, tok.padding_side = tok.eos_token, "left"
model = ORTModelForCausalLM.from_pretrained(directory)
def greedy(batch):
    enc = tok(batch, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()
print(json.dumps({"single": [greedy([p])[0] for p in prompts], "batch": greedy(prompts)}))
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


def optimum_venv(path: Path) -> Path:
    """The venv with optimum-onnx (made once; torch==2.13.0 goes in first so nothing pulls another torch)."""
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import optimum.onnxruntime"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"making {path} (torch==2.13.0, optimum-onnx, transformers<4.58) ...", flush=True)
    run([sys.executable, "-m", "venv", path])
    run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0"])
    run([python, "-m", "pip", "install", "--quiet", "optimum-onnx[onnxruntime]", "transformers<4.58"])
    return python


def ours_greedy(directory: Path) -> dict:
    from gptexport import runtime

    model = runtime.load(directory)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_tokens=True)
    return {"single": [model.generate([p], **kwargs)[1][0] for p in PROMPTS],
            "batch": model.generate(PROMPTS, **kwargs)[1]}


def optimum_greedy(python: Path, directory: Path) -> dict:
    return json.loads(run([python, "-c", OPTIMUM_GREEDY, directory, json.dumps(PROMPTS), NEW_TOKENS]).stdout
                      .strip().splitlines()[-1])


def _agree(a: dict, b: dict) -> str:
    rows = a["single"] + a["batch"], b["single"] + b["batch"]
    same = sum(x == y for x, y in zip(*rows))
    return f"{same}/{len(rows[0])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / "build" / "optimum-venv")
    parser.add_argument("--work", type=Path, default=None, help="Where to write (default: a temporary directory).")
    parser.add_argument("--models", nargs="+", default=["gpt2", "gptj-partial-rotary"])
    args = parser.parse_args()
    from tiny_models import make_checkpoint

    python = optimum_venv(args.venv)
    versions = run([python, "-c", "import optimum.version as o, transformers as t, onnxruntime as r, torch; "
                    "print(f'optimum-onnx env: optimum {o.__version__}, transformers {t.__version__}, '"
                    "f'onnxruntime {r.__version__}, torch {torch.__version__}')"]).stdout.strip()
    print(versions)
    work = args.work or Path(tempfile.mkdtemp(prefix="optimum-interop-"))
    rows, ok = [], True
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in args.models:
        base = work / name
        ckpt = base / "checkpoint"
        ckpt.mkdir(parents=True, exist_ok=True)
        make_checkpoint(ckpt, name)
        start = time.perf_counter()  # ours -> Optimum
        run([sys.executable, "-m", "gptexport.exporter.cli", ckpt, "-o", base / "ours", "--force"], env=env)
        mine, theirs = ours_greedy(base / "ours"), optimum_greedy(python, base / "ours")
        rows.append((name, "ours -> Optimum", "gptexport artifact in ORTModelForCausalLM", _agree(mine, theirs),
                     time.perf_counter() - start))
        ok &= mine == theirs
        start = time.perf_counter()  # Optimum -> ours
        run([python.parent / "optimum-cli", "export", "onnx", "--model", ckpt, "--task", "text-generation-with-past",
             base / "optimum"], env=env)
        adopted = run([sys.executable, "-m", "gptexport.exporter.cli", "adopt", base / "optimum", "-o",
                       base / "adopted", "--checkpoint", ckpt, "--force"], env=env)
        print(adopted.stdout.strip())
        mine, theirs = ours_greedy(base / "adopted"), optimum_greedy(python, base / "optimum")
        rows.append((name, "Optimum -> ours", "adopted export in gptexport.runtime", _agree(mine, theirs),
                     time.perf_counter() - start))
        ok &= mine == theirs
        start = time.perf_counter()  # Optimum -> ours, with our passes: fused, in-place KV cache
        fused = run([sys.executable, "-m", "gptexport.exporter.cli", "adopt", base / "optimum", "-o",
                     base / "adopted-fused", "--fuse", "--kv-layout", "shared_buffer", "--checkpoint", ckpt,
                     "--strict", "--force"], env=env)
        print(fused.stdout.strip())
        mine, ours = ours_greedy(base / "adopted-fused"), ours_greedy(base / "ours")
        rows.append((name, "Optimum -> ours", "adopt --fuse --kv-layout shared_buffer", _agree(mine, theirs),
                     time.perf_counter() - start))
        rows.append((name, "(same)", "  ... against our own export of CKPT", _agree(mine, ours), None))
        ok &= mine == theirs == ours
    print(f"\n{'model':<22} {'direction':<16} {'what runs':<44} {'greedy rows equal':>17} {'seconds':>8}")
    for name, direction, what, agree, seconds in rows:
        print(f"{name:<22} {direction:<16} {what:<44} {agree:>17} {'' if seconds is None else f'{seconds:.1f}':>8}")
    print(f"({len(PROMPTS)} prompts alone + the left-padded batch of all of them, {NEW_TOKENS} new tokens each)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
