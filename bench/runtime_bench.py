"""gptexport's runtime against its peers, same random-weight GPT-2 124M checkpoint, same prompts, one run.

    python bench/runtime_bench.py [--workdir /tmp/runtime-bench] [--only ours-fp32,ct2-int8,...] [--repeats 3]

Engines: our runtime (fp32, fp16, int8, int4 artifacts), transformers `generate` (torch eager, sdpa),
CTranslate2 (fp32 and int8, converted from the same checkpoint) and Optimum's ORTModelForCausalLM (in its own
virtual environment, `--optimum-python`, since optimum-onnx pins an older transformers; torch gets one thread
there). Each engine runs in its own subprocess (`--worker ENGINE`), so no engine's threads, arenas or imports
affect another's timings.

Workloads, greedy, with min_new_tokens = max_new_tokens so every engine decodes the same number of tokens:
  b1       batch 1, 32-token prompt, 128 new tokens: decode tokens/s = 127 / (t(128 new) - t(1 new))
  b8       batch 8 (eight different 32-token prompts), 64 new tokens: 8 * 63 / (t(64) - t(1))
  prefill  one 512-token prompt, 1 new token: 512 / t
  load     seconds from nothing to a loaded model (files already in the page cache)
Each timing is the best of --repeats after a warm-up. The roof column divides decode tokens/s by what the
machine's measured read bandwidth allows: bandwidth / weight bytes read per step (times the batch for b8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {"b1": (1, 32, 128), "b8": (8, 32, 64), "prefill": (1, 512, 1)}  # batch, prompt tokens, new tokens
OURS = {"fp32": "", "fp16": "--fp16", "int8": "--int8", "int4": "--int4"}
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "salt, grain and cloth. Over the centuries the market grew into a town, and the town into a port whose "
        "ships reached every coast of the sea. ") * 40


# -- workers: each runs in its own process and prints one JSON line ---------------------------------------------

def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(generate, prompts: dict, repeats: int) -> dict:
    """generate(batch_ids: list[list[int]], new_tokens) -> list of generated lengths; returns tokens/s per workload."""
    out = {}
    for name, (batch, _, new) in WORKLOADS.items():
        ids = prompts[name]
        lengths = generate(ids, new)
        if any(n != new for n in lengths):
            raise RuntimeError(f"{name}: generated lengths {lengths}, expected {new} each")
        t_full = _best(lambda: generate(ids, new), repeats)
        if new == 1:
            out[name] = sum(len(p) for p in ids) / t_full
        else:
            t_first = _best(lambda: generate(ids, 1), repeats)
            out[name] = batch * (new - 1) / (t_full - t_first)
            out[name + "_first_ms"] = t_first * 1e3
    return out


def _worker_ours(args, prompts) -> dict:
    sys.path.insert(0, str(REPO))
    from gptexport import runtime
    start = time.perf_counter()
    model = runtime.load(args.path, verify="size")
    load_s = time.perf_counter() - start
    kwargs = json.loads(args.options or "{}")
    text = {name: [model.tokenizer.decode(p) for p in ids] for name, ids in prompts.items()}
    lookup = {tuple(map(tuple, ids)): text[name] for name, ids in prompts.items()}

    def generate(ids, new):
        _, tokens = model.generate(lookup[tuple(map(tuple, ids))], max_new_tokens=new, min_new_tokens=new,
                                   return_tokens=True, **kwargs)
        return [len(t) for t in tokens]

    return {"load_s": load_s, **_measure(generate, prompts, args.repeats)}


def _worker_transformers(args, prompts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start

    def generate(ids, new):
        x = torch.tensor(ids)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=50256, eos_token_id=50256)
        return [out.shape[1] - x.shape[1]] * len(ids)

    return {"load_s": load_s, **_measure(generate, prompts, args.repeats)}


def _worker_optimum(args, prompts) -> dict:
    import torch

    torch.set_num_threads(1)  # the work is onnxruntime's; torch only glues the loop together
    from optimum.onnxruntime import ORTModelForCausalLM

    start = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(args.path)
    load_s = time.perf_counter() - start

    def generate(ids, new):
        x = torch.tensor(ids)
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=50256, eos_token_id=50256)
        return [out.shape[1] - x.shape[1]] * len(ids)

    return {"load_s": load_s, **_measure(generate, prompts, args.repeats)}


def _worker_ct2(args, prompts) -> dict:
    import ctranslate2

    start = time.perf_counter()
    generator = ctranslate2.Generator(args.path, device="cpu", compute_type=args.options or "default",
                                      intra_threads=args.threads)
    load_s = time.perf_counter() - start
    vocab = json.loads((Path(args.path) / "vocabulary.json").read_text())  # id -> token string

    def generate(ids, new):
        tokens = [[vocab[i] for i in p] for p in ids]
        results = generator.generate_batch(tokens, max_length=new, min_length=new, sampling_topk=1,
                                           include_prompt_in_result=False, beam_size=1)
        return [len(r.sequences_ids[0]) for r in results]

    return {"load_s": load_s, **_measure(generate, prompts, args.repeats)}


WORKERS = {"ours": _worker_ours, "transformers": _worker_transformers, "optimum": _worker_optimum,
           "ct2": _worker_ct2}


# -- the driver ------------------------------------------------------------------------------------------------

def _prompts(tokenizer) -> dict:
    """Token ids per workload whose decoded text re-encodes to the same ids (our runtime takes text)."""
    ids = tokenizer.encode(TEXT).ids

    def exact(start: int, n: int) -> list:
        while True:
            piece = ids[start:start + n]
            if tokenizer.encode(tokenizer.decode(piece)).ids == piece:
                return piece
            start += 1

    return {name: [exact(7 * 37 * row, n) for row in range(batch)] for name, (batch, n, _) in WORKLOADS.items()}


def _bandwidth_gbs() -> float:
    """Read bandwidth of this machine in GB/s: torch sums a 1 GiB array with every core, best of 5."""
    import torch

    a = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = min(_timed(lambda: a.sum()) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(cmd: list, what: str) -> None:
    print(f"[bench] {what}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _prepare(work: Path, optimum_python: str | None, engines: list) -> dict:
    """Checkpoint, our artifacts, CTranslate2 and Optimum models; returns engine -> (worker, path, options, weight bytes)."""
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").exists():
        from transformers import PreTrainedTokenizerFast

        sys.path.insert(0, str(REPO))
        from gptexport.exporter.load import load

        loaded = load("gpt2", random_weights=True)  # seed 0: the weights of `gptexport gpt2 --random-weights`
        loaded.model.save_pretrained(ckpt)
        PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(ckpt)
    table = {"transformers": ("transformers", ckpt, "", _dir_bytes(ckpt, ".safetensors"))}
    for precision, flag in OURS.items():
        art = work / f"ours-{precision}"
        if f"ours-{precision}" in engines and not (art / "manifest.json").exists():
            _run(["gptexport", "gpt2", "--random-weights", "-o", art, "--force"] + ([flag] if flag else []),
                 f"export {precision}")
        table[f"ours-{precision}"] = ("ours", art, "", _dir_bytes(art, ".onnx", ".data"))
        inplace = work / f"ours-{precision}-inplace"  # --kv-layout shared_buffer: the in-place KV cache graph
        if f"ours-{precision}-inplace" in engines and not (inplace / "manifest.json").exists():
            _run(["gptexport", "gpt2", "--random-weights", "-o", inplace, "--force", "--kv-layout", "shared_buffer"]
                 + ([flag] if flag else []), f"export {precision} shared_buffer")
        table[f"ours-{precision}-inplace"] = ("ours", inplace, "", _dir_bytes(inplace, ".onnx", ".data"))
    for quant in ("float32", "int8"):
        out = work / f"ct2-{quant}"
        name = f"ct2-{'fp32' if quant == 'float32' else quant}"
        if name in engines and not (out / "model.bin").exists():
            _run(["ct2-transformers-converter", "--model", ckpt, "--output_dir", out, "--quantization", quant,
                  "--force"], f"convert {name}")
        table[name] = ("ct2", out, quant, _dir_bytes(out, ".bin"))
    onnx = work / "optimum-fp32"
    if "optimum-fp32" in engines and optimum_python and not (onnx / "model.onnx").exists():
        _run([optimum_python, "-m", "optimum.exporters.onnx", "--model", ckpt, "--task", "text-generation-with-past",
              onnx], "optimum export")
    table["optimum-fp32"] = ("optimum", onnx, "", _dir_bytes(onnx, ".onnx", ".onnx_data"))
    return table


def _dir_bytes(path: Path, *suffixes) -> int:
    return sum(f.stat().st_size for f in path.glob("*") if f.name.endswith(suffixes)) if path.exists() else 0


def _report(results: dict, table: dict, bandwidth: float, header: str) -> str:
    peers = [e for e in results if not e.startswith("ours") and "error" not in results[e]]
    best = {w: max((results[e][w] for e in peers), default=float("nan")) for w in WORKLOADS}
    lines = [header, "",
             "| engine | weights MB | load s | b1 tok/s | b1 × best peer | b1 × roof | b8 tok/s | b8 × best peer "
             "| b8 × roof | prefill-512 tok/s | prefill × best peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        size = table[engine][3]
        if "error" in r:
            lines.append(f"| {engine} | {size / 1e6:.0f} | error: {r['error']} |" + " |" * 8)
            continue
        roof = bandwidth * 1e9 / size if size else float("nan")  # decode steps/s if weights were the only reads
        lines.append(f"| {engine} | {size / 1e6:.0f} | {r['load_s']:.2f} | {r['b1']:.1f} | {r['b1'] / best['b1']:.2f} "
                     f"| {r['b1'] / roof:.2f} | {r['b8']:.1f} | {r['b8'] / best['b8']:.2f} | {r['b8'] / (8 * roof):.2f} "
                     f"| {r['prefill']:.0f} | {r['prefill'] / best['prefill']:.2f} |")
    lines += ["", f"best peer per workload: " + ", ".join(
        f"{w} {max(peers, key=lambda e: results[e][w]) if peers else '-'} {best[w]:.1f}" for w in WORKLOADS)]
    lines += _targets(results)
    return "\n".join(lines)


def _targets(results: dict) -> list:
    def get(engine, w):
        return results.get(engine, {}).get(w, float("nan"))

    fp32_peers = ["transformers", "ct2-fp32", "optimum-fp32"]
    all_peers = fp32_peers + ["ct2-int8"]
    best_fp32 = max((get(e, "b1") for e in fp32_peers if e in results and "error" not in results[e]),
                    default=float("nan"))
    best_b8 = max((get(e, "b8") for e in all_peers if e in results and "error" not in results[e]),
                  default=float("nan"))
    best_prefill = max((get(e, "prefill") for e in all_peers if e in results and "error" not in results[e]),
                       default=float("nan"))
    def best_of(*values):
        values = [v for v in values if v == v]  # nan: engine missing or failed
        return max(values) if values else float("nan")

    best_fp32_ours = best_of(get("ours-fp32", "b1"), get("ours-fp32-inplace", "b1"))
    best_int8 = best_of(get("ours-int8", "b1"), get("ours-int8-inplace", "b1"))
    best_int4 = best_of(get("ours-int4", "b1"), get("ours-int4-inplace", "b1"))
    best_ours_b8 = max((get(e, "b8") for e in results if e.startswith("ours")), default=float("nan"))
    best_ours_prefill = max((get(e, "prefill") for e in results if e.startswith("ours")), default=float("nan"))
    checks = [("fp32 b1 ≥ 1.3 × fastest fp32 peer", best_fp32_ours / best_fp32, 1.3),
              ("b8 (best of ours) ≥ 1.3 × fastest peer", best_ours_b8 / best_b8, 1.3),
              ("int8 b1 ≥ 2 × CTranslate2 int8", best_int8 / get("ct2-int8", "b1"), 2.0),
              ("int4 b1 ≥ 2.5 × CTranslate2 int8", best_int4 / get("ct2-int8", "b1"), 2.5),
              ("prefill-512 (best of ours) ≥ fastest peer", best_ours_prefill / best_prefill, 1.0)]
    return ["", "| target | measured | met |", "|---|---|---|"] + [
        f"| {name} | {ratio:.2f}× | {'yes' if ratio >= want else 'no'} |" for name, ratio, want in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/runtime-bench")
    parser.add_argument("--only", help="comma-separated engines (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--optimum-python", default="/tmp/optimum-venv/bin/python",
                        help="python of a venv with optimum-onnx[onnxruntime] (skipped when missing)")
    parser.add_argument("--ours-options", default="{}", help="JSON keyword arguments for our generate()")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        prompts = json.loads(Path(args.prompts).read_text())
        print(json.dumps(WORKERS[args.worker](args, prompts)))
        return

    engines = [f"ours-{p}{v}" for p in OURS for v in ("", "-inplace")]
    engines += ["transformers", "ct2-fp32", "ct2-int8", "optimum-fp32"]
    if args.only:
        engines = [e for e in engines if e in args.only.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    optimum_python = args.optimum_python if Path(args.optimum_python).exists() else None
    table = _prepare(work, optimum_python, engines)
    sys.path.insert(0, str(REPO))
    from gptexport.exporter.tokenizer import gpt2_tokenizer

    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts(gpt2_tokenizer())))
    bandwidth = _bandwidth_gbs()
    results = {}
    for engine in engines:
        worker, path, options, _ = table[engine]
        python = optimum_python if worker == "optimum" else sys.executable
        if python is None:
            results[engine] = {"error": "no optimum venv (--optimum-python)"}
            continue
        cmd = [python, __file__, "--worker", worker, "--path", str(path), "--prompts", str(prompts_file),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--options", args.ours_options if worker == "ours" else options]
        print(f"[bench] {engine}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            results[engine] = {"error": last[:120]}
        else:
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[bench] {engine}: {results[engine]}", file=sys.stderr, flush=True)
    import onnxruntime
    import torch

    header = (f"GPT-2 124M random weights (seed 0), greedy, {args.threads} threads, "
              f"{platform.processor() or platform.machine()}, read bandwidth {bandwidth:.1f} GB/s; "
              f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; best of {args.repeats}")
    print(_report(results, table, bandwidth, header))
    (work / "results.json").write_text(json.dumps({"results": results, "bandwidth_gbs": bandwidth}, indent=1))


if __name__ == "__main__":
    main()
