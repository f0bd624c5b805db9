"""Small GPT-2 / GPT-J checkpoints trained here on real offline text, for quality measurements.

Random weights hide what trained ones show (their top logits are about 1e-2 apart), and no weights can be
downloaded, so the project trains its own: the real GPT-2 tokenizer and vocabulary, on text every machine with
this Python has (the Python documentation's help topics in `pydoc_data.topics`, and the standard library's own
sources), with a held-out split by document.

    checkpoint("gpt2-ci")   -> Path of a normal HF checkpoint dir (model.safetensors, config.json, tokenizer.json)
                               plus heldout.txt, calibration.txt and train_report.json

Each preset is cached under $GPTEXPORT_CACHE_DIR/trained/<preset>-<hash>, the hash covering the settings, the
content of every data file read, the trainer's version and the torch / transformers / tokenizers versions; a
second process waiting on the same preset takes the first one's result (file lock). The CI presets train in a
minute or two on two cores; the bench presets take up to about half an hour (bench/train_checkpoint.py).

Training cost is dominated by the 50257-way output layer (and the optimizer over the embedding). Most steps
therefore train a compact copy whose vocabulary is only the tokens that occur in the training text (a token never
seen could only be pushed down); its rows are then copied into the full-vocabulary model, tokens never seen
starting from the rarest seen tokens' rows, and the last `full_steps` train that full model with the full softmax.
Every figure reported (held-out perplexity) is the full-vocabulary model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

TRAINER_VERSION = 2
HELDOUT_EVERY = 10  # one document in ten (by a hash of its name) is held out
HELDOUT_CHARS = 60_000
CALIBRATION_CHARS = 20_000
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    architecture: str  # "gpt2" or "gptj"
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int  # also n_positions: every position the model has is trained
    batch: int
    steps: int  # of which the last `full_steps` use the full vocabulary
    full_steps: int
    train_tokens: int  # size of the training stream (tokens), read document by document
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    rotary_dim: int = 0  # GPT-J only


PRESETS = {
    # CI: a minute or two on two free cores (much longer when the machine is shared)
    "gpt2-ci": TrainSettings("gpt2", n_layer=2, n_embd=128, n_head=4, seq_len=128, batch=8, steps=120,
                             full_steps=10, train_tokens=300_000),
    "gptj-ci": TrainSettings("gptj", n_layer=2, n_embd=128, n_head=4, seq_len=128, batch=8, steps=120,
                             full_steps=10, train_tokens=300_000, rotary_dim=16),
    # benchmarks: up to about half an hour each on two free cores
    "gpt2-bench": TrainSettings("gpt2", n_layer=4, n_embd=256, n_head=4, seq_len=128, batch=8, steps=600,
                                full_steps=20, train_tokens=2_000_000, lr=2e-3, warmup=30),
    "gptj-bench": TrainSettings("gptj", n_layer=4, n_embd=256, n_head=4, seq_len=128, batch=8, steps=600,
                                full_steps=20, train_tokens=2_000_000, lr=2e-3, warmup=30, rotary_dim=32),
}


# ---- the text ------------------------------------------------------------------------------------------------------

def _documents() -> list[tuple[str, str, str]]:
    """(name, text, source file) of every document: each help topic of the Python docs, each stdlib module."""
    import pydoc_data.topics as topics

    docs = [(f"pydoc:{key}", text, topics.__file__) for key, text in sorted(topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts) and path.name != "topics.py":
            docs.append((f"stdlib:{rel.as_posix()}", path.read_text(encoding="utf-8", errors="replace"), str(path)))
    return docs


def _held_out(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (name, text), each in a seeded order mixing prose and code."""
    train, held = [], []
    for name, text, _ in _documents():
        (held if _held_out(name) else train).append((name, text))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _data_digest() -> str:
    digest = hashlib.sha256()
    for name, text, _ in _documents():
        digest.update(name.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()


def settings_hash(settings: TrainSettings) -> str:
    """Hash of everything a trained checkpoint depends on: settings, data, trainer and library versions."""
    import tokenizers
    import torch
    import transformers

    key = {"settings": dataclasses.asdict(settings), "data": _data_digest(), "trainer": TRAINER_VERSION,
           "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _take(docs, tokenizer, limit_tokens: int, eos: int):
    """Token stream of whole documents, separated by <|endoftext|>, up to `limit_tokens`."""
    import numpy as np

    ids: list[int] = []
    for _, text in docs:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eos)
        if len(ids) >= limit_tokens:
            break
    return np.asarray(ids[:limit_tokens], dtype=np.int64)


def _text_prefix(docs, chars: int) -> str:
    """Whole documents joined by blank lines up to `chars` characters (the last one cut)."""
    out, size = [], 0
    for _, text in docs:
        out.append(text)
        size += len(text) + 2
        if size >= chars:
            break
    return "\n\n".join(out)[:chars]


# ---- the model -----------------------------------------------------------------------------------------------------

def _model(settings: TrainSettings, vocab_size: int | None = None, eos: int = 50256):
    """A freshly initialised model of `settings` (with `vocab_size` rows instead of the tokenizer's: compact)."""
    import transformers

    common = dict(n_layer=settings.n_layer, n_embd=settings.n_embd, n_head=settings.n_head,
                  n_positions=settings.seq_len, bos_token_id=eos, eos_token_id=eos)
    if settings.architecture == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**common, vocab_size=vocab_size or 50257))
    if settings.architecture == "gptj":
        config = transformers.GPTJConfig(**common, rotary_dim=settings.rotary_dim, vocab_size=vocab_size or 50400,
                                         tie_word_embeddings=False)
        return transformers.GPTJForCausalLM(config)
    raise ValueError(f"unknown architecture {settings.architecture!r}; choose gpt2 or gptj")


