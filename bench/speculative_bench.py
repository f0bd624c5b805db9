"""Speculative decoding against plain decoding and CTranslate2 fp32, on a trained checkpoint, in one run.

    python bench/speculative_bench.py [--target CKPT] [--draft CKPT] [--rounds 3] [--new 48] [--workdir DIR]

The target defaults to the trained gpt2-bench checkpoint of tests/trained.py when it is cached, else gpt2-ci; the
draft model (--draft, default: gpt2-ci when the target is bigger) must use the target's tokenizer. Both are
exported fp32 (concat KV layout); the target is also converted to the shared_buffer layout (the in-place cache)
for the "-sb" engines; CTranslate2 converts the target (fp32).

Tasks (greedy, min_new_tokens = max_new_tokens so every engine decodes the same number of tokens):
  repeat    a held-out standard-library snippet, then "# The same code again:" and its first line: the answer
            is in the prompt (input-grounded)
  edit      the snippet with one name renamed in its first line: the rest, renamed, is in the prompt
  open      held-out prose from the Python documentation, continued (open-ended)
Each at batch 1 (one prompt) and batch 8 (eight prompts of the task). Engines: plain (our runtime), lookup
(`speculative="prompt_lookup"`), draft (`speculative=DRAFT_DIR`), ct2-fp32, and plain-sb, lookup-sb, draft-sb: the
same on the shared_buffer artifact (at batch 8 it checks drafts row by row: onnxruntime's GroupQueryAttention
takes several new tokens after a past at batch 1 only). Every engine runs in a fresh process per round, engines in
turn (A B A B ...), `--rounds` rounds; the table quotes medians of tokens/s (decode only: t(new) - t(1), new - 1
tokens per row) and of the per-round ratio to plain of the same layout (plain-sb for the -sb engines), the
acceptance rate, and whether the tokens equal that plain decoding's (CTranslate2's are compared too, for
information).

    python bench/speculative_bench.py --serve [--rounds 3] [--new 48]

`gptrun serve` on the shared_buffer target (--max-batch 4): the request extension `"speculative":
"prompt_lookup"` against plain requests, greedy, the repeat and open prompts: 1 client (one request at a time),
and 4 concurrent clients where none, one or all four speculate. Scenarios alternate within each round (fresh
server per round); the table quotes medians of each request's tokens/s (completion tokens / its wall time),
for the speculating request(s) and for the plain ones beside them, and whether every text equals the plain one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("repeat", "edit", "open")
BATCHES = (1, 8)
ENGINES = ("plain", "lookup", "draft", "ct2-fp32", "plain-sb", "lookup-sb", "draft-sb")
PROMPT_TOKENS = 56  # the trained checkpoints have 128 positions: prompt + new tokens fit in them


# -- prompts ------------------------------------------------------------------------------------------------------

def _snippets(text: str, count: int, tokenizer, limit: int) -> list:
    """`count` pieces of held-out text, each starting at a line and at most `limit` tokens, different places."""
    lines = text.splitlines(keepends=True)
    step = max(1, len(lines) // (count * 3))
    out, i = [], 0
    while len(out) < count and i < len(lines):
        piece, j = "", i
        while j < len(lines) and len(tokenizer.encode(piece + lines[j]).ids) <= limit:
            piece += lines[j]
            j += 1
        if piece.count("\n") >= 3 and piece.strip():
            out.append(piece)
        i += step
    return out


def prompts(ckpt: Path, tokenizer) -> dict:
    """task -> 8 prompts (the first is batch 1's), from the checkpoint's held-out text (never trained on)."""
    held = (ckpt / "heldout.txt").read_text()
    code = held[held.find("def "):] if "def " in held else held
    out = {}
    snippets = _snippets(code, 8, tokenizer, PROMPT_TOKENS // 2 - 4)
    out["repeat"] = [s + "\n# The same code again:\n" + s.splitlines(keepends=True)[0] for s in snippets]
    edits = []
    for s in snippets:
        first = s.splitlines(keepends=True)[0]
        words = [w for w in first.replace("(", " ").replace(")", " ").replace(":", " ").split() if w.isidentifier()]
        name = max(words, key=len) if words else "x"
        edits.append(s + f"\n# The same code, with {name} renamed to {name}_2:\n" + first.replace(name, name + "_2"))
    out["edit"] = edits
    prose = held[:held.find("def ")] if held.find("def ") > 2000 else held
    out["open"] = _snippets(prose, 8, tokenizer, PROMPT_TOKENS)
    return out


# -- workers: one process each, one JSON line ---------------------------------------------------------------------

def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def worker(args) -> dict:
    batch_prompts = json.loads(Path(args.prompts).read_text())
    new = args.new
    if args.engine == "ct2-fp32":
        import ctranslate2
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(args.target_ckpt) / "tokenizer.json"))
        generator = ctranslate2.Generator(args.ct2, device="cpu", compute_type="float32", intra_threads=args.threads)
        vocab = json.loads((Path(args.ct2) / "vocabulary.json").read_text())

        def generate(texts, n):
            tokens = [[vocab[i] for i in tokenizer.encode(t).ids] for t in texts]
            results = generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                               include_prompt_in_result=False, beam_size=1)
            return [r.sequences_ids[0] for r in results], None
    else:
        sys.path.insert(0, str(REPO))
        from gptexport import runtime

        shared = args.engine.endswith("-sb")
        model = runtime.load(args.shared if shared else args.artifact, threads=args.threads)
        # a draft as a user names it, its directory: the runtime loads it (the target's threads, not spinning)
        spec = {"plain": None, "lookup": "prompt_lookup", "draft": args.draft}[args.engine.removesuffix("-sb")]

        def generate(texts, n):
            result = model.generate(texts, max_new_tokens=n, min_new_tokens=n, do_sample=False, speculative=spec,
                                    num_speculative_tokens=args.k if spec is not None else None, return_result=True)
            return [c.tokens for c in result.completions], result.stats

    out = {}
    for key, texts in batch_prompts.items():
        tokens, stats = generate(texts, new)
        t_full = _timed(lambda: generate(texts, new), args.repeats)
        t_first = _timed(lambda: generate(texts, 1), args.repeats)
        out[key] = {"tok_s": len(texts) * (new - 1) / (t_full - t_first), "tokens": tokens,
                    "drafted": stats.drafted if stats else 0, "accepted": stats.accepted if stats else 0}
    return out


# -- driver -------------------------------------------------------------------------------------------------------

def _cached(preset: str):
    roots = [os.environ.get("GPTEXPORT_CACHE_DIR", str(Path.home() / ".cache" / "gptexport")),
             str(Path.home() / ".cache" / "gptexport"), "/tmp/gptexport-test-cache"]
    for root in roots:
        hits = sorted(glob.glob(f"{root}/trained/{preset}-*/config.json"))
        if hits:
            return Path(hits[-1]).parent
    return None


def _tool(name: str) -> str:
    """A console script next to this interpreter (a venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _export(ckpt: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        subprocess.run([_tool("gptexport"), str(ckpt), "-o", str(out), "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


# -- the server -----------------------------------------------------------------------------------------------------

SERVE_SCENARIOS = (("1 client", 1, 0), ("1 client, lookup", 1, 1), ("4 clients", 4, 0),
                   ("4 clients, 1 lookup", 4, 1), ("4 clients, 4 lookup", 4, 4))


def _serve(artifact: Path, threads: int):
    import re
    import threading

    proc = subprocess.Popen([_tool("gptrun"), "serve", str(artifact), "--port", "0", "--max-batch", "4",
                             "--threads", str(threads), "--model-name", "bench"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, ready = [], re.compile(r"ready at (http://127\.0\.0\.1:\d+)")
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        hit = next((ready.search(line) for line in list(lines) if ready.search(line)), None)
        if hit:
            return proc, hit.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit("gptrun serve did not start:\n" + "".join(lines))


def _request(url: str, prompt: str, new: int, lookup: bool) -> tuple:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "min_tokens": new, "temperature": 0}
    if lookup:
        body["speculative"] = "prompt_lookup"
    start = time.perf_counter()
    reply = httpx.post(url + "/v1/completions", json=body, timeout=600).json()
    seconds = time.perf_counter() - start
    return reply["usage"]["completion_tokens"] / seconds, reply["choices"][0]["text"]


def serve_bench(args, artifact: Path, tasks: dict) -> str:
    from concurrent.futures import ThreadPoolExecutor

    prompts = {task: tasks[task][0] for task in ("repeat", "open")}
    runs = {(task, name): [] for task in prompts for name, _, _ in SERVE_SCENARIOS}
    for r in range(args.rounds):
        proc, url = _serve(artifact, args.threads)
        try:
            for task, prompt in prompts.items():
                _request(url, prompt, 4, False)  # warm-up
                plain_text = _request(url, prompt, args.new, False)[1]
                for name, clients, lookups in SERVE_SCENARIOS:
                    print(f"[bench] serve round {r + 1}/{args.rounds} {task}: {name}", file=sys.stderr, flush=True)
                    with ThreadPoolExecutor(clients) as pool:
                        out = list(pool.map(lambda i: _request(url, prompt, args.new, i < lookups), range(clients)))
                    runs[task, name].append({"spec": [o[0] for o in out[:lookups]],
                                             "plain": [o[0] for o in out[lookups:]],
                                             "same": all(o[1] == plain_text for o in out)})
        finally:
            proc.terminate()
            proc.wait(30)
    lines = [f"gptrun serve {artifact.name} --max-batch 4 --threads {args.threads}; {args.new} new tokens, greedy; "
             f"median of {args.rounds} rounds (fresh server each), tok/s per request (completion tokens / wall)",
             "", "| prompt | scenario | lookup request tok/s | plain request tok/s | texts = plain |",
             "|---|---|---|---|---|"]
    for (task, name), results in runs.items():
        spec = [v for res in results for v in res["spec"]]
        plain = [v for res in results for v in res["plain"]]
        cell = lambda v: f"{statistics.median(v):.1f}" if v else "-"  # noqa: E731
        same = "yes" if all(res["same"] for res in results) else "NO"
        lines.append(f"| {task} | {name} | {cell(spec)} | {cell(plain)} | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=None, help="target checkpoint dir (default: gpt2-bench)")
    parser.add_argument("--draft", type=Path, default=None, help="draft checkpoint dir (default: gpt2-ci)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/speculative-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--k", type=int, default=None, help="num_speculative_tokens (default: the runtime's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--serve", action="store_true", help="measure the server's request extension instead")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ct2", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shared", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--target-ckpt", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    target = args.target or _cached("gpt2-bench") or _cached("gpt2-ci")
    draft = args.draft or (_cached("gpt2-ci") if target != _cached("gpt2-ci") else None)
    if target is None:
        sys.exit("no target checkpoint: pass --target, or train one (tests/trained.py)")
    engines = [e for e in args.engines.split(",") if not e.startswith("draft") or draft is not None]
    if args.serve:
        engines = ["plain-sb"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    artifact = _export(target, work / "target")
    draft_art = _export(draft, work / "draft") if draft is not None else None
    shared = work / "target-sb"
    if any(e.endswith("-sb") for e in engines) and not (shared / "manifest.json").exists():
        from gptexport.exporter.artifact import convert_to_shared_buffer

        convert_to_shared_buffer(artifact, shared, force=True)
    if args.serve:
        from tokenizers import Tokenizer

        print(serve_bench(args, shared, prompts(target, Tokenizer.from_file(str(target / "tokenizer.json")))))
        return
    ct2 = work / "ct2-fp32"
    if "ct2-fp32" in engines and not (ct2 / "model.bin").exists():
        subprocess.run([_tool("ct2-transformers-converter"), "--model", str(target), "--output_dir", str(ct2),
                        "--quantization", "float32", "--force"], check=True, stdout=subprocess.DEVNULL)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    tasks = prompts(target, tokenizer)
    batches = {f"{task} b{b}": texts[:b] for task, texts in tasks.items() for b in BATCHES}
    prompt_file = work / "prompts.json"
    prompt_file.write_text(json.dumps(batches))

    runs = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in engines:
            cmd = [sys.executable, __file__, "--worker", "1", "--engine", engine, "--artifact", str(artifact),
                   "--ct2", str(ct2), "--shared", str(shared), "--target-ckpt", str(target), "--prompts", str(prompt_file),
                   "--new", str(args.new), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            if args.k:
                cmd += ["--k", str(args.k)]
            if draft_art is not None:
                cmd += ["--draft", str(draft_art)]
            print(f"[bench] round {r + 1}/{args.rounds} {engine}", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[engine].append(json.loads(out))
    print(report(runs, engines, batches, target, draft, args))


def report(runs: dict, engines: list, batches: dict, target, draft, args) -> str:
    lines = [f"target {target.name}, draft {draft.name if draft else '-'}; {args.new} new tokens per row, greedy; "
             f"median of {args.rounds} rounds (fresh processes, engines in turn), {args.threads} threads",
             "", "| workload | engine | tok/s | × plain | × ct2-fp32 | acceptance | tokens = plain |",
             "|---|---|---|---|---|---|---|"]
    for key in batches:
        for engine in engines:
            base = "plain-sb" if engine.endswith("-sb") and "plain-sb" in runs else "plain"
            plain = runs[base][0][key]["tokens"] if base in runs else None
            tok = statistics.median(r[key]["tok_s"] for r in runs[engine])
            ratio = (statistics.median(r[key]["tok_s"] / p[key]["tok_s"] for r, p in zip(runs[engine], runs[base]))
                     if base in runs else float("nan"))
            vs_ct2 = (statistics.median(r[key]["tok_s"] / c[key]["tok_s"]
                                        for r, c in zip(runs[engine], runs["ct2-fp32"]))
                      if "ct2-fp32" in runs else float("nan"))
            drafted = sum(r[key]["drafted"] for r in runs[engine])
            accepted = sum(r[key]["accepted"] for r in runs[engine])
            rate = f"{100 * accepted / drafted:.0f} % of {drafted // len(runs[engine])}" if drafted else "-"
            same = all(r[key]["tokens"] == plain for r in runs[engine])
            lines.append(f"| {key} | {engine} | {tok:.1f} | {ratio:.2f} | {vs_ct2:.2f} | {rate} | "
                         f"{'yes' if same else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
