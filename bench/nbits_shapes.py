"""MatMulNBits on GPT-2 124M's shapes: time per call by bits, block size and accuracy level, at M=1 and M=8.

    python bench/nbits_shapes.py [--threads N] [--bits 4 8] [--blocks 32 64 128] [--levels 0 4] [--m 1 8]

One graph per shape with one com.microsoft MatMulNBits node (weights from graphs/precision/nbits.py, symmetric
as our exports), a float32 MatMul and the earlier int8 kernel (DynamicQuantizeMatMul) of the same shape as
references; onnxruntime's CPU provider, the given
intra-op threads. Prints a markdown table of microseconds per call (best of --repeats rounds of --calls calls),
which is what a decode step pays per layer for each of the four MatMuls (and once for the lm_head).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gptexport.graphs.precision.nbits import quantize_blocks  # noqa: E402

# (name, K, N) of GPT-2 124M's MatMuls, per layer (and the tied lm_head once)
SHAPES = [("attn.c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("mlp.c_fc", 768, 3072),
          ("mlp.c_proj", 3072, 768), ("lm_head", 768, 50257)]


def nbits_model(k: int, n: int, bits: int, block: int, level: int) -> bytes:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    packed, scales = quantize_blocks(w, bits, block, method="rtn")
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def matmul_model(k: int, n: int) -> bytes:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def dynamic_model(k: int, n: int) -> bytes:
    """The earlier int8 kernel: DynamicQuantizeMatMul (activations quantized per tensor, weights per column)."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # (N,)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(q, "w"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(np.zeros(n, np.int8), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def time_model(model: bytes, m: int, k: int, threads: int, calls: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, {"x": x})
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--levels", nargs="+", type=int, default=[0, 4])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configs = [(b, bs, lv) for b in args.bits for bs in args.blocks for lv in args.levels]
    head = " | ".join(f"{b}b bs{bs} L{lv}" for b, bs, lv in configs)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads; µs per call, best of {args.repeats} x "
          f"{args.calls} calls\n")
    print(f"| shape (K x N) | M | fp32 MatMul | int8 DynamicQuantizeMatMul | {head} |")
    print("|---|---|---|---|" + "---|" * len(configs))
    for name, k, n in SHAPES:
        if name not in args.shapes:
            continue
        models = {c: nbits_model(k, n, *c) for c in configs}
        reference, dynamic = matmul_model(k, n), dynamic_model(k, n)
        for m in args.m:
            cells = [time_model(models[c], m, k, args.threads, args.calls, args.repeats) for c in configs]
            fp32 = time_model(reference, m, k, args.threads, args.calls, args.repeats)
            dyn = time_model(dynamic, m, k, args.threads, args.calls, args.repeats)
            print(f"| {name} ({k} x {n}) | {m} | {fp32:.0f} | {dyn:.0f} | " + " | ".join(f"{c:.0f}" for c in cells)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
