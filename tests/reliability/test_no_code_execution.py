"""Loading a checkpoint executes none of its code: no pickle payloads, no custom modules unless asked for.

Each hostile checkpoint carries code that would create a marker file; the marker must never appear. A positive
control runs the custom-code checkpoint with --trust-remote-code and sees the marker, proving the tests detect
execution when it happens.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from gptexport.exporter.presets import ExportError

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs exec(): what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _config(directory: Path, **extra) -> None:
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257).to_dict()
    config.update(extra)
    (directory / "config.json").write_text(json.dumps(config))


def _tokenizer(directory: Path) -> None:
    from gptexport.exporter.tokenizer import gpt2_tokenizer

    gpt2_tokenizer().save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("form", ["torch.save zip", "legacy pickle"])
def test_pickle_payload_in_pytorch_model_bin_never_runs(tmp_path, form):
    import torch

    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    ckpt.mkdir()
    _config(ckpt)
    _tokenizer(ckpt)
    weights = {"transformer.wte.weight": Payload(marker), "lm_head.weight": torch.zeros(50257, 16)}
    if form == "torch.save zip":
        torch.save(weights, ckpt / "pytorch_model.bin")
    else:
        with open(ckpt / "pytorch_model.bin", "wb") as f:
            pickle.dump(weights, f)
    from gptexport.exporter.load import load

    with pytest.raises(ExportError, match="cannot load the weights"):
        load(str(ckpt))
    assert not marker.exists(), "loading the checkpoint executed its pickle payload"


def _custom_code_checkpoint(directory: Path, marker: Path, model_type: str) -> None:
    directory.mkdir()
    _config(directory, model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                        "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    _tokenizer(directory)
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (directory / "configuration_evil.py").write_text(
        code + "from transformers import GPT2Config\n\n\nclass EvilConfig(GPT2Config):\n"
        f"    model_type = {model_type!r}\n")
    (directory / "modeling_evil.py").write_text(
        code + "from transformers import GPT2LMHeadModel\n\n\nclass EvilModel(GPT2LMHeadModel):\n    pass\n")


def _gptexport(*args, home: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(home), HF_MODULES_CACHE=str(home / "modules"),
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model_type", ["evil-gpt", "gpt2"])
def test_auto_map_custom_code_not_run_without_the_flag(tmp_path, model_type):
    """An unknown model_type is refused; a known one with an auto_map loads the library's own class."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    _custom_code_checkpoint(ckpt, marker, model_type)
    result = _gptexport(ckpt, "-o", tmp_path / "out", "--random-weights", "--no-validate", home=tmp_path / "hf")
    assert not marker.exists(), "the checkpoint's own code ran without --trust-remote-code"
    assert "Traceback" not in result.stderr
    if model_type == "evil-gpt":
        assert result.returncode == 2 and "gptexport: error:" in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()


def test_positive_control_trust_remote_code_runs_it(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    _custom_code_checkpoint(ckpt, marker, "evil-gpt")
    result = _gptexport(ckpt, "-o", tmp_path / "out", "--random-weights", "--no-validate", "--trust-remote-code",
                        home=tmp_path / "hf")
    if "no such option" in result.stderr.lower():
        pytest.skip("gptexport has no --trust-remote-code flag yet")
    assert marker.exists(), f"custom code did not run even with --trust-remote-code: {result.stderr}"
