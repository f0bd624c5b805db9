"""The tasks beyond text generation, torch-free: embed, classify, tag, answer, choose (numpy + onnxruntime).

    texts -> tokenize -> left-pad (B, T) -> one forward of the task's graph -> numpy -> labels / spans / vectors

The artifact's manifest names its task (exporter/tasks.py); each function refuses an artifact of another task in
one line, and `runtime.load` (text generation) refuses these. The graph computes position ids from the mask, so a
row of a padded batch gets what it gets alone.

Question answering follows transformers 4.x's question-answering pipeline (removed in transformers 5): the
question's tokens then the context's (the GPT-2 tokenizer adds no special tokens), softmax of the start and of
the end logits over the window's context tokens, the span (s, e) of context tokens with s <= e < s +
max_answer_len maximising p_start[s] * p_end[e]; a context longer than the window is cut into windows that overlap
by `doc_stride` tokens, and the best span over all windows wins.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import ArtifactError, GenerationError
from .manifest import load_manifest, manifest_digest
from .session import (MODEL_FILE, TOKENIZER_FILE, check_cuda_placement, check_threads, create_session,
                      open_artifact_files)

TEXT_GENERATION = "text-generation"
# which function serves which task, for the one-line refusals
FUNCTIONS = {"feature-extraction": "embed", "text-classification": "classify", "token-classification": "tag",
             "question-answering": "answer", "multiple-choice": "choose", TEXT_GENERATION: "generate"}
POOLINGS = ("last", "mean")
MAX_BATCH_SIZE = 32  # texts run as one batch; a longer list runs as several
QA_MAX_SEQ_LEN, QA_DOC_STRIDE = 384, 128  # transformers' question-answering pipeline defaults


class InputError(GenerationError):
    """Bad input to a task function (empty text, no choices, a question without context, too long)."""


def task_of(manifest: dict) -> str:
    """The manifest's task; a manifest written before tasks existed is text-generation."""
    return manifest.get("task") or TEXT_GENERATION


def refuse_task(manifest: dict, directory, wanted: str) -> None:
    """Raise ArtifactError when the artifact's task is not `wanted`, naming the function that serves it."""
    have = task_of(manifest)
    if have == wanted:
        return
    use = FUNCTIONS.get(have, "?")
    how = "runtime.load(...).generate / gptrun generate" if have == TEXT_GENERATION else \
        f"runtime.{use} / gptrun {use}"
    raise ArtifactError(f"{directory} is a {have} artifact, not {wanted} (runtime.{FUNCTIONS[wanted]}); use {how}, "
                        f"or export with --task {wanted}")


@dataclass
class HeadModel:
    """A loaded artifact of a task other than text generation: manifest, tokenizer, session."""

    manifest: dict
    tokenizer: Tokenizer
    session: object
    directory: Path
    manifest_sha256: str | None = None

    @property
    def task(self) -> str:
        return task_of(self.manifest)

    @property
    def labels(self) -> list[str]:
        mapping = self.manifest.get("labels") or {}
        return [mapping[str(i)] for i in range(len(mapping))]

    @property
    def max_positions(self) -> int:
        return self.manifest["config"]["max_positions"]

    @property
    def pad_id(self) -> int:
        """The id left padding uses: the config's pad id (what classification pooling skips), else eos, else 0."""
        pad = self.manifest.get("pad_token_id")
        eos = self.manifest["special_tokens"].get("eos_token_id")
        return pad if pad is not None else (eos if eos is not None else 0)

    def encode(self, text, what: str = "text") -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of one non-empty text."""
        if not isinstance(text, str):
            raise InputError(f"{what} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{what} is not valid UTF-8 text (lone surrogate at index {e.start})") from None
        encoding = self.tokenizer.encode(text) if text else None
        if encoding is None or not encoding.ids:
            raise InputError(f"{what} is empty: give some text")
        return list(encoding.ids), list(encoding.offsets)

    def check_length(self, ids: list[int], what: str) -> None:
        if len(ids) > self.max_positions:
            raise InputError(f"{what} has {len(ids)} tokens; the model takes at most {self.max_positions}")

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) int64 ids and mask, left-padded with `pad_id`."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        return ids, mask

    def run(self, feeds: dict) -> dict:
        """The graph's outputs by name, as float32 (a float16 graph's too)."""
        names = [o.name for o in self.session.get_outputs()]
        try:
            outputs = self.session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own classes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"onnxruntime failed on {self.directory}: {first}") from None
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, outputs)}

    def forward(self, rows: list[list[int]]) -> tuple[dict, np.ndarray]:
        """One left-padded batch of token rows: (outputs, mask (B, T))."""
        ids, mask = self.pad(rows)
        return self.run({"input_ids": ids, "attention_mask": mask}), mask


def _texts(texts, what: str = "texts") -> tuple[list, bool]:
    """(list of texts, whether one str was given)."""
    if isinstance(texts, str):
        return [texts], True
    if not isinstance(texts, (list, tuple)) or any(not isinstance(t, str) for t in texts):
        raise InputError(f"{what} must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise InputError(f"{what} is an empty list: give at least one text")
    return list(texts), False


def _encode_all(model: HeadModel, texts: list[str], single: bool) -> list:
    out = []
    for i, text in enumerate(texts):
        what = "text" if single else f"text {i} of the list"
        ids, offsets = model.encode(text, what)
        model.check_length(ids, what)
        out.append((ids, offsets))
    return out


def _batches(items: list, size: int = MAX_BATCH_SIZE):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """A token's character span without its leading whitespace (GPT-2 tokens carry the space before a word)."""
    while start < end and text[start].isspace():
        start += 1
    return start, end


