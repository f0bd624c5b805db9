"""The int8 kernels side by side: per MatMul shape (GPT-2 124M's) and per decode step of whole artifacts.

    python bench/int8_kernels.py shapes [--m 1 8 16 32 128 512] [--threads N] [--kernels nbits token dynamic fp32]
    python bench/int8_kernels.py steps ARTIFACT [ARTIFACT ...] [--batches 1 8 16] [--prefill 512] [--rounds 6]
    python bench/int8_kernels.py run ARTIFACT [--batch 8] [--steps 64] [--prefill 0]   # one fixed job (A/B pairs)

Kernels (graphs/precision/quantize.py, `gptexport --int8 --int8-kernel K`):

    nbits    MatMulNBits bits=8, block 32, accuracy_level 4: activations int8 per token and block inside the kernel
    token    per-token uint8 activations quantized in the graph (Abs, ReduceMax, Mul, Max, Shape, ConstantOfShape,
             QuantizeLinear), MatMulIntegerToFloat (MLAS integer GEMM), weights int8 per column: batch-invariant
    dynamic  DynamicQuantizeMatMul: activations uint8 per tensor (one scale for the whole batch), weights per column
    fp32     MatMul, the reference

`shapes` builds each shape's one-MatMul graph with the quantization pass itself (so `token` includes the nodes it
adds) and prints microseconds per call, best of --repeats rounds (bench/nbits_shapes.py's timing). `steps` times decode
steps (a 4-token prompt, then 16 one-token steps per round) and one prefill of --prefill tokens for shared_buffer
artifacts, in-process, the artifacts alternating A B A B over --rounds, medians. `run` is one fixed job per
process for whole-process A/B pairs (alternate two commands, A B A B, over fresh processes). The machine may be
shared: quote medians of pairs, and the load average this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/nbits_shapes.py

SHAPES = [("attn.c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("mlp.c_fc", 768, 3072),
          ("mlp.c_proj", 3072, 768), ("lm_head", 768, 50257)]
KERNELS = ("nbits", "token", "dynamic", "fp32")


def one_matmul(k: int, n: int, kernel: str) -> bytes:
    """x (M, K) @ W (K, N) + b as our export writes it for `kernel` (weights: seeded, round to nearest)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from gptexport.graphs.precision import quantize_int8

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"], name="/MatMul"),
                               helper.make_node("Add", ["m", "b"], ["y"], name="/Add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    if kernel != "fp32":
        quantize_int8(model, kernel=kernel, method="rtn")
    return ir.to_proto(model).SerializeToString()


def shapes(args) -> None:
    import onnxruntime as ort

    from nbits_shapes import time_model  # one session per (shape, M), best of --repeats rounds

    print(f"onnxruntime {ort.__version__}, {args.threads} threads, load {_load()}; µs per call, best of "
          f"{args.repeats} rounds\n")
    print("| shape (K x N) | M | " + " | ".join(args.kernels) + " | " +
          " | ".join(f"nbits / {k}" for k in args.kernels if k != "nbits") + " |")
    print("|---|---|" + "---|" * (2 * len(args.kernels) - ("nbits" in args.kernels)))
    for name, k, n in SHAPES:
        if name not in args.shapes:
            continue
        models = {kernel: one_matmul(k, n, kernel) for kernel in args.kernels}
        for m in args.m:
            calls = max(3, min(50, int(2e8 / (m * k * n))))
            cells = {kernel: time_model(models[kernel], m, k, args.threads, calls, args.repeats)
                     for kernel in args.kernels}
            ratios = [f"{cells['nbits'] / cells[kr]:.2f}" for kr in args.kernels if kr != "nbits" and "nbits" in cells]
            print(f"| {name} ({k} x {n}) | {m} | " + " | ".join(f"{cells[kr]:.0f}" for kr in args.kernels) + " | "
                  + " | ".join(ratios) + " |", flush=True)


def _decoder(artifact: str, threads: int):
    from gptexport import runtime

    decoder = runtime.load(artifact, verify="size", threads=threads).decoder
    if not hasattr(decoder, "new_cache"):
        sys.exit(f"{artifact}: not a --kv-layout shared_buffer artifact (steps and run time the in-place cache)")
    return decoder


def decode_ms(decoder, batch: int, steps: int = 16) -> float:
    """Milliseconds per one-token decode step at `batch` rows, after a 4-token prompt."""
    from gptexport.runtime.kv import shared_step

    ids = np.full((batch, 4), 464, dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.cumsum(mask, -1) - 1
    cache = decoder.new_cache(batch, capacity=4 + steps + 1)
    shared_step(decoder.session, cache, ids, mask, positions, decoder.pad_token_id, decoder.logits_meta)
    token, positions = np.full((batch, 1), 13, dtype=np.int64), positions[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        positions = positions + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        shared_step(decoder.session, cache, token, mask, positions, decoder.pad_token_id, decoder.logits_meta)
    return (time.perf_counter() - start) / steps * 1e3


def prefill_ms(decoder, tokens: int) -> float:
    from gptexport.runtime.kv import shared_step

    ids = (np.arange(tokens, dtype=np.int64)[None] * 7) % 50000
    mask = np.ones_like(ids)
    cache = decoder.new_cache(1, capacity=tokens + 1)
    start = time.perf_counter()
    shared_step(decoder.session, cache, ids, mask, np.cumsum(mask, -1) - 1, decoder.pad_token_id,
                decoder.logits_meta)
    return (time.perf_counter() - start) * 1e3


def steps(args) -> None:
    decoders = {a: _decoder(a, args.threads) for a in args.artifacts}
    times: dict = {(a, w): [] for a in args.artifacts for w in [*args.batches, "prefill"]}
    for d in decoders.values():
        decode_ms(d, 1, 2)
    for r in range(args.rounds):
        for a in args.artifacts if r % 2 == 0 else args.artifacts[::-1]:
            for batch in args.batches:
                times[a, batch].append(decode_ms(decoders[a], batch))
            if args.prefill:
                times[a, "prefill"].append(prefill_ms(decoders[a], args.prefill))
    print(f"{args.threads} threads, load {_load()}; medians of {args.rounds} alternating rounds\n")
    head = [f"decode ms b{b}" for b in args.batches] + ([f"prefill {args.prefill} ms"] if args.prefill else [])
    print("| artifact | kernel | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for a in args.artifacts:
        cells = [statistics.median(times[a, b]) for b in args.batches]
        cells += [statistics.median(times[a, "prefill"])] if args.prefill else []
        manifest = json.loads((Path(a) / "manifest.json").read_text())
        kernel = (manifest.get("passes", {}).get("quantization") or {}).get("kernel", manifest["dtype"])
        print(f"| {Path(a).name} | {kernel} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def run(args) -> None:
    decoder = _decoder(args.artifacts[0], args.threads)
    if args.prefill:
        prefill_ms(decoder, args.prefill)
    else:
        decode_ms(decoder, args.batch, args.steps)


def _load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["shapes", "steps", "run"])
    parser.add_argument("artifacts", nargs="*")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 16, 32, 128, 512])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.command != "shapes" and not args.artifacts:
        parser.error(f"{args.command}: give at least one shared_buffer artifact directory")
    {"shapes": shapes, "steps": steps, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
