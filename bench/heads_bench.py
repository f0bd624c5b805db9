"""Embeddings/s and classifications/s (issue 14): gptexport's head artifacts against transformers and Optimum.

    python bench/heads_bench.py prepare --work DIR [--engines ...]   # checkpoints, our exports, Optimum's exports
    python bench/heads_bench.py run --work DIR           # the table: each engine in a fresh process
    python bench/heads_bench.py one --work DIR --engine E --task T --batch B   # one figure as JSON (A/B pairs)

GPT-2 124M shapes (12 layers x 768) with seeded random weights (speed does not depend on the values), saved as
GPT2Model (feature-extraction) and GPT2ForSequenceClassification (text-classification, 2 labels). Inputs: `batch`
rows of `--seq` (128) random token ids, no padding, the same in every engine (Optimum's GPT-2 export also takes
position_ids: it gets 0..seq-1, what ours computes from the mask). Engines:

    ours          gptexport artifact, fp32 (fused), runtime.heads session
    ours-int8     gptexport --int8 (the default int8 kernel: token for these tasks; an export made before that default
                  is nbits: re-export)
    ours-int8-nbits    gptexport --int8 --int8-kernel nbits (MatMulNBits 8-bit, block 32, activations per token and
                  block inside the kernel)
    ours-int8-token    gptexport --int8 --int8-kernel token (MatMulIntegerToFloat, activations per token quantized
                  in the graph, weights per column: batch-invariant)
    ours-int8-dynamic  gptexport --int8 --int8-kernel dynamic (DynamicQuantizeMatMul: activations per tensor, as
                  Optimum's dynamic int8; weights per column)
    torch         transformers' class, eager, torch.no_grad, the same thread count
    optimum       optimum-cli export onnx --task feature-extraction|text-classification, ORTModelFor... (its venv)
    optimum-int8  the same graph through optimum-cli onnxruntime quantize --avx2 (dynamic int8, per channel)

Every engine gets `--threads` intra-op threads (default 2), runs 2 warm-up calls, then as many calls as fit in
`--seconds` (at least 3); the figure is rows per second (embeddings or classifications). optimum-onnx pins
transformers below 4.58 and imports torch, so it runs in its own venv (bench/optimum_interop.py makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"feature-extraction": ("GPT2Model", "ORTModelForFeatureExtraction", "embeddings/s"),
         "text-classification": ("GPT2ForSequenceClassification", "ORTModelForSequenceClassification",
                                 "classifications/s")}
ENGINES = ("ours", "ours-int8", "ours-int8-nbits", "ours-int8-token", "ours-int8-dynamic", "torch", "optimum",
           "optimum-int8")
INT8_KERNELS = ("nbits", "token", "dynamic")  # gptexport --int8-kernel: the ours-int8-KERNEL engines
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257, bos_token_id=50256,
                 eos_token_id=50256, pad_token_id=50256, num_labels=2)
DEFAULT_VENV = Path("/work/cache/optimum-venv")

# Runs in the Optimum venv: one measurement, printed as JSON.
OPTIMUM_ONE = """
import json, sys, time, numpy as np, torch
import onnxruntime as ort
from optimum import onnxruntime as opt
directory, cls, batch, seq, threads, seconds, name = sys.argv[1:8]
batch, seq, threads, seconds = int(batch), int(seq), int(threads), float(seconds)
torch.set_num_threads(threads)
options = ort.SessionOptions(); options.intra_op_num_threads = threads
kwargs = {"file_name": name} if name != "-" else {}
model = getattr(opt, cls).from_pretrained(directory, session_options=options, provider="CPUExecutionProvider", **kwargs)
ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50257, (batch, seq)))
mask = torch.ones_like(ids)
feeds = dict(input_ids=ids, attention_mask=mask)
if "position_ids" in model.input_names:  # Optimum's GPT-2 export takes them (ours computes them from the mask)
    feeds["position_ids"] = torch.arange(seq).expand(batch, seq)
for _ in range(2):
    model(**feeds)
calls, start = 0, time.perf_counter()
while calls < 3 or time.perf_counter() - start < seconds:
    model(**feeds); calls += 1
print(json.dumps({"rows_per_s": batch * calls / (time.perf_counter() - start), "calls": calls}))
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


def paths(work: Path, task: str) -> dict:
    short = {"feature-extraction": "fe", "text-classification": "tc"}[task]
    return {"ckpt": work / f"ckpt-{short}", "ours": work / f"ours-{short}-fp32", "ours-int8": work / f"ours-{short}-int8",
            **{f"ours-int8-{k}": work / f"ours-{short}-int8-{k}" for k in INT8_KERNELS},
            "optimum": work / f"optimum-{short}", "optimum-int8": work / f"optimum-{short}-int8"}


