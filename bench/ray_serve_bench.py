"""Ray Serve replicas against one `gptrun serve`, at the same total cores, under concurrent clients.

    A  direct  gptrun serve ART --threads 2 --max-batch 16            (one process, 2 onnxruntime threads)
    B  ray     gptrun serve ART --ray --replicas 2 --replica-cpus 1 --max-batch 8
                                                                      (2 replicas x 1 thread behind Ray's proxy)

Each round starts A, then B, as fresh processes (A B A B ...), drives each over 127.0.0.1 with httpx at --clients
concurrent clients, each sending --requests non-streaming completions (a --prompt-tokens prompt given as token
ids, exactly --new-tokens generated: min_tokens = max_tokens, greedy), after 4 warm-up requests, and prints one
table: aggregate generated tok/s, p50/p95 request latency, and B/A per round. The client shares the cores.

    python bench/ray_serve_bench.py [--artifact DIR] [--rounds 2] [--clients 16] [--requests 4]

Without --artifact, GPT-2 124M with seeded random weights is exported as int8 with the in-place cache
(`gptexport gpt2 --random-weights --int8 --kv-layout shared_buffer`) into --work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready at (http://127\.0\.0\.1:\d+)")
NAME = "bench"


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def artifact(work: Path) -> Path:
    out = work / "gpt2-int8-inplace"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", "gpt2", "--random-weights", "--int8",
                        "--kv-layout", "shared_buffer", "-o", str(out), "--force"], check=True)
    return out


class Server:
    """A `gptrun serve` subprocess in its own session; `stop()` sends SIGTERM and waits for the whole session."""

    def __init__(self, args: list):
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "gptexport.runtime.cli", "serve", *map(str, args),
                                      "--port", "0", "--model-name", NAME], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self.lines: list = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = [READY.search(line) for line in self.lines if "gptrun serve: ready at" in line]
            if found and found[0]:
                self.url = found[0].group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def drive(url: str, clients: int, requests: int, prompt_tokens: int, new_tokens: int) -> dict:
    body = {"model": NAME, "prompt": [(17 * i + 5) % 50000 for i in range(prompt_tokens)],
            "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one() -> tuple:
            start = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(one() for _ in range(4)))  # warm-up: sessions, routing, first allocations

        async def worker() -> list:
            return [await one() for _ in range(requests)]

        start = time.perf_counter()
        done = await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    results = [r for w in done for r in w]
    latencies = [t for t, _ in results]
    return {"tok_s": sum(n for _, n in results) / wall, "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95), "requests": len(results), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptexport-ray-bench"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    art = args.artifact or artifact(args.work)
    setups = {
        "direct": [art, "--threads", 2, "--max-batch", 16, "--max-queue", 64],
        "ray": [art, "--ray", "--replicas", 2, "--replica-cpus", 1, "--max-batch", 8, "--max-queue", 64],
    }
    rows = {name: [] for name in setups}
    for round_ in range(args.rounds):
        for name, server_args in setups.items():
            server = Server(server_args)
            try:
                result = asyncio.run(drive(server.url, args.clients, args.requests, args.prompt_tokens,
                                           args.new_tokens))
            finally:
                server.stop()
            rows[name].append(result)
            print(f"round {round_ + 1} {name:6s} {result['tok_s']:7.1f} tok/s  p50 {result['p50']:.2f} s  "
                  f"p95 {result['p95']:.2f} s  ({result['requests']} requests, {result['wall']:.1f} s)",
                  flush=True)
    print(f"\n{args.clients} clients x {args.requests} requests, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens; {art}")
    print(f"{'setup':44s} {'tok/s (median)':>15s} {'p50 s':>7s} {'p95 s':>7s}")
    labels = {"direct": "gptrun serve, 1 process x 2 threads", "ray": "Ray Serve, 2 replicas x 1 thread"}
    for name, results in rows.items():
        print(f"{labels[name]:44s} {statistics.median(r['tok_s'] for r in results):15.1f} "
              f"{statistics.median(r['p50'] for r in results):7.2f} {statistics.median(r['p95'] for r in results):7.2f}")
    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(rows["direct"], rows["ray"])]
    print(f"ray / direct throughput per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
