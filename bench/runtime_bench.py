"""gptexport's runtime against its peers, same random-weight GPT-2 124M checkpoint, same prompts, one run.

    python bench/runtime_bench.py [--workdir /tmp/runtime-bench] [--only ours-fp32,ct2-int8,...] [--repeats 3]

Engines: our runtime (fp32, fp16, int8, int4 artifacts; ours-int8-nbits, ours-int8-token, ours-int8-hybrid and
ours-int8-dynamic name one int8 kernel, ours-int8-norescore the default without graphs/rescore.py; each with its
-inplace twin, run when --only lists them), transformers `generate` (torch
eager, sdpa),
CTranslate2 (fp32 and int8, converted from the same checkpoint), llama.cpp (F32, Q8_0 and Q4_0 GGUF files made by
its convert_hf_to_gguf.py and llama-quantize from the same checkpoint; `--llama-dir` / LLAMA_CPP_DIR, see
bench/llama_cpp.py) and Optimum's ORTModelForCausalLM (in its own virtual environment, `--optimum-python`, since
optimum-onnx pins an older transformers; torch gets one thread there). Each engine runs in its own subprocess
(`--worker ENGINE`), so no engine's threads, arenas or imports affect another's timings; with `--rounds N` every
engine runs N times in fresh processes, interleaved (A B C A B C ...), and the table shows medians.

Workloads, greedy, with min_new_tokens = max_new_tokens so every engine decodes the same number of tokens:
  b1       batch 1, 32-token prompt, 128 new tokens: decode tokens/s = 127 / (t(128 new) - t(1 new))
  b8       batch 8 (eight different 32-token prompts), 64 new tokens: 8 * 63 / (t(64) - t(1))
           (--new-tokens B1 B8 changes the two counts)
  prefill  one 512-token prompt, 1 new token: 512 / t
  load     seconds from nothing to a loaded model (files already in the page cache)
Each timing is the best of --repeats after a warm-up. The roof column divides decode tokens/s by what the
machine's measured read bandwidth allows: bandwidth / weight bytes read per step (times the batch for b8). For our
artifacts those are every initializer except the token-embedding table, which only a Gather reads (one row per
token; the int8/int4 artifacts keep it in fp32 beside the lm_head's quantized copy); for peers, their weight files.

llama.cpp runs its own benchmark programs on the same shapes: llama-batched-bench (-npp 32, -ntg 128 at -npl 1;
-ntg 64 at -npl 8; its S_TG excludes the prompt, as our t(new) - t(1) does) and llama-bench pp512. Its prompts are
synthetic token ids of the same length and it never samples (it feeds a fixed token), so its decode figures leave
out the sampling and the Python loop that ours include.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402 - bench/llama_cpp.py, next to this script

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {"b1": (1, 32, 128), "b8": (8, 32, 64), "prefill": (1, 512, 1)}  # batch, prompt tokens, new tokens
# our rows: int8 is the export's default kernel; int8-nbits / int8-token / int8-hybrid / int8-dynamic name one
# (--int8-kernel); int8-norescore is the default without the tied lm_head's float32 rescoring (--rescore-top-k 0)
OURS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"], "int4": ["--int4"],
        **{f"int8-{k}": ["--int8", "--int8-kernel", k] for k in ("nbits", "token", "hybrid", "dynamic")},
        "int8-norescore": ["--int8", "--rescore-top-k", "0"]}
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


def _worker_llama(args, prompts) -> dict:
    """llama.cpp's own benchmark programs on the GGUF file `args.path` (prompts only give the shapes)."""
    binaries = Path(args.options)
    out = {}
    for name, (batch, length, new) in WORKLOADS.items():
        if new == 1:
            cmd = [str(llama_cpp.binary(binaries, "llama-bench")), "-m", args.path, "-p", str(length), "-n", "0",
                   "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]
            record = json.loads(_llama_output(cmd))[0]
            out[name] = max(record["samples_ts"])
            continue
        cmd = [str(llama_cpp.binary(binaries, "llama-batched-bench")), "-m", args.path, "-c", "1024", "-npp",
               str(length), "-ntg", str(new), "-npl", str(batch), "-t", str(args.threads), "-tb", str(args.threads),
               "--output-format", "jsonl"]
        runs = [json.loads(_llama_output(cmd).strip().splitlines()[-1]) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["speed_tg"])
        out[name] = best["speed_tg"]
        out[name + "_first_ms"] = best["t_pp"] * 1e3  # the batch's prompt (llama.cpp: prefill only, no token)
    return out


def _llama_output(cmd: list) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = " / ".join(proc.stderr.strip().splitlines()[-2:])
        raise RuntimeError(f"{Path(cmd[0]).name} {why}: {tail}")
    return proc.stdout


WORKERS = {"ours": _worker_ours, "transformers": _worker_transformers, "optimum": _worker_optimum,
           "ct2": _worker_ct2, "llama": _worker_llama}
LLAMA_ENGINES = {f"llama-{kind}": precision for precision, kind in
                 {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}.items()}


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


def _prepare(work: Path, optimum_python: str | None, engines: list, llama) -> dict:
    """Checkpoint, our artifacts, CTranslate2, Optimum and GGUF models; returns engine -> (worker, path, options,
    weight bytes). `llama` is (source tree, binary dir), or the LlamaCppMissing that says why there is none."""
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
            _run(["gptexport", "gpt2", "--random-weights", "-o", art, "--force", *flag], f"export {precision}")
        table[f"ours-{precision}"] = ("ours", art, "", _step_bytes(art))
        inplace = work / f"ours-{precision}-inplace"  # --kv-layout shared_buffer: the in-place KV cache graph
        if f"ours-{precision}-inplace" in engines and not (inplace / "manifest.json").exists():
            _run(["gptexport", "gpt2", "--random-weights", "-o", inplace, "--force", "--kv-layout", "shared_buffer",
                  *flag], f"export {precision} shared_buffer")
        table[f"ours-{precision}-inplace"] = ("ours", inplace, "", _step_bytes(inplace))
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
    for engine, precision in LLAMA_ENGINES.items():
        if engine not in engines:
            continue
        if isinstance(llama, Exception):
            table[engine] = ("llama", None, str(llama), 0)
            continue
        source, binaries = llama
        path = llama_cpp.gguf(work, ckpt, source, binaries, precision)
        table[engine] = ("llama", path, str(binaries), path.stat().st_size)
    return table


def step_weight_bytes(artifact: str) -> int:
    """Bytes of weights one decode step reads: every initializer of model.onnx except tables only Gather reads."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = onnx.load(str(Path(artifact) / "model.onnx"), load_external_data=False).graph
    consumers: dict = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i))
    total = 0
    for init in graph.initializer:
        uses = consumers.get(init.name, [])
        if uses and all(op == "Gather" and i == 0 for op, i in uses):
            continue  # the embedding table: one row per token
        if uses_external_data(init):
            total += int(ExternalDataInfo(init).length or 0)
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def _step_bytes(artifact: Path) -> int:
    return step_weight_bytes(str(artifact)) if (artifact / "model.onnx").exists() else 0


def _dir_bytes(path: Path, *suffixes) -> int:
    return sum(f.stat().st_size for f in path.glob("*") if f.name.endswith(suffixes)) if path.exists() else 0


def _report(results: dict, table: dict, bandwidth: float, header: str) -> str:
    peers = [e for e in results if not e.startswith("ours") and "error" not in results[e]]
    best = {w: max((results[e][w] for e in peers), default=float("nan")) for w in WORKLOADS}
    lines = [header, "",
             "| engine | weights read MB | load s | b1 tok/s | b1 × best peer | b1 × roof | b8 tok/s | b8 × best peer "
             "| b8 × roof | prefill-512 tok/s | prefill × best peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        size = table[engine][3]
        if "error" in r:
            lines.append(f"| {engine} | {size / 1e6:.0f} | error: {r['error']} |" + " |" * 8)
            continue
        roof = bandwidth * 1e9 / size if size else float("nan")  # decode steps/s if weights were the only reads
        load = f"{r['load_s']:.2f}" if "load_s" in r else "-"
        lines.append(f"| {engine} | {size / 1e6:.0f} | {load} | {r['b1']:.1f} "
                     f"| {r['b1'] / best['b1']:.2f} | {r['b1'] / roof:.2f} | {r['b8']:.1f} "
                     f"| {r['b8'] / best['b8']:.2f} "
                     f"| {r['b8'] / (8 * roof):.2f} | {r['prefill']:.0f} | {r['prefill'] / best['prefill']:.2f} |")
    lines += ["", f"best peer per workload: " + ", ".join(
        f"{w} {max(peers, key=lambda e: results[e][w]) if peers else '-'} {best[w]:.1f}" for w in WORKLOADS)]
    lines += _llama_table(results)
    lines += _targets(results)
    return "\n".join(lines)


def _get(results: dict, engine: str, workload: str) -> float:
    r = results.get(engine, {})
    return float("nan") if "error" in r else r.get(workload, float("nan"))


def _best_of(*values) -> float:
    values = [v for v in values if v == v]  # nan: engine missing or failed
    return max(values) if values else float("nan")


def _ours(results: dict, precision: str, workload: str) -> float:
    """Our figure at one precision: the better of the two KV layouts (concat, shared_buffer)."""
    return _best_of(_get(results, f"ours-{precision}", workload), _get(results, f"ours-{precision}-inplace", workload))


# precision -> (b1, b8, prefill) targets against llama.cpp at the same bits (issue 15)
LLAMA_TARGETS = {"fp32": (1.0, 1.3, 1.3), "int8": (1.3, 2.0, 1.3), "int4": (1.3, 2.0, 1.3)}


def _llama_table(results: dict) -> list:
    """Ours against llama.cpp at the same precision: tok/s and the ratio, per workload."""
    if not any(e in results for e in LLAMA_ENGINES):
        return []
    lines = ["", "| precision | llama.cpp b1 | ours b1 | × | llama.cpp b8 | ours b8 | × | llama.cpp pp512 | ours "
             "prefill-512 | × |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine, precision in LLAMA_ENGINES.items():
        if engine not in results:
            continue
        if "error" in results[engine]:
            lines.append(f"| {precision} ({engine}) | error: {results[engine]['error']} |" + " |" * 8)
            continue
        cells = []
        for w in WORKLOADS:
            theirs, ours = _get(results, engine, w), _ours(results, precision, w)
            cells.append(f"{theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}")
        lines.append(f"| {precision} ({engine}) | " + " | ".join(cells) + " |")
    return lines


def _targets(results: dict) -> list:
    get = lambda engine, w: _get(results, engine, w)  # noqa: E731
    fp32_peers = ["transformers", "ct2-fp32", "optimum-fp32"]
    all_peers = fp32_peers + ["ct2-int8"]
    best_fp32 = _best_of(*(get(e, "b1") for e in fp32_peers))
    best_b8 = _best_of(*(get(e, "b8") for e in all_peers))
    best_prefill = _best_of(*(get(e, "prefill") for e in all_peers))
    best_ours_b8 = _best_of(*(get(e, "b8") for e in results if e.startswith("ours")))
    best_ours_prefill = _best_of(*(get(e, "prefill") for e in results if e.startswith("ours")))
    checks = [("fp32 b1 ≥ 1.3 × fastest fp32 peer (transformers, CTranslate2, Optimum)",
               _ours(results, "fp32", "b1") / best_fp32, 1.3),
              ("b8 (best of ours) ≥ 1.3 × fastest of those", best_ours_b8 / best_b8, 1.3),
              ("int8 b1 ≥ 2 × CTranslate2 int8", _ours(results, "int8", "b1") / get("ct2-int8", "b1"), 2.0),
              ("int4 b1 ≥ 2.5 × CTranslate2 int8", _ours(results, "int4", "b1") / get("ct2-int8", "b1"), 2.5),
              ("prefill-512 (best of ours) ≥ fastest of those", best_ours_prefill / best_prefill, 1.0)]
    for engine, precision in LLAMA_ENGINES.items():
        if engine in results:
            for w, want in zip(WORKLOADS, LLAMA_TARGETS[precision]):
                checks.append((f"{precision} {w} ≥ {want} × llama.cpp {engine[6:].upper()}",
                               _ours(results, precision, w) / get(engine, w), want))
    return ["", "| target | measured | met |", "|---|---|---|"] + [
        f"| {name} | {ratio:.2f}× | {'yes' if ratio >= want else 'no'} |"
        for name, ratio, want in checks if ratio == ratio]  # nan: an engine of the check was not run


def _median(runs: list) -> dict:
    """Per figure, the median over rounds (an engine that failed in any round reports that round's error)."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/runtime-bench")
    parser.add_argument("--only", help="comma-separated engines (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", nargs=2, type=int, default=[128, 64], metavar=("B1", "B8"),
                        help="new tokens of the b1 and b8 workloads (a shorter run on a busy machine)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per engine, interleaved across engines; the table shows medians")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--optimum-python", default="/tmp/optimum-venv/bin/python",
                        help="python of a venv with optimum-onnx[onnxruntime] (skipped when missing)")
    parser.add_argument("--llama-dir", default=None,
                        help="llama.cpp source tree (default: $LLAMA_CPP_DIR); its engines are skipped without one")
    parser.add_argument("--llama-bin", default=None,
                        help="llama.cpp binaries (default: $LLAMA_CPP_BIN, else LLAMA_DIR/build/bin)")
    parser.add_argument("--ours-options", default="{}", help="JSON keyword arguments for our generate()")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, new in zip(("b1", "b8"), args.new_tokens):
        if new < 2:
            parser.error(f"--new-tokens {new}: expected at least 2 (decode speed is t(new) - t(1))")
        WORKLOADS[name] = WORKLOADS[name][:2] + (new,)
    if args.worker:
        prompts = json.loads(Path(args.prompts).read_text())
        print(json.dumps(WORKERS[args.worker](args, prompts)))
        return

    engines = [f"ours-{p}{v}" for p in OURS for v in ("", "-inplace")]
    engines += ["transformers", "ct2-fp32", "ct2-int8", "optimum-fp32", *LLAMA_ENGINES]
    if args.only:
        wanted = args.only.split(",")
        unknown = [e for e in wanted if e not in engines]
        if unknown:
            parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(engines)}")
        engines = [e for e in engines if e in wanted]
    else:  # the per-kernel int8 rows (ours-int8-token, ...) run when --only names them
        engines = [e for e in engines if not e.startswith("ours-int8-")]
    try:
        llama = llama_cpp.locate(args.llama_dir, args.llama_bin)
        for name in ("llama-bench", "llama-batched-bench"):
            llama_cpp.binary(llama[1], name)
    except llama_cpp.LlamaCppMissing as e:
        if args.only and any(e_ in LLAMA_ENGINES for e_ in engines):
            parser.exit(2, f"runtime_bench: {e}\n")
        llama = e  # the default engine list: llama.cpp's rows say why they are missing
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    optimum_python = args.optimum_python if Path(args.optimum_python).exists() else None
    table = _prepare(work, optimum_python, engines, llama)
    sys.path.insert(0, str(REPO))
    from gptexport.exporter.tokenizer import gpt2_tokenizer

    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts(gpt2_tokenizer())))
    bandwidth = _bandwidth_gbs()
    runs = {engine: [] for engine in engines}
    for round_ in range(args.rounds):
        for engine in engines:
            runs[engine].append(_run_engine(engine, table[engine], args, optimum_python, prompts_file))
            print(f"[bench] round {round_ + 1}/{args.rounds} {engine}: {runs[engine][-1]}", file=sys.stderr,
                  flush=True)
    results = {engine: _median(r) for engine, r in runs.items()}
    import onnxruntime
    import torch

    header = (f"GPT-2 124M random weights (seed 0), greedy, {args.threads} threads, new tokens b1 "
              f"{WORKLOADS['b1'][2]} / b8 {WORKLOADS['b8'][2]}, "
              f"{platform.processor() or platform.machine()}, read bandwidth {bandwidth:.1f} GB/s; "
              f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; best of {args.repeats} per "
              f"process, median of {args.rounds} fresh process(es) per engine, interleaved")
    if not isinstance(llama, Exception) and any(e in LLAMA_ENGINES for e in engines):
        header += f"; llama.cpp {llama_cpp.which_build(llama[1])}"
    print(_report(results, table, bandwidth, header))
    (work / "results.json").write_text(json.dumps({"results": results, "runs": runs, "bandwidth_gbs": bandwidth},
                                                  indent=1))


def _run_engine(engine: str, entry: tuple, args, optimum_python, prompts_file: Path) -> dict:
    """One fresh worker process for one engine; its figures, or {"error": why}."""
    worker, path, options, _ = entry
    if worker == "llama" and path is None:
        return {"error": options}
    python = optimum_python if worker == "optimum" else sys.executable
    if python is None:
        return {"error": "no optimum venv (--optimum-python)"}
    cmd = [python, __file__, "--worker", worker, "--path", str(path), "--prompts", str(prompts_file),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--new-tokens", *map(str, args.new_tokens),
           "--options", args.ours_options if worker == "ours" else options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
