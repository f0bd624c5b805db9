"""GPT-J-6B on a CPU machine smaller than the model: a random fp16 checkpoint, and decode speed against CTranslate2.

    python bench/gptj_6b.py checkpoint DIR            # random GPT-J-6B, fp16 safetensors (12 GB), written streaming
    python bench/gptj_6b.py decode --ours DIR [--ct2 DIR] [--new-tokens 64] [--prompt-tokens 32]

`decode` runs each engine in its own process (so each peak RSS is its own), after one warm-up, greedy, batch 1,
and prints a table. Its roof column divides decode tokens/s by what the machine's read bandwidth allows, measured
in the same run (bench/runtime_bench.py's measures): bandwidth / the weight bytes one decode step reads, which are
all of the artifact's initializers except the token-embedding table (a Gather reads one row of it per token). bench/gptj_6b.sh runs the whole measurement (exports with /usr/bin/time -v included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = "The history of the city begins with a small settlement on the river, where traders met. " * 20


def make_checkpoint(directory: Path, seed: int = 0, layers: int | None = None) -> None:
    """config.json, tokenizer files and model.safetensors (fp16) of a random GPT-J-6B, one tensor in memory at a time.

    The weights are those of `gptexport gpt-j-6b --random-weights --seed SEED` (same generator per tensor).
    `layers` keeps only that many of the 28 layers, every tensor full size (peak memory per layer, quickly).
    """
    sys.path.insert(0, str(REPO))
    import transformers

    from gptexport.exporter import stream
    from gptexport.exporter.presets import PRESETS
    from gptexport.exporter.tokenizer import gpt2_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.GPTJConfig(**PRESETS["gpt-j-6b"].config)
    if layers:
        config.n_layer = layers
    config.save_pretrained(directory)
    tokenizer = gpt2_tokenizer(config.vocab_size)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(directory)
    import torch

    with torch.device("meta"):
        model = transformers.GPTJForCausalLM(config)
    weights = stream.RandomWeights.for_model(model, seed)
    size = stream.write_safetensors(directory / "model.safetensors", weights, weights.names())
    print(f"wrote {directory / 'model.safetensors'}: {size / 1e9:.2f} GB")


def _prompt_ids(n: int) -> list[int]:
    sys.path.insert(0, str(REPO))
    from gptexport.exporter.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer(50400)
    ids = tok.encode(TEXT).ids[:n]
    assert tok.encode(tok.decode(ids)).ids == ids
    return ids


def _worker_ours(path: str, ids: list[int], new: int, threads: int) -> dict:
    sys.path.insert(0, str(REPO))
    from gptexport import runtime
    start = time.perf_counter()
    model = runtime.load(path, verify="size")
    load_s = time.perf_counter() - start
    prompt = model.tokenizer.decode(ids)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4)  # warm-up
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new)
    s = model.last_stats
    return {"load_s": load_s, "prefill_ms": s.prefill_s * 1e3, "decode_tps": s.decode_tokens_per_s}


def _worker_ct2(path: str, ids: list[int], new: int, threads: int) -> dict:
    import ctranslate2

    start = time.perf_counter()
    generator = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads)
    load_s = time.perf_counter() - start
    vocab = json.loads((Path(path) / "vocabulary.json").read_text())
    tokens = [[vocab[i] for i in ids]]

    def run(n):
        start = time.perf_counter()
        generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                 include_prompt_in_result=False)
        return time.perf_counter() - start

    run(4)  # warm-up
    prefill = run(1)  # the prompt and one token
    total = run(new)
    return {"load_s": load_s, "prefill_ms": prefill * 1e3, "decode_tps": (new - 1) / max(total - prefill, 1e-9)}


WORKERS = {"ours": _worker_ours, "ct2": _worker_ct2}


def _run_worker(engine: str, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "worker", engine, path, "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint")
    ck.add_argument("directory", type=Path)
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument("--layers", type=int, help="only this many layers (each full size)")
    for name in ("decode", "worker"):
        p = sub.add_parser(name)
        if name == "worker":
            p.add_argument("engine", choices=list(WORKERS))
            p.add_argument("path")
        else:
            p.add_argument("--ours", required=True, help="our int4 artifact")
            p.add_argument("--ct2", help="a CTranslate2 int8 conversion of the same checkpoint")
        p.add_argument("--new-tokens", type=int, default=64)
        p.add_argument("--prompt-tokens", type=int, default=32)
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.command == "checkpoint":
        make_checkpoint(args.directory, args.seed, args.layers)
        return
    if args.command == "worker":
        result = WORKERS[args.engine](args.path, _prompt_ids(args.prompt_tokens), args.new_tokens, args.threads)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(json.dumps(result))
        return
    rows = {"gptexport runtime, int4 (MatMulNBits)": _run_worker("ours", args.ours, args)}
    if args.ct2:
        rows["CTranslate2 int8"] = _run_worker("ct2", args.ct2, args)
    base = rows.get("CTranslate2 int8", {}).get("decode_tps")
    from runtime_bench import _bandwidth_gbs, step_weight_bytes

    bandwidth = _bandwidth_gbs()
    step_bytes = step_weight_bytes(args.ours)
    roof = bandwidth * 1e9 / step_bytes  # decode tokens/s if reading the weights once per token were all it took
    print(f"\nGPT-J-6B, random weights, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"greedy, {args.threads} threads; read bandwidth {bandwidth:.1f} GB/s, our step reads "
          f"{step_bytes / 2**30:.2f} GiB of weights: roof {roof:.2f} tok/s")
    print(f"| {'engine':<38} | {'load s':>7} | {'peak RSS GiB':>12} | {'prefill ms':>10} | {'decode tok/s':>12} "
          f"| {'vs CTranslate2':>14} | {'x our roof':>10} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 14}|{'-' * 12}|{'-' * 14}|{'-' * 16}|{'-' * 12}|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name:<38} | failed: {r['error']}")
            continue
        ratio = f"{r['decode_tps'] / base:13.2f}x" if base else f"{'-':>14}"
        print(f"| {name:<38} | {r['load_s']:7.1f} | {r['peak_rss_gib']:12.2f} | {r['prefill_ms']:10.0f} | "
              f"{r['decode_tps']:12.2f} | {ratio} | {r['decode_tps'] / roof:10.2f} |")


if __name__ == "__main__":
    main()
