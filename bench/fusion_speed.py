"""Decode speed of GPT-2 124M (random weights) on onnxruntime CPU: unfused vs fused (MultiHeadAttention) vs a
GroupQueryAttention variant. A script, not a test: `python bench/fusion_speed.py [--threads 2]`.

The GQA variant swaps each MultiHeadAttention for GroupQueryAttention with seqlens from the mask; GQA assumes right
padding, so it is only timed here (batch 1, no padding), never shipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "graphs"))


def _gqa_variant(model):
    """Each MultiHeadAttention -> GroupQueryAttention(seqlens_k = sum(mask) - 1, total = mask width)."""
    import onnx_ir as ir

    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    one = ir.Value(name="bench/one", const_value=ir.tensor(np.array([1], np.int32)))
    axis = ir.Value(name="bench/axis", const_value=ir.tensor(np.array([1], np.int64)))
    graph.register_initializer(one)
    graph.register_initializer(axis)
    mask32 = ir.Node("", "Cast", [mask], [ir.AttrInt64("to", ir.DataType.INT32)], name="bench/Cast")
    total_b = ir.Node("", "ReduceSum", [mask32.outputs[0], axis], [ir.AttrInt64("keepdims", 0)], name="bench/Sum")
    seqlens = ir.Node("", "Sub", [total_b.outputs[0], one], name="bench/seqlens")
    width = ir.Node("", "Shape", [mask], [ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)], name="bench/Shape")
    width32 = ir.Node("", "Cast", [width.outputs[0]], [ir.AttrInt64("to", ir.DataType.INT32)], name="bench/Cast2")
    total = ir.Node("", "Squeeze", [width32.outputs[0]], name="bench/total")
    first = next(iter(graph))
    graph.insert_before(first, [mask32, total_b, seqlens, width, width32, total])
    for node in [n for n in graph if n.op_type == "MultiHeadAttention"]:
        q, k, v = node.inputs[:3]
        pk, pv = node.inputs[6], node.inputs[7]
        heads = node.attributes["num_heads"].value
        gqa = ir.Node("com.microsoft", "GroupQueryAttention",
                      [q, k, v, pk, pv, seqlens.outputs[0], total.outputs[0]],
                      [ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", heads),
                       ir.AttrFloat32("scale", node.attributes["scale"].value)], num_outputs=3, name=node.name + "_gqa")
        graph.insert_before(node, [gqa])
        for old, new in zip(node.outputs, gqa.outputs):
            name, new.type, new.shape = old.name, old.type, old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = f"{name}_old", name
        graph.remove(node, safe=True)
    return model


def _decode_ms(models: list[bytes], facts, threads, past_len, runs) -> list[tuple[float, float]]:
    """(median, min) ms of one decode step per model; runs interleave the models so load noise hits all alike."""
    from fusion_testing import feeds, session

    sessions = [session(b, threads) for b in models]
    rng = np.random.default_rng(0)
    shape = (1, facts["num_heads"], past_len, facts["head_size"])
    past = [rng.standard_normal(shape).astype(np.float32) * 0.1 for _ in range(2 * facts["num_layers"])]
    f = feeds(facts, np.array([[464]]), np.ones((1, past_len + 1), np.int64), past)
    times = [[] for _ in sessions]
    for i in range(runs + 5):
        for sess, t in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, f)
            if i >= 5:  # warm-up
                t.append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t), min(t)) for t in times]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    import onnx_ir as ir
    import torch
    import transformers

    from gptexport.exporter.presets import ARCHITECTURES, PRESETS
    from gptexport.exporter.trace import trace
    from gptexport.graphs.pipeline import expected_counts, fuse, shortfalls

    config = transformers.GPT2Config(**PRESETS["gpt2"].config)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    facts = ARCHITECTURES["GPT2Config"].facts(config)
    start = time.perf_counter()
    graph = trace(model, facts)
    traced_s = time.perf_counter() - start
    unfused = ir.to_proto(graph).SerializeToString()
    start = time.perf_counter()
    report = fuse(graph, "gpt2", facts)
    fuse_s = time.perf_counter() - start
    print(f"trace {traced_s:.1f} s, fuse {fuse_s:.2f} s; counts {report.counts}; "
          f"expected {expected_counts('gpt2', facts)}; shortfalls {shortfalls(report, expected_counts('gpt2', facts))}")
    fused = ir.to_proto(graph).SerializeToString()
    gqa = ir.to_proto(_gqa_variant(graph)).SerializeToString()
    print(f"decode ms/token, batch 1, onnxruntime CPU, {args.threads} threads (median of {args.runs})")
    print(f"{'past':>6} {'unfused':>15} {'fused MHA':>15} {'fused GQA':>15}   (median / min)")
    for past_len in (16, 128, 512):
        row = _decode_ms([unfused, fused, gqa], facts, args.threads, past_len, args.runs)
        print(f"{past_len:>6} " + " ".join(f"{med:>7.2f} / {low:>5.2f}" for med, low in row))


if __name__ == "__main__":
    main()
