"""Tiny random GPT-2 / GPT-J configs for parity tests, saved as real checkpoint directories, and transformers'
`generate` on a left-padded batch as the reference the runtime is compared with."""

from __future__ import annotations

# Every registered architecture has at least one tiny case here (tests/test_export.py checks that).
TINY_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)),
    "gpt2-n_inner": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, n_inner=96)),
    "gptj-partial-rotary": ("GPTJConfig", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, rotary_dim=8,
                                               vocab_size=50400, tie_word_embeddings=False)),
    "gptj-full-rotary": ("GPTJConfig", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, rotary_dim=16,
                                            vocab_size=50400, tie_word_embeddings=False)),
}
MODEL_CLASSES = {"GPT2Config": "GPT2LMHeadModel", "GPTJConfig": "GPTJForCausalLM"}


def make_checkpoint(directory, name: str, seed: int = 0):
    """Save a tiny random checkpoint of TINY_CONFIGS[name] into `directory` and return the torch model."""
    import torch
    import transformers

    from gptexport.exporter.tokenizer import gpt2_tokenizer

    config_class, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, config_class)(**{"bos_token_id": 50256, "eos_token_id": 50256, **kwargs})
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[config_class])(config).eval()
    model.save_pretrained(str(directory))
    gpt2_tokenizer(config.vocab_size).save(str(directory / "tokenizer.json"))
    return model


PAD = 50256  # GPT-2's <|endoftext|>: pad and default eos of every tiny checkpoint


def hf_generate(model, tokenizer, prompts: list[str], eos: int = PAD, **kwargs) -> list[list[int]]:
    """transformers' generate (no sampling) on a left-padded batch; the new ids per row (ended rows padded)."""
    import torch

    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                             eos_token_id=eos, **kwargs)
    return [row[width:].tolist() for row in out]


def hf_greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens, exactly `new_tokens` per row."""
    return hf_generate(model, tokenizer, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
