"""`gptrun serve` under concurrent streaming clients, against one-at-a-time serving and llama.cpp's llama-server.

Starts each server on GPT-2 124M (random weights; fp32, int8 and int4; int8-nbits, int8-token and int8-dynamic:
the same 8 bits through one int8 kernel each, `gptexport --int8 --int8-kernel nbits|token|dynamic`, where int8 is
the export's default kernel), drives it over 127.0.0.1 with httpx
at 1, 4, 16 and 64 concurrent streaming clients (a bounded number of requests each: a 32-token prompt given as
token ids, 32 generated tokens), and prints one table: aggregate generated tok/s, p50/p95 time to first token,
p50/p95 inter-token latency, requests refused with 429 and how fast; then, per precision, issue 12's targets at
16 clients against the rows of the same run. Rows:

  gptexport      --max-batch 16 --max-queue 32 (continuous batching; at 64 clients the excess gets 429)
  one-at-a-time  --max-batch 1 --max-queue 64 (batching off: the same server, one sequence at a time)
  llama-server   -np 16 (continuous batching) on a GGUF conversion of the same checkpoint at the same precision
                 (f32 / q8_0 / q4_0: bench/llama_cpp.py; the int8-KERNEL rows have none of their own: their
                 peer is int8's)

The full table (every row above at 1/4/16/64 clients; fp32 and the three int8 kernels), one command:

    LD_LIBRARY_PATH=/work/cache/llama.cpp/build-noamx/bin \
    LLAMA_CPP_DIR=/work/cache/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp \
    python bench/serve_bench.py --work /tmp/speed/serve-work --precisions fp32 int8-nbits int8-token int8-dynamic

    python bench/serve_bench.py [--work DIR] [--llama-dir DIR] [--llama-bin DIR] [--precisions fp32 int8 int4]
                                [--clients 1 4 16 64] [--new-tokens 32] [--requests-per-client N]
                                [--baseline-clients 1 4 16] [--stagger SECONDS]

By default every client sends its first request at once (a burst: the worst case for time to first token; equal
requests then finish together and the next ones arrive together too). --stagger S spreads the first requests over
S seconds, so that arrivals stay out of step as independent users' do; rows measured so are marked "stag".

--llama-dir (or LLAMA_CPP_DIR) is a llama.cpp source tree (e.g. the one vendored in the llama-cpp-python sdist),
--llama-bin (or LLAMA_CPP_BIN; default its build/bin) where llama-server and llama-quantize are built; without
them the peer rows are skipped with the reason. Timings are client-side: the client shares the machine's cores
with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402 - bench/llama_cpp.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 32
NEW_TOKENS = 32  # --new-tokens
INT8_KERNELS = ("nbits", "token", "hybrid", "dynamic")  # gptexport --int8-kernel: the int8-KERNEL rows


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- artifacts ---------------------------------------------------------------------------------------------------

def checkpoint(work: Path) -> Path:
    """GPT-2 124M with seeded random weights as a local HF checkpoint (both servers load these weights)."""
    ckpt = work / "gpt2-random"
    if not (ckpt / "config.json").exists():
        code = ("import torch, transformers, sys; torch.manual_seed(0);"
                "m = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval(); m.save_pretrained(sys.argv[1]);"
                "from gptexport.exporter.tokenizer import gpt2_tokenizer; from pathlib import Path;"
                "gpt2_tokenizer(50257).save(str(Path(sys.argv[1]) / 'tokenizer.json'))")
        subprocess.run([sys.executable, "-c", code, str(ckpt)], check=True)
        config = json.loads((ckpt / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))  # llama.cpp's converter reads n_ctx
        (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt


def artifact(work: Path, ckpt: Path, precision: str) -> Path:
    out = work / f"gpt2-{precision}-inplace"
    if not (out / "manifest.json").exists():
        flags = {"fp32": [], "int8": ["--int8"], "int4": ["--int4"],
                 **{f"int8-{k}": ["--int8", "--int8-kernel", k] for k in INT8_KERNELS},
                 "int8-norescore": ["--int8", "--rescore-top-k", "0"]}[precision]
        subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", str(ckpt), "-o", str(out), "--force",
                        "--kv-layout", "shared_buffer", *flags], check=True)
    return out


# -- servers -----------------------------------------------------------------------------------------------------

class Served:
    def __init__(self, cmd: list, url: str, ready: str, model: str, extra: dict):
        self.cmd, self.url, self.model, self.extra = cmd, url, model, extra
        # the server's log goes to a file: a pipe nobody reads would block a chatty server (llama-server logs every
        # request) once its 64 KiB buffer is full
        self.log = tempfile.TemporaryFile("w+", errors="replace")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {self.tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"{cmd} not ready")

    def tail(self, chars: int = 2000) -> str:
        """The end of the server's log so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def gptexport_server(art: Path, max_batch: int, max_queue: int, threads: int) -> Served:
    port = free_port()
    cmd = [sys.executable, "-m", "gptexport.runtime.cli", "serve", str(art), "--port", str(port), "--model-name",
           "gpt2", "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--context",
           str(PROMPT_TOKENS + NEW_TOKENS), "--threads", str(threads)]
    return Served(cmd, f"http://127.0.0.1:{port}", "/health", "gpt2", {"min_tokens": NEW_TOKENS})


