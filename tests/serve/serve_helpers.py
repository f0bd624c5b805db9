"""Run the real server in a subprocess on a free port of 127.0.0.1 for the tests.

`launch(artifact, *args, env=...)` runs `gptrun serve ARTIFACT --port 0`, under a launcher that makes torch,
transformers, onnx, onnx-ir, graphs/ and the exporter unimportable, and `wait_ready`
waits for its "ready at URL" line and returns a `Server` handle.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"ready at (http://127\.0\.0\.1:\d+)")
BLOCKED = ("torch", "transformers", "gptexport.exporter", "onnx", "onnx_ir", "onnxscript", "gptexport.graphs")
LAUNCHER = """
import sys
BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked: the server must not import it")
        return None

sys.meta_path.insert(0, Blocker())
from gptexport.runtime.cli import main
main(sys.argv[1:])
"""


class Server:
    """A running `gptrun serve` subprocess: `url`, `proc`, `output()` (stdout + stderr so far), `stop()`."""

    def __init__(self, proc: subprocess.Popen, url: str, lines: list):
        self.proc, self.url, self.lines = proc, url, lines

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _pump(stream, lines: list) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)


def launch(artifact, *args, env=None) -> subprocess.Popen:
    """Start `gptrun serve` (not waiting for it); stdout and stderr merged, as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", LAUNCHER.format(blocked=BLOCKED), "serve", str(artifact),
                             "--port", "0", *map(str, args)], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")


def wait_ready(proc: subprocess.Popen, timeout: float = 120) -> Server:
    lines: list = []
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = next((READY.search(line) for line in lines if READY.search(line)), None)
        if match:
            return Server(proc, match.group(1), lines)
        if proc.poll() is not None:
            time.sleep(0.2)
            raise AssertionError(f"server exited with {proc.returncode}:\n{''.join(lines)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server not ready after {timeout} s:\n{''.join(lines)}")
