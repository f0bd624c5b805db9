"""The runtime generates with torch, transformers and onnx made unimportable (the layering, enforced)."""

import subprocess
import sys
from pathlib import Path

from fake_artifact import CONTINUATION

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "onnx", "gptexport.exporter", "gptexport.graphs", "onnxscript", "onnx_ir")

# Installed before anything else: any import of a blocked top-level name (or its submodules) fails.
CHILD = """
import sys
BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Blocker())
from gptexport import runtime
model = runtime.load(sys.argv[1])
text = model.generate("xa", max_new_tokens=20)
pieces = "".join(model.stream("xa", max_new_tokens=20))
from gptexport.runtime.perplexity import perplexity  # the quality measurement too
scored = perplexity(model, "xa" * 40, window=16, reference=model)
assert scored.tokens == 79 and scored.kl["mean"] == 0.0, scored
from gptexport.runtime.cli import main  # the CLI too
leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
assert not leaked, leaked
sys.stdout.buffer.write((text + "|" + pieces).encode("utf-8"))
"""


def test_generate_without_torch_transformers_onnx(artifact):
    result = subprocess.run([sys.executable, "-c", CHILD.format(blocked=BLOCKED), str(artifact)], cwd=ROOT,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8") == f"{CONTINUATION}|{CONTINUATION}"


def test_blocker_really_blocks():
    code = CHILD.split("from gptexport import runtime")[0] + "import onnx\n"
    result = subprocess.run([sys.executable, "-c", code.format(blocked=BLOCKED)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "onnx is blocked" in result.stderr