# ---- the tasks ------------------------------------------------------------------------------------------------

def embed_with(model: HeadModel, texts, pooling: str = "last") -> np.ndarray:
    """`embed` on a loaded model."""
    refuse_task(model.manifest, model.directory, "feature-extraction")
    if pooling not in POOLINGS:
        raise InputError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    texts, single = _texts(texts)
    return embed_rows(model, [ids for ids, _ in _encode_all(model, texts, single)], pooling)


def embed_rows(model: HeadModel, rows: list[list[int]], pooling: str = "last") -> np.ndarray:
    """Embeddings (len(rows), hidden) float32 of token rows (checked by the caller), in batches."""
    out = np.zeros((len(rows), model.manifest["config"]["hidden_size"]), dtype=np.float32)
    for start, part in _batches(rows):
        outputs, mask = model.forward(part)
        hidden = outputs["last_hidden_state"]  # (B, T, D)
        if pooling == "last":  # left-padded: every row's last token is the last position
            out[start:start + len(part)] = hidden[:, -1]
        else:
            weights = mask[..., None].astype(np.float32)
            out[start:start + len(part)] = (hidden * weights).sum(1) / weights.sum(1)
    return out


def classify_with(model: HeadModel, texts):
    """`classify` on a loaded model."""
    refuse_task(model.manifest, model.directory, "text-classification")
    texts, single = _texts(texts)
    results = classify_rows(model, [ids for ids, _ in _encode_all(model, texts, single)])
    return results[0] if single else results


def classify_rows(model: HeadModel, rows: list[list[int]]) -> list[dict]:
    """Per token row {"label", "score", "scores"}, in batches."""
    labels, results = model.labels, []
    for _, part in _batches(rows):
        probs = _softmax(model.forward(part)[0]["logits"])  # (B, L)
        for row in probs:
            best = int(row.argmax())
            results.append({"label": labels[best], "score": float(row[best]),
                            "scores": {label: float(p) for label, p in zip(labels, row)}})
    return results


def tag_with(model: HeadModel, text: str) -> list[dict]:
    """`tag` on a loaded model."""
    refuse_task(model.manifest, model.directory, "token-classification")
    ids, offsets = model.encode(text)
    model.check_length(ids, "text")
    probs = _softmax(model.forward([ids])[0]["logits"][0])  # (T, L)
    labels, out = model.labels, []
    for i, (row, (start, end)) in enumerate(zip(probs, offsets)):
        start, end = _trim(text, start, end)
        best = int(row.argmax())
        out.append({"index": i, "token": text[start:end], "label": labels[best], "score": float(row[best]),
                    "start": start, "end": end})
    return out


def qa_windows(n_context: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
    """[start, end) of each window of context tokens: `room` tokens each, consecutive ones overlapping by
    `doc_stride` (what transformers' tokenizers do with stride and return_overflowing_tokens)."""
    if n_context <= room:
        return [(0, n_context)]
    step, spans, start = room - doc_stride, [], 0
    while True:
        spans.append((start, min(start + room, n_context)))
        if start + room >= n_context:
            return spans
        start += step


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, max_answer_len: int) -> tuple[int, int, float]:
    """The pipeline's rule on one window's context logits (n,): softmax each, then argmax of p_s[s] * p_e[e] over
    s <= e < s + max_answer_len. Returns (s, e, score)."""
    p_start, p_end = _softmax(start_logits), _softmax(end_logits)
    scores = np.triu(np.tril(np.outer(p_start, p_end), max_answer_len - 1))  # (n, n): e >= s, e - s < len
    s, e = np.unravel_index(int(scores.argmax()), scores.shape)
    return int(s), int(e), float(scores[s, e])


