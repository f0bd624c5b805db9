"""graphs/ imports without torch or transformers (they are made unimportable in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_PROBE = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Blocked())
import gptexport.graphs, gptexport.graphs.pipeline, gptexport.graphs.fusion
from gptexport.graphs.fusion import attention, gelu, rotary, skip_layernorm
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
print("ok")
"""


def test_graphs_import_without_torch():
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