def llama_server(binaries: Path, model: Path, parallel: int, threads: int) -> Served:
    port = free_port()
    cmd = [str(llama_cpp.binary(binaries, "llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port",
           str(port), "-np", str(parallel), "-c", str(parallel * (PROMPT_TOKENS + NEW_TOKENS)), "-t", str(threads),
           "-tb", str(threads), "--no-webui", "-a", "gpt2"]
    return Served(cmd, f"http://127.0.0.1:{port}", "/health", "gpt2", {"ignore_eos": True})


# -- clients -----------------------------------------------------------------------------------------------------

async def one_request(http: httpx.AsyncClient, served: Served, prompt: list, out: dict) -> None:
    body = {"model": served.model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            **served.extra}
    start = time.perf_counter()
    times = []
    async with http.stream("POST", served.url + "/v1/completions", json=body) as response:
        if response.status_code == 429:
            out["refused"].append(time.perf_counter() - start)
            await response.aread()
            return
        if response.status_code != 200:
            out["errors"].append(response.status_code)
            await response.aread()
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    if not times:
        out["errors"].append("no tokens")
        return
    out["ttft"].append(times[0] - start)
    out["itl"].extend(b - a for a, b in zip(times, times[1:]))
    out["tokens"] += len(times)
    out["done"] += 1


async def drive(served: Served, prompt: list, clients: int, per_client: int, stagger: float = 0.0) -> dict:
    """`clients` concurrent clients, `per_client` requests each, back to back. stagger > 0: client i starts
    i * stagger / clients seconds late (arrivals spread over `stagger` seconds instead of one burst; identical
    requests then stay out of step)."""
    out = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "refused": [], "errors": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(i):
            await asyncio.sleep(i * stagger / clients)
            for _ in range(per_client):
                await one_request(http, served, prompt, out)

        await one_request(http, served, prompt, {"ttft": [], "itl": [], "tokens": 0, "done": 0, "refused": [],
                                                 "errors": []})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        out["wall"] = time.perf_counter() - start
    out["sent"] = clients * per_client
    return out


def row(name: str, precision: str, clients: int, out: dict) -> str:
    ms = lambda v: f"{v * 1000:7.1f}"  # noqa: E731
    refused = out["refused"]
    return (f"| {name:<13} | {precision:<12} | {clients:>3} | {out['done']:>4} | {out['tokens'] / out['wall']:7.1f} | "
            f"{ms(percentile(out['ttft'], .5))} | {ms(percentile(out['ttft'], .95))} | "
            f"{ms(percentile(out['itl'], .5))} | {ms(percentile(out['itl'], .95))} | {len(refused):>4} | "
            f"{ms(max(refused)) if refused else '      -'} | {len(out['errors']):>3} |")


HEADER = ("| server        | prec         |  c  | done |  tok/s  | TTFT p50| TTFT p95| ITL p50 | ITL p95 | 429s | 429 max | err |\n"
          "|---------------|--------------|-----|------|---------|---------|---------|---------|---------|------|---------|-----|")


def main() -> None:
    global NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve-bench"))
    parser.add_argument("--llama-dir", default=None, help="llama.cpp source tree (default: $LLAMA_CPP_DIR)")
    parser.add_argument("--llama-bin", default=None,
                        help="llama.cpp binaries (default: $LLAMA_CPP_BIN, else LLAMA_DIR/build/bin)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"],
                        choices=["fp32", "int8", *(f"int8-{k}" for k in INT8_KERNELS), "int8-norescore", "int4"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--servers", nargs="+", default=["gptexport", "one-at-a-time", "llama-server"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="default: 2 (8 at 1 client), 1 at 64 clients")
    parser.add_argument("--baseline-clients", nargs="+", type=int, default=None,
                        help="client counts for the one-at-a-time rows (default: --clients)")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="spread the clients' first requests over this many seconds (default 0: all at once, "
                             "the worst case for time to first token); the rows say which")
    args = parser.parse_args()
    NEW_TOKENS = args.new_tokens
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.work)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = Path(os.__file__).read_text()[:4000]
    prompt = tokenizer.encode(text).ids[:PROMPT_TOKENS]  # real text: the opening of the stdlib's os.py
    lines, results = [HEADER], {}
    print(HEADER, flush=True)
    for precision in args.precisions:
        art = artifact(args.work, ckpt, precision)
        for name in args.servers:
            try:
                if name == "gptexport":
                    served = gptexport_server(art, 16, 32, args.threads)
                elif name == "one-at-a-time":
                    served = gptexport_server(art, 1, 64, args.threads)
                elif precision.startswith("int8-"):  # the same GGUF as int8: its rows are the peer
                    continue
                else:
                    source, binaries = llama_cpp.locate(args.llama_dir, args.llama_bin)
                    model = llama_cpp.gguf(args.work, ckpt, source, binaries, precision)
                    served = llama_server(binaries, model, 16, args.threads)
            except llama_cpp.LlamaCppMissing as e:
                print(f"| {name} | {precision} | skipped: {e} |", flush=True)
                continue
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                print(f"| {name} | {precision} | could not start: {str(e)[:200]} |", flush=True)
                continue
            try:
                counts = args.baseline_clients if name == "one-at-a-time" and args.baseline_clients else args.clients
                for clients in counts:
                    per_client = args.requests_per_client or (1 if clients >= 64 else max(2, 8 // clients))
                    out = asyncio.run(drive(served, prompt, clients, per_client, args.stagger))
                    results[name, precision, clients] = out
                    line = row(name + (" stag" if args.stagger else ""), precision, clients, out)
                    lines.append(line)
                    print(line, flush=True)
            except httpx.HTTPError as e:  # the server went away mid-run: say so with its log, go on with the next
                print(f"| {name} | {precision} | failed: {type(e).__name__}: {e} |", flush=True)
                print(f"[{name} log] {served.tail()}", file=sys.stderr, flush=True)
            finally:
                served.stop()
    print("\n".join(lines))
    print("\n" + "\n".join(targets(results, args.precisions)))


def targets(results: dict, precisions: list, clients: int = 16) -> list:
    """Issue 12's targets at `clients` clients, from the rows of this run (a missing row: "-")."""
    lines = [f"| targets at {clients} clients | tok/s vs one-at-a-time (>= 4x) | tok/s vs llama-server (>= 1x) | "
             f"ITL p50 vs 1 client (<= 3x) | TTFT p95 (<= 1 s) | 64 clients: lost / 429 max |",
             "|---|---|---|---|---|---|"]
    rate = lambda out: out["tokens"] / out["wall"] if out else float("nan")  # noqa: E731
    for precision in precisions:
        ours = results.get(("gptexport", precision, clients))
        if ours is None:
            continue
        alone = results.get(("one-at-a-time", precision, clients))
        peer = results.get(("llama-server", "int8" if precision.startswith("int8-") else precision, clients))
        single = results.get(("gptexport", precision, 1))
        many = results.get(("gptexport", precision, 64))
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
        itl = percentile(ours["itl"], .5)
        lost = "-"
        if many is not None:  # every request sent is either answered in full or refused with 429
            refused = many["refused"]
            lost = (f"{many['sent'] - many['done'] - len(refused)} lost ({len(many['errors'])} errors) / "
                    + (f"{max(refused) * 1000:.0f} ms" if refused else "no 429"))
        lines.append(f"| {precision} | {ratio(rate(ours), rate(alone)) if alone else '-'} | "
                     f"{ratio(rate(ours), rate(peer)) if peer else '-'} | "
                     f"{ratio(itl, percentile(single['itl'], .5)) if single else '-'} | "
                     f"{percentile(ours['ttft'], .95):.2f} s | {lost} |")
    return lines


if __name__ == "__main__":
    main()
