"""`gptrun` end to end in a subprocess: output, one-line errors, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from fake_artifact import CONTINUATION

ROOT = Path(__file__).resolve().parents[2]


def gptrun(*args):
    return subprocess.run([sys.executable, "-c", "from gptexport.runtime.cli import main; main()", *map(str, args)],
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


def test_info_json_has_the_facts_of_the_text_form(artifact):
    import json

    text, raw = gptrun("info", artifact), gptrun("info", artifact, "--json")
    assert raw.returncode == 0, raw.stderr
    facts = json.loads(raw.stdout)
    assert facts["model"]["name"] == "fake" and facts["config"]["num_layers"] == 2
    assert facts["dtype"] == "float32" and facts["kv_layout"] == "concat"
    assert facts["optimum_loadable"] is False  # the fake artifact ships no config.json
    assert "optimum:      not loadable (no config.json / generation_config.json)" in text.stdout
    for name, size in facts["files"].items():
        assert name in text.stdout and isinstance(size, int)
    for key, value in facts["validation"].items():
        assert f"{key}={value}" in text.stdout
    for key, value in facts["passes"].items():
        assert f"{key}={value}" in text.stdout
    assert f"manifest sha256: {facts['manifest_sha256']}" in text.stdout


def test_version_of_both_commands():
    from gptexport import __version__

    assert gptrun("--version").stdout == f"gptrun (gptexport) {__version__}\n"
    done = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"gptexport {__version__}\n", done.stderr


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


@pytest.mark.parametrize("flags", [["--prompt-lookup"], ["--prompt-lookup", "--speculative-tokens", 2],
                                   ["--draft", None]])
def test_speculative_flags_print_the_same_text_and_the_acceptance(artifact, flags):
    flags = [artifact if f is None else f for f in flags]  # the artifact drafts for itself: same tokenizer
    result = gptrun("generate", artifact, "xa", "--max-new-tokens", 20, "--stats", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout == CONTINUATION + "\n"
    assert "speculative:" in result.stderr and "drafted tokens accepted" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prompt-lookup", "--draft", "."], "--prompt-lookup and --draft exclude each other"),
    (["--prompt-lookup", "--speculative-tokens", 0], "num_speculative_tokens must be an integer in [1, 64], got 0"),
    (["--speculative-tokens", 3], "num_speculative_tokens needs speculative"),
    (["--draft", "/nonexistent-draft"], "no such directory")])
def test_speculative_bad_flags_are_one_line(artifact, flags, message):
    result = gptrun("generate", artifact, "xa", "--max-new-tokens", 4, *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