def prepare(work: Path, venv: Path, engines=ENGINES) -> None:
    import torch
    import transformers

    from gptexport.exporter.tokenizer import gpt2_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    for task, (cls, _, _) in TASKS.items():
        p = paths(work, task)
        if not (p["ckpt"] / "config.json").exists():
            torch.manual_seed(0)
            getattr(transformers, cls)(transformers.GPT2Config(**GPT2_124M)).save_pretrained(str(p["ckpt"]))
            gpt2_tokenizer(50257).save(str(p["ckpt"] / "tokenizer.json"))
        kernels = [(f"ours-int8-{k}", ["--int8", "--int8-kernel", k]) for k in INT8_KERNELS]
        for engine, flags in [("ours", []), ("ours-int8", ["--int8"]), *kernels]:
            if engine in engines and not (p[engine] / "manifest.json").exists():
                print(f"gptexport {p['ckpt'].name} {' '.join(flags)} ...", flush=True)
                run([sys.executable, "-m", "gptexport.exporter.cli", p["ckpt"], "-o", p[engine], "--force", *flags])
        if not (p["optimum"] / "model.onnx").exists():
            print(f"optimum-cli export onnx --task {task} ...", flush=True)
            run([venv / "bin" / "optimum-cli", "export", "onnx", "--model", p["ckpt"], "--task", task, p["optimum"]])
        if not any(p["optimum-int8"].glob("*.onnx")):
            print("optimum-cli onnxruntime quantize --avx2 ...", flush=True)
            run([venv / "bin" / "optimum-cli", "onnxruntime", "quantize", "--onnx_model", p["optimum"], "--avx2",
                 "-o", p["optimum-int8"]])


def one(work: Path, engine: str, task: str, batch: int, seq: int, threads: int, seconds: float,
        venv: Path) -> dict:
    """One measurement in this process (ours, torch) or in the Optimum venv."""
    import numpy as np

    p = paths(work, task)
    if engine.startswith("optimum"):
        name = next((f.name for f in p[engine].glob("*quantized*.onnx")), "-") if engine == "optimum-int8" else "-"
        done = run([venv / "bin" / "python", "-c", OPTIMUM_ONE, p[engine], TASKS[task][1], batch, seq, threads,
                    seconds, name])
        return json.loads(done.stdout.strip().splitlines()[-1])
    ids = np.random.default_rng(0).integers(0, 50257, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if engine == "torch":
        import torch
        import transformers

        torch.set_num_threads(threads)
        model = getattr(transformers, TASKS[task][0]).from_pretrained(str(p["ckpt"]), attn_implementation="eager")
        model.eval()
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def call():
            with torch.no_grad():
                model(input_ids=t_ids, attention_mask=t_mask)
    else:
        from gptexport.runtime.heads import load_head

        model = load_head(p[engine], threads=threads)
        feeds = {"input_ids": ids, "attention_mask": mask}

        def call():
            model.run(feeds)
    for _ in range(2):
        call()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return {"rows_per_s": batch * calls / (time.perf_counter() - start), "calls": calls}


def table(work: Path, batches, seq: int, threads: int, seconds: float, venv: Path, engines) -> None:
    rows = []
    for task, (_, _, unit) in TASKS.items():
        for batch in batches:
            figures = {}
            for engine in engines:
                done = run([sys.executable, __file__, "one", "--work", work, "--engine", engine, "--task", task,
                            "--batch", batch, "--seq", seq, "--threads", threads, "--seconds", seconds,
                            "--venv", venv])
                figures[engine] = json.loads(done.stdout.strip().splitlines()[-1])["rows_per_s"]
            peers = max(figures[e] for e in figures if not e.startswith("ours"))
            rows.append((task, unit, batch, figures, peers))
    names = list(engines)
    print(f"seq {seq}, {threads} threads, {seconds:g} s per figure, each engine in a fresh process")
    ours = [e for e in names if e.startswith("ours")]
    print(f"| task | batch | {' | '.join(names)} | {' | '.join(f'{e} / fastest peer' for e in ours)} |")
    print("|" + "---|" * (len(names) + len(ours) + 2))
    for task, unit, batch, figures, peers in rows:
        cells = " | ".join(f"{figures[e]:.1f}" for e in names)
        ratios = " | ".join(f"{figures[e] / peers:.2f}x" for e in ours)
        print(f"| {task} ({unit}) | {batch} | {cells} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "run", "one"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/heads-bench"))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--engine", choices=ENGINES, default="ours")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--task", choices=list(TASKS), default="feature-extraction")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "prepare":
        prepare(args.work, args.venv, args.engines)
    elif args.command == "one":
        print(json.dumps(one(args.work, args.engine, args.task, args.batch, args.seq, args.threads, args.seconds,
                             args.venv)))
    else:
        table(args.work, args.batches, args.seq, args.threads, args.seconds, args.venv, args.engines)


if __name__ == "__main__":
    main()
