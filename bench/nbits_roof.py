"""Is MatMulNBits at M=1 bound by memory or by the cores, at GPT-J-6B's shapes? (issue 15's 6B roof target)

    python bench/nbits_roof.py [--threads 1 2] [--bits 4 8] [--blocks 32 128] [--levels 0 4] [--layers 4]

One graph holds --layers copies of a GPT-J-6B layer's four MatMuls (qkv 4096 x 12288 packed as our exports do,
out 4096 x 4096, fc_in 4096 x 16384, fc_out 16384 x 4096), each with its own weights, so that one call reads
several times the 300 MiB L3 cache and every byte comes from memory, as in a 6B decode step. The codes and scales
are random bytes: a kernel's time does not depend on their values. For each thread count it prints the time of
one layer and the bytes per second it streams, beside this machine's read bandwidth with as many threads (torch
sums a 1 GiB array, best of 5). If one thread's rate doubles with two and stays under the bandwidth, the kernel
is bound by the cores' arithmetic (unpacking and dot products), not by memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [("qkv", 4096, 12288), ("out", 4096, 4096), ("fc_in", 4096, 16384), ("fc_out", 16384, 4096)]


def layers_model(layers: int, bits: int, block: int, level: int) -> tuple[bytes, int]:
    """A graph of `layers` x the four MatMuls, all fed the same x, outputs summed per shape; and its weight bytes."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs, nbytes = [], [], [], 0
    for i in range(layers):
        for name, k, n in SHAPES:
            blocks = k // block
            packed = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
            scales = (rng.random(n * blocks, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
            x = "x" if k == 4096 else "h"
            w, s, y = f"{name}{i}.w", f"{name}{i}.s", f"{name}{i}.y"
            inits += [numpy_helper.from_array(packed, w), numpy_helper.from_array(scales, s)]
            nodes.append(helper.make_node("MatMulNBits", [x, w, s], [y], domain="com.microsoft", K=k, N=n,
                                          bits=bits, block_size=block, accuracy_level=level))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, n]))
            nbytes += packed.nbytes + scales.nbytes
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096]),
                                                helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 16384])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), nbytes


def bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best / 1e9


def time_call(model: bytes, threads: int, calls: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32),
             "h": np.random.default_rng(2).standard_normal((1, 16384)).astype(np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bits", nargs="+", type=int, default=[4])
    parser.add_argument("--blocks", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--levels", nargs="+", type=int, default=[4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()
    bandwidth = {t: bandwidth_gbs(t) for t in args.threads}
    print(f"onnxruntime {ort.__version__}; {args.layers} GPT-J-6B layers' MatMuls per call, M=1, median of "
          f"{args.calls} calls; read bandwidth " + ", ".join(f"{bandwidth[t]:.1f} GB/s at {t} thread(s)"
                                                          for t in args.threads) + "\n")
    print("| bits | block | accuracy level | threads | MB per layer | ms per layer | GB/s streamed | x bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for block in args.blocks:
            for level in args.levels:
                model, nbytes = layers_model(args.layers, bits, block, level)
                for t in args.threads:
                    s = time_call(model, t, args.calls)
                    print(f"| {bits} | {block} | {level} | {t} | {nbytes / args.layers / 1e6:.1f} | "
                          f"{s / args.layers * 1e3:.2f} | {nbytes / s / 1e9:.1f} | {nbytes / s / 1e9 / bandwidth[t]:.2f} |",
                          flush=True)
                del model


if __name__ == "__main__":
    main()
