"""`gptrun` end to end in a subprocess: output, one-line errors, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from fake_artifact import CONTINUATION

ROOT = Path(__file__).resolve().parents[2]


def gptrun(*args):
    return subprocess.run([sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_generate_prints_the_continuation(artifact):
    result = gptrun("generate", artifact, "xa", "--max-new-tokens", 20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == CONTINUATION + "\n"


def test_stream_and_stats(artifact):
    result = gptrun("generate", artifact, "hello", "--max-new-tokens", 4, "--stream", "--stats", "--stop", "s")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pqr\n"
    assert "prefill:" in result.stderr and "tokens/s" in result.stderr


def test_info(artifact):
    result = gptrun("info", artifact)
    assert result.returncode == 0, result.stderr
    for text in ("fake", "2 layers", "2 heads x 4", "float32", "kv layout:    concat", "model.onnx", "tokenizer.json",
                 "greedy_agreement"):
        assert text in result.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "{missing}", "x"], "does not exist"),
    (["generate", "{dir}", ""], "prompt is empty"),
    (["generate", "{dir}", "x", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["generate", "{dir}", "x", "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["generate", "{dir}", "x", "--max-new-tokens", "999"], "exceeds the model's 64 positions"),
    (["generate", "{dir}", "x", "--provider", "tpu"], "choose one of: cpu, cuda"),
    (["generate", "{dir}", "x", "--top-k", "many"], "'many' is not a valid integer"),
    (["generate", "{dir}"], "Missing argument"),
    (["nonsense"], "No such command"),
    (["info", "{corrupt}"], "checksum of model.onnx does not match the manifest"),
])
def test_errors_are_one_line_exit_2(artifact, tmp_path, args, message):
    data = bytearray((artifact / "model.onnx").read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        (corrupt / name).write_bytes((artifact / name).read_bytes())
    data[100] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    args = [a.format(dir=artifact, missing=tmp_path / "missing", corrupt=corrupt) for a in args]
    result = gptrun(*args) if args[0] != "info" else gptrun(*args, "--verify", "full")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("gptrun: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
