"""Make the real Optimum exports that tests/test_adopt_optimum.py adopts: tiny checkpoints, exported by Optimum.

    python tests/data/optimum/make_fixtures.py --venv /work/cache/optimum-venv

CI cannot run Optimum (optimum-onnx pins transformers below 4.58 and lives in its own venv), so its output is
committed: for each of `gpt2` and `gptj-partial-rotary` (tests/tiny_models.py's shapes, 2 layers of width 64, with
a byte-level vocabulary of 260 instead of 50k so that each model.onnx stays under 1 MB), this writes

    NAME/checkpoint/   the torch checkpoint (seeded, transformers' own init: Optimum dedups its equal weights)
    NAME/optimum/      what `optimum-cli export onnx --task text-generation-with-past` wrote, as it is

The venv is bench/optimum_interop.py's (made there on first use).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "tests"))
VOCAB, POSITIONS, EOS = 260, 128, 256  # 256 byte tokens, <|endoftext|>, 3 unused; positions: byte-long prompts
KEEP = ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json")


def byte_tokenizer():
    """Byte-level BPE with no merges: every byte one token (0-255), then <|endoftext|> (256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to `char` (printable bytes stand for themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table[char]


def make_checkpoint(directory: Path, name: str) -> None:
    import torch
    import transformers

    from tiny_models import MODEL_CLASSES, TINY_CONFIGS

    config_class, kwargs = TINY_CONFIGS[name]
    kwargs = {**kwargs, "vocab_size": VOCAB, "n_positions": POSITIONS, "bos_token_id": EOS, "eos_token_id": EOS}
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASSES[config_class])(config).eval()
    model.save_pretrained(str(directory))
    byte_tokenizer().save(str(directory / "tokenizer.json"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="the Optimum venv (bench/optimum_interop.py)")
    args = parser.parse_args()
    for name in ("gpt2", "gptj-partial-rotary"):
        base = HERE / name
        shutil.rmtree(base, ignore_errors=True)
        (base / "checkpoint").mkdir(parents=True)
        make_checkpoint(base / "checkpoint", name)
        out = base / "export"
        subprocess.run([args.venv / "bin" / "optimum-cli", "export", "onnx", "--model", base / "checkpoint",
                        "--task", "text-generation-with-past", out], check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
        (base / "optimum").mkdir()
        for file in KEEP:
            if (out / file).is_file():
                shutil.copy2(out / file, base / "optimum" / file)
        shutil.rmtree(out)
        print(name, {p.name: p.stat().st_size for p in sorted((base / "optimum").iterdir())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
