"""llama.cpp as a benchmark peer: find its build, convert a checkpoint to GGUF, quantize it.

Shared by bench/runtime_bench.py (llama-bench, llama-batched-bench) and bench/serve_bench.py (llama-server).
Nothing here is part of gptexport; llama.cpp is built once, outside the repository, from the sources the
`llama-cpp-python` sdist on PyPI vendors (BENCHMARKS.md has the commands):

    LLAMA_CPP_DIR   the llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)
    LLAMA_CPP_BIN   the directory holding its binaries (default: $LLAMA_CPP_DIR/build/bin)

or the benches' --llama-dir / --llama-bin flags.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# our precision -> llama.cpp's GGUF type (the same bits per weight: fp32, 8-bit blocks of 32, 4-bit blocks of 32)
GGUF_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
BUILD_HINT = ("build it from the llama-cpp-python sdist's vendor/llama.cpp with `cmake -B build -DGGML_NATIVE=OFF "
              "-DGGML_AVX512=ON ... && cmake --build build --target llama-bench llama-batched-bench llama-server "
              "llama-quantize` (BENCHMARKS.md)")


class LlamaCppMissing(Exception):
    """The llama.cpp sources or one of its binaries are not where the flags / environment say."""


def locate(source=None, binaries=None) -> tuple:
    """(source tree, binary dir) from the arguments, else LLAMA_CPP_DIR / LLAMA_CPP_BIN.

    Raises:
        LlamaCppMissing: one line naming what is missing and how to provide it.
    """
    source = source or os.environ.get("LLAMA_CPP_DIR")
    if not source:
        raise LlamaCppMissing("no llama.cpp given: pass --llama-dir DIR or set LLAMA_CPP_DIR to a llama.cpp source "
                              f"tree; {BUILD_HINT}")
    source = Path(source)
    if not (source / "convert_hf_to_gguf.py").exists():
        raise LlamaCppMissing(f"{source} is not a llama.cpp source tree (no convert_hf_to_gguf.py)")
    binaries = Path(binaries or os.environ.get("LLAMA_CPP_BIN") or source / "build" / "bin")
    return source, binaries


def binary(binaries: Path, name: str) -> Path:
    """The path of one llama.cpp program.

    Raises:
        LlamaCppMissing: it is not built there.
    """
    path = Path(binaries) / name
    if not path.exists():
        raise LlamaCppMissing(f"{name} is not built in {binaries} (set --llama-bin / LLAMA_CPP_BIN); {BUILD_HINT}")
    return path


def gguf(work: Path, ckpt: Path, source: Path, binaries: Path, precision: str) -> Path:
    """The GGUF file of `ckpt` at `precision` (fp32, int8 or int4), made once under `work`.

    convert_hf_to_gguf.py writes f32 from the checkpoint (it reads `n_ctx`, which transformers' GPT-2 config no
    longer carries: a copy of the checkpoint's config gets it); llama-quantize makes q8_0 / q4_0 from that file.
    """
    kind = GGUF_TYPES[precision]
    out = work / f"gpt2-{kind}.gguf"
    if out.exists():
        return out
    f32 = work / "gpt2-f32.gguf"
    if not f32.exists():
        src = work / "gguf-source"
        src.mkdir(parents=True, exist_ok=True)
        for f in Path(ckpt).iterdir():
            if f.name != "config.json" and not (src / f.name).exists():
                (src / f.name).symlink_to(f.resolve())
        config = json.loads((Path(ckpt) / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (src / "config.json").write_text(json.dumps(config, indent=2))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
        partial = f32.with_suffix(".partial")
        _run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32", "--outfile",
              str(partial)], env)
        partial.rename(f32)
    if kind != "f32":
        partial = out.with_suffix(".partial")
        _run([str(binary(binaries, "llama-quantize")), str(f32), str(partial), kind], None)
        partial.rename(out)
    return out


def _run(cmd: list, env) -> None:
    print(f"[llama.cpp] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} failed: {' / '.join(tail)}")


def which_build(binaries: Path) -> str:
    """`llama-bench --version`'s build line (which commit, which compiler), for the report header."""
    try:
        proc = subprocess.run([str(binary(binaries, "llama-bench")), "--version"], capture_output=True, text=True,
                              timeout=30)
    except (LlamaCppMissing, OSError, subprocess.TimeoutExpired):
        return "unknown build"
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("version") or "built with" in l]
    return "; ".join(lines) or shutil.which("llama-bench") or "unknown build"