def answer_with(model: HeadModel, question: str, context: str, max_answer_len: int = 15,
                doc_stride: int = QA_DOC_STRIDE, max_seq_len: int | None = None) -> dict:
    """`answer` on a loaded model."""
    refuse_task(model.manifest, model.directory, "question-answering")
    if context is None or (isinstance(context, str) and not context.strip()):
        raise InputError("question without context: give the context to find the answer in")
    q_ids, _ = model.encode(question, "question")
    c_ids, c_offsets = model.encode(context, "context")
    for name, value, low in (("max_answer_len", max_answer_len, 1), ("doc_stride", doc_stride, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    max_seq_len = min(QA_MAX_SEQ_LEN, model.max_positions) if max_seq_len is None else max_seq_len
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len > model.max_positions:
        raise InputError(f"max_seq_len must be an integer <= the model's {model.max_positions} positions, got "
                         f"{max_seq_len!r}")
    room = max_seq_len - len(q_ids)
    if room < 1:
        raise InputError(f"question has {len(q_ids)} tokens: no room for context in a window of {max_seq_len} "
                         f"tokens")
    if len(c_ids) > room and doc_stride >= room:
        raise InputError(f"doc_stride {doc_stride} must be below the {room} context tokens of a window (window "
                         f"{max_seq_len} minus the question's {len(q_ids)})")
    windows = qa_windows(len(c_ids), room, doc_stride)
    best = None
    for _, part in _batches(windows):
        rows = [q_ids + c_ids[a:b] for a, b in part]
        outputs, _ = model.forward(rows)
        width = outputs["start_logits"].shape[1]
        for k, (a, b) in enumerate(part):
            first = width - (b - a)  # left-padded: the context is the row's last b - a positions
            s, e, score = best_span(outputs["start_logits"][k, first:], outputs["end_logits"][k, first:],
                                    max_answer_len)
            if best is None or score > best[2]:
                best = (a + s, a + e, score)
    s, e, score = best
    start, end = _trim(context, c_offsets[s][0], c_offsets[e][1])
    return {"answer": context[start:end], "start": start, "end": end, "score": score}


def choose_with(model: HeadModel, prompt: str, choices) -> dict:
    """`choose` on a loaded model."""
    refuse_task(model.manifest, model.directory, "multiple-choice")
    p_ids, _ = model.encode(prompt, "prompt")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise InputError("choices is empty: give a list of at least one choice (str)")
    rows = []
    for i, choice in enumerate(choices):
        ids = p_ids + model.encode(choice, f"choice {i}")[0]
        model.check_length(ids, f"prompt + choice {i}")
        rows.append(ids)
    ids, mask = model.pad(rows)
    last = np.full((1, len(rows)), ids.shape[1] - 1, dtype=np.int64)  # left-padded: each row ends at T - 1
    outputs = model.run({"input_ids": ids[None], "attention_mask": mask[None], "mc_token_ids": last})
    probs = _softmax(outputs["mc_logits"][0])  # (C,)
    best = int(probs.argmax())
    return {"choice": choices[best], "index": best, "score": float(probs[best]),
            "scores": [float(p) for p in probs]}


# ---- loading ----------------------------------------------------------------------------------------------------

def load_head(artifact_dir, provider: str = "cpu", verify: str = "auto", manifest: dict | None = None,
              threads=None, manifest_sha256: str | None = None) -> HeadModel:
    """Verify and load an artifact of a task other than text generation (see runtime.load for the arguments).

    Raises:
        ArtifactError: incomplete, modified, not loadable, or a text-generation artifact.
        ProviderError: see runtime.load.
    """
    if isinstance(artifact_dir, bytes):
        artifact_dir = os.fsdecode(artifact_dir)
    if not isinstance(artifact_dir, (str, os.PathLike)):
        raise ArtifactError(f"artifact_dir must be a path, got {type(artifact_dir).__name__}")
    directory = Path(artifact_dir)
    check_threads(threads)
    manifest, digest = load_manifest(directory, verify=verify, manifest=manifest, manifest_sha256=manifest_sha256,
                                     deferred=(MODEL_FILE, TOKENIZER_FILE))
    if task_of(manifest) == TEXT_GENERATION:
        raise ArtifactError(f"{directory} is a text-generation artifact: use runtime.load(...).generate / gptrun "
                            f"generate (embed, classify, tag, answer and choose need an export with --task)")
    if provider == "cuda":
        check_cuda_placement(manifest, directory)
    tokenizer, session = open_artifact_files(directory, manifest, verify, provider, threads, create_session)
    return HeadModel(manifest, tokenizer, session, directory, digest)


class _Cache:
    """Loaded head models by (realpath, provider, threads, sha256 of manifest.json); the least recent dropped."""

    def __init__(self, size: int = 4):
        self.size, self.models, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, artifact_dir, provider="cpu", threads=None, manifest_sha256=None) -> HeadModel:
        if isinstance(artifact_dir, HeadModel):
            return artifact_dir
        if not isinstance(artifact_dir, (str, bytes, os.PathLike)):
            raise ArtifactError(f"artifact_dir must be a path, got {type(artifact_dir).__name__}")
        key = (os.path.realpath(artifact_dir), provider, threads, manifest_digest(artifact_dir))
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
        model = load_head(artifact_dir, provider=provider, threads=threads, manifest_sha256=manifest_sha256)
        with self.lock:
            self.models[key] = model
            while len(self.models) > self.size:
                self.models.popitem(last=False)
        return model


_CACHE = _Cache()


def embed(artifact_dir, texts, pooling: str = "last", provider: str = "cpu", threads=None) -> np.ndarray:
    """Embeddings of texts from a feature-extraction artifact.

    Args:
        artifact_dir: the artifact directory (or a HeadModel from `load_head`).
        texts: a str or a list of str.
        pooling: "last" (the last token's hidden state: a causal model's whole-text summary) or "mean" (the mean
            over the text's tokens).
    Returns:
        float32 array (len(texts), hidden_size).
    Raises:
        InputError: an empty text or list, a text longer than the model's positions, an unknown pooling.
        ArtifactError: not a feature-extraction artifact (and see `load_head`).
    """
    return embed_with(_CACHE.get(artifact_dir, provider, threads), texts, pooling)


def classify(artifact_dir, texts, provider: str = "cpu", threads=None):
    """Labels of texts from a text-classification artifact.

    Returns:
        per text {"label", "score", "scores": {label: probability}} (a list for a list, one dict for a str).
    Raises:
        InputError, ArtifactError: as `embed`.
    """
    return classify_with(_CACHE.get(artifact_dir, provider, threads), texts)


def tag(artifact_dir, text: str, provider: str = "cpu", threads=None) -> list[dict]:
    """One label per token of `text` from a token-classification artifact.

    Returns:
        per token {"index", "token", "label", "score", "start", "end"}: `token` is text[start:end], the token's
        characters without the space before it.
    Raises:
        InputError, ArtifactError: as `embed`.
    """
    return tag_with(_CACHE.get(artifact_dir, provider, threads), text)


def answer(artifact_dir, question: str, context: str, max_answer_len: int = 15, doc_stride: int = QA_DOC_STRIDE,
           max_seq_len: int | None = None, provider: str = "cpu", threads=None) -> dict:
    """The answer to `question` in `context` from a question-answering artifact (the module docstring's rule).

    Args:
        max_answer_len: the longest answer in tokens.
        doc_stride: tokens consecutive windows of a long context share.
        max_seq_len: tokens per window, question included (default min(384, the model's positions)).
    Returns:
        {"answer": context[start:end], "start", "end" (character offsets into context), "score": p_start x p_end}.
    Raises:
        InputError: empty question, no context, a question that leaves no room for context, a doc_stride not
            below the window's context tokens.
        ArtifactError: as `embed`.
    """
    return answer_with(_CACHE.get(artifact_dir, provider, threads), question, context, max_answer_len, doc_stride,
                       max_seq_len)


def choose(artifact_dir, prompt: str, choices, provider: str = "cpu", threads=None) -> dict:
    """The best of `choices` after `prompt` from a multiple-choice (double heads) artifact.

    Each choice's tokens follow the prompt's (give choices their leading space, " Paris"); the multiple-choice
    head reads each row's last token.

    Returns:
        {"choice", "index", "score", "scores": [probability per choice]}.
    Raises:
        InputError: empty prompt, choices or choice; too long.
        ArtifactError: as `embed`.
    """
    return choose_with(_CACHE.get(artifact_dir, provider, threads), prompt, choices)