def _loss(model, ids):
    """Next-token cross entropy of ids (B, T+1), in float32."""
    import torch.nn.functional as F

    logits = model(input_ids=ids[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _lr(settings: TrainSettings, step: int) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def perplexity(model, ids, window: int) -> float:
    """Perplexity of a token stream in non-overlapping windows (full vocabulary)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.as_tensor(ids[start:start + window + 1])[None]
            if chunk.shape[1] < 2:
                break
            total += float(_loss(model, chunk)) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(total / count)


@contextlib.contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _expand(compact, full, seen, counts) -> None:
    """Copy the compact model into the full one: row i of each vocabulary tensor goes to token seen[i]; a token
    never seen starts where the rarest seen tokens ended (the mean of their rows), so it starts unlikely."""
    import torch

    rare = torch.as_tensor(counts <= max(1, int(counts.min())))
    state = compact.state_dict()
    vocab_rows = compact.config.vocab_size
    with torch.no_grad():
        for name, target in full.state_dict().items():
            source = state[name]
            if source.shape == target.shape:
                target.copy_(source)
                continue
            assert source.shape[0] == vocab_rows, name  # wte, lm_head weight / bias: (V, ...) -> (V_full, ...)
            target.copy_(source[rare].mean(0).expand_as(target))
            target[torch.as_tensor(seen)] = source


def _run_steps(model, settings, stream, steps: range, rng, log, phase: str, start: float) -> list:
    """AdamW over `steps` of the schedule on random windows of `stream`; returns the losses."""
    import numpy as np
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=settings.lr, betas=(0.9, 0.95), fused=True)
    model.train()
    losses = []
    for step in steps:
        starts = rng.integers(0, len(stream) - settings.seq_len - 1, settings.batch)
        batch = torch.as_tensor(np.stack([stream[s:s + settings.seq_len + 1] for s in starts]))  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = _lr(settings, step)
        loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps[-1]:
            log(f"step {step}/{settings.steps} loss {np.mean(losses[-50:]):.3f} ({phase}, "
                f"{time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses


def train(settings: TrainSettings, output: Path, log=print) -> dict:
    """Train `settings` from scratch and save the checkpoint dir into `output` (which must exist).

    Most steps train a compact copy whose vocabulary is the tokens of the training text (same layers; the output
    layer and the optimizer then cost a fraction); the last `full_steps` train the full-vocabulary model.

    Returns:
        the training report (also written as train_report.json).
    """
    import numpy as np
    import torch

    from gptexport.exporter.tokenizer import gpt2_tokenizer

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = _model(settings)
    tokenizer = gpt2_tokenizer(model.config.vocab_size)
    eos = model.config.eos_token_id
    train_docs, held_docs = split(settings.seed)
    stream = _take(train_docs, tokenizer, settings.train_tokens, eos)
    held_text = _text_prefix(held_docs, HELDOUT_CHARS)
    held_ids = np.asarray(tokenizer.encode(held_text).ids, dtype=np.int64)
    seen, counts = np.unique(stream, return_counts=True)
    log(f"{len(stream)} training tokens ({len(seen)} distinct), {len(held_ids)} held-out tokens")
    rng = np.random.default_rng(settings.seed)
    compact = _model(settings, vocab_size=len(seen), eos=int(np.searchsorted(seen, eos)))
    first = range(settings.steps - settings.full_steps)
    losses = _run_steps(compact, settings, np.searchsorted(seen, stream), first, rng, log, "compact vocab", start)
    _expand(compact, model, seen, counts)
    last = range(len(first), settings.steps)
    losses += _run_steps(model, settings, stream, last, rng, log, "full vocab", start)
    eval_ids = held_ids[: 16 * settings.seq_len]
    report = {"settings": dataclasses.asdict(settings), "train_tokens": int(len(stream)),
              "distinct_train_tokens": int(len(seen)), "heldout_tokens_scored": int(len(eval_ids)),
              "heldout_perplexity": perplexity(model, eval_ids, settings.seq_len),
              "final_train_loss": float(np.mean(losses[-20:])), "train_seconds": round(time.perf_counter() - start),
              "sample": _sample(model, tokenizer, held_text, eos)}
    model.save_pretrained(str(output))
    tokenizer.save(str(output / "tokenizer.json"))
    (output / "heldout.txt").write_text(held_text, encoding="utf-8")
    (output / "calibration.txt").write_text(_text_prefix(train_docs, CALIBRATION_CHARS), encoding="utf-8")
    (output / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _sample(model, tokenizer, held_text: str, eos: int, new_tokens: int = 40) -> dict:
    """A greedy continuation of the start of the held-out text, to see whether it is text or a loop."""
    import torch

    prompt = held_text[:200]
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=eos)
    return {"prompt": prompt, "greedy_continuation": tokenizer.decode(out[0, ids.shape[1]:].tolist())}


# ---- the cache -----------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("GPTEXPORT_CACHE_DIR", Path.home() / ".cache" / "gptexport")) / "trained"


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checkpoint(preset: str, threads: int = 2, log=None, force: bool = False) -> Path:
    """The trained checkpoint dir of PRESETS[preset], training it (into the cache) when it is not there yet.

    Args:
        preset: a key of PRESETS.
        threads: torch threads while training (the machine is shared).
        log: callback for progress lines; silent by default.
        force: train again even when cached.
    Raises:
        KeyError: an unknown preset, naming the known ones.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown trained preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{preset}-{settings_hash(settings)}"
    with _lock(root / f"{target.name}.lock"):
        if (target / "train_report.json").is_file() and not force:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
        try:
            with _threads(threads):
                train(settings, staging, log=log or (lambda line: None))
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def report(path: Path) -> dict:
    """The train_report.json of a trained checkpoint dir."""
    return json.loads((Path(path) / "train_report.json").read_text(encoding="utf-8"))
