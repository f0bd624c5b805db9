"""`gptrun embed | classify | tag | answer | choose`: the tasks of runtime/heads.py on the command line, as JSON.

Thin commands: arguments in, `runtime.heads` does the work, one JSON document out on stdout. Errors are
runtime/cli.py's: one line, exit code 2.
"""

import json
from pathlib import Path

import click

from . import heads
from .errors import GptexportError

_ARTIFACT = click.argument("artifact", type=click.Path(path_type=Path))
_PROVIDER = click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
_THREADS = click.option("--threads", type=click.IntRange(1, 1024), default=None,
                        help="onnxruntime threads (default: the usable cores).")


def _load(artifact, provider, threads, manifest_sha256=None) -> heads.HeadModel:
    return heads.load_head(artifact, provider=provider, threads=threads, manifest_sha256=manifest_sha256)


def _echo(data) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptexportError(f"cannot read {what} {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None


@click.command("embed")
@_ARTIFACT
@click.argument("texts", nargs=-1, required=True)
@click.option("--pooling", type=click.Choice(heads.POOLINGS), default="last", show_default=True,
              help="last: the last token's hidden state; mean: the mean over the text's tokens.")
@_PROVIDER
@_THREADS
def embed_cmd(artifact, texts, pooling, provider, threads):
    """Print the embedding of each TEXT (a feature-extraction artifact) as JSON."""
    vectors = heads.embed_with(_load(artifact, provider, threads), list(texts), pooling)
    _echo({"pooling": pooling, "dimensions": int(vectors.shape[1]), "embeddings": vectors.tolist()})


@click.command("classify")
@_ARTIFACT
@click.argument("texts", nargs=-1, required=True)
@_PROVIDER
@_THREADS
def classify_cmd(artifact, texts, provider, threads):
    """Print the label of each TEXT (a text-classification artifact) with all labels' probabilities, as JSON."""
    _echo(heads.classify_with(_load(artifact, provider, threads), list(texts)))


@click.command("tag")
@_ARTIFACT
@click.argument("text")
@_PROVIDER
@_THREADS
def tag_cmd(artifact, text, provider, threads):
    """Print a label per token of TEXT (a token-classification artifact) with character offsets, as JSON."""
    _echo(heads.tag_with(_load(artifact, provider, threads), text))


@click.command("answer")
@_ARTIFACT
@click.argument("question")
@click.argument("context", required=False)
@click.option("--context-file", type=click.Path(path_type=Path), default=None, help="Read the context from a file.")
@click.option("--max-answer-len", type=int, default=15, show_default=True, help="Longest answer, in tokens.")
@click.option("--doc-stride", type=int, default=heads.QA_DOC_STRIDE, show_default=True,
              help="Tokens consecutive windows of a long context share.")
@click.option("--max-seq-len", type=int, default=None,
              help=f"Tokens per window, question included (default: {heads.QA_MAX_SEQ_LEN} or the model's positions).")
@_PROVIDER
@_THREADS
def answer_cmd(artifact, question, context, context_file, max_answer_len, doc_stride, max_seq_len, provider,
               threads):
    """Print the answer to QUESTION found in CONTEXT (a question-answering artifact) as JSON."""
    if context is not None and context_file is not None:
        raise GptexportError("give the context as an argument or with --context-file, not both")
    if context_file is not None:
        context = _read(context_file, "--context-file")
    _echo(heads.answer_with(_load(artifact, provider, threads), question, context, max_answer_len, doc_stride,
                            max_seq_len))


@click.command("choose")
@_ARTIFACT
@click.argument("prompt")
@click.argument("choices", nargs=-1)
@_PROVIDER
@_THREADS
def choose_cmd(artifact, prompt, choices, provider, threads):
    """Print which of CHOICES best follows PROMPT (a multiple-choice artifact), as JSON."""
    _echo(heads.choose_with(_load(artifact, provider, threads), prompt, list(choices)))


def register(group: click.Group) -> None:
    """Add the task commands to gptrun's group."""
    for command in (embed_cmd, classify_cmd, tag_cmd, answer_cmd, choose_cmd):
        group.add_command(command)
