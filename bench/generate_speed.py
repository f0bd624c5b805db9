"""Tokens per second of gptexport's runtime next to transformers' generate, same checkpoint, same run.

    python bench/generate_speed.py --model gpt2 [--artifact DIR] [--new-tokens 128] [--prompt-tokens 32]

Builds (or reuses) a random-weight export of MODEL, then times greedy decoding of the same prompt with both,
after one warm-up each, and prints a table. Torch gets the same number of threads as onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def _prompt(tokenizer, n: int) -> str:
    text = "The history of the city begins with a small settlement on the river, where traders met. " * 20
    return tokenizer.decode(tokenizer.encode(text).ids[:n])


def _time_ours(artifact: str, prompt: str, new_tokens: int) -> dict:
    from gptexport import runtime
    start = time.perf_counter()
    model = runtime.load(artifact)
    load_s = time.perf_counter() - start
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8)  # warm-up
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    s = model.last_stats
    return {"load_s": load_s, "prefill_ms": s.prefill_s * 1e3, "decode_tps": s.decode_tokens_per_s,
            "e2e_tps": new_tokens / (s.prefill_s + s.decode_s)}


def _time_transformers(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    import torch

    ids = torch.tensor([tokenizer.encode(prompt).ids])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=50256, eos_token_id=50256)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        start = time.perf_counter()
        model(ids, attention_mask=kwargs["attention_mask"])
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return {"load_s": float("nan"), "prefill_ms": prefill * 1e3,
            "decode_tps": (new_tokens - 1) / max(total - prefill, 1e-9), "e2e_tps": new_tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--artifact", help="reuse this export instead of making one")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from gptexport.exporter.build import ExportOptions, export
    from gptexport.exporter.load import load

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    artifact = args.artifact or f"/tmp/gptexport-bench-{args.model}"
    if not (Path(artifact) / "manifest.json").exists():
        export(ExportOptions(model=args.model, random_weights=True, output=artifact, force=True))
    loaded = load(args.model, random_weights=True)  # the same seeded weights as the export
    prompt = _prompt(loaded.tokenizer, args.prompt_tokens)
    rows = {"gptexport runtime (onnxruntime CPU)": _time_ours(artifact, prompt, args.new_tokens),
            "transformers generate (torch eager)": _time_transformers(loaded.model, loaded.tokenizer, prompt,
                                                                      args.new_tokens)}
    best_peer = rows["transformers generate (torch eager)"]["decode_tps"]
    print(f"\n{args.model}, random weights, fp32, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
          f"tokens, {threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"| {'engine':<38} | {'load s':>7} | {'prefill ms':>10} | {'decode tok/s':>12} | {'end-to-end tok/s':>16} "
          f"| {'vs transformers':>15} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 12}|{'-' * 14}|{'-' * 18}|{'-' * 17}|")
    for name, r in rows.items():
        print(f"| {name:<38} | {r['load_s']:7.2f} | {r['prefill_ms']:10.1f} | {r['decode_tps']:12.1f} | "
              f"{r['e2e_tps']:16.1f} | {r['decode_tps'] / best_peer:14.2f}x |")


if __name__ == "__main__":
    main()
