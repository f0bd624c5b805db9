"""`gptrun`: generate text from an artifact, or describe one. Thin commands over runtime's public API.

Every error a user can cause (bad artifact, bad argument, click usage error) is one line on stderr,
`gptrun: error: ...`, with exit code 2 and no traceback.
"""

import os
import sys
from pathlib import Path

import click

from .errors import GptexportError
from .manifest import load_manifest
from .model import load

EXIT_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Run gptexport artifacts with numpy + onnxruntime (no torch)."""


@cli.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the artifact's generation default.")
@click.option("--min-new-tokens", type=int, default=0, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--num-beams", type=int, default=1, show_default=True, help="Beam search when > 1 (no sampling, no --stream).")
@click.option("--length-penalty", type=float, default=1.0, show_default=True, help="Beam search: score / length ** this.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=None,
              help="onnxruntime intra-op threads. Default: the cores this process may run on (CPU affinity and "
                   "cgroup quota).")
@click.option("--manifest-sha256", "manifest_sha256", default=None, metavar="HEX",
              help="Refuse the artifact unless its manifest.json has this sha256 (gptexport prints it).")
@click.option("--stats", is_flag=True, help="Print prefill time and tokens/s to stderr.")
def generate_cmd(artifact, prompt, stream, provider, threads, manifest_sha256, stats, stop, **settings):
    """Print the continuation of PROMPT by the model in ARTIFACT."""
    model = load(artifact, provider=provider, threads=threads, manifest_sha256=manifest_sha256)
    settings["stop"] = list(stop) or None
    if stream:
        for piece in model.stream(prompt, **settings):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    else:
        click.echo(model.generate(prompt, **settings))
    if stats:
        s = model.last_stats
        click.echo(f"prefill: {s.prompt_tokens} tokens in {s.prefill_s * 1000:.1f} ms; decode: {s.new_tokens} "
                   f"tokens, {s.decode_tokens_per_s:.1f} tokens/s", err=True)


@cli.command("info")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify", type=click.Choice(["auto", "full", "size"]), default="size", show_default=True)
@click.option("--manifest-sha256", "manifest_sha256", default=None, metavar="HEX",
              help="Refuse the artifact unless its manifest.json has this sha256.")
def info_cmd(artifact, verify, manifest_sha256):
    """Describe the artifact in ARTIFACT from its manifest."""
    manifest, digest = load_manifest(artifact, verify=verify, manifest_sha256=manifest_sha256)
    for line in summarize(manifest):
        click.echo(line)
    click.echo(f"manifest sha256: {digest}")


@cli.command("perplexity")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--window", type=int, default=None, help="Tokens per window. Default: the model's max positions.")
@click.option("--stride", type=int, default=None, help="Tokens a window advances. Default: window // 2.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="An artifact of the same model (e.g. the fp32 export): adds KL divergence and top-1 agreement.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
def perplexity_cmd(artifact, files, window, stride, reference, as_json, provider):
    """Perplexity of ARTIFACT on the text FILES (sliding window), and its KL divergence against --reference."""
    import json

    from .perplexity import EvaluationError, perplexity

    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise EvaluationError(f"cannot read text file {str(path)!r}: {getattr(e, 'strerror', None) or e}") \
                from None
    model = load(artifact, provider=provider)
    ref = load(reference, provider=provider) if reference is not None else None
    result = perplexity(model, texts, window=window, stride=stride, reference=ref, names=[str(f) for f in files])
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for line in perplexity_lines(result, reference):
        click.echo(line)


def perplexity_lines(result, reference=None) -> list:
    """Human-readable lines for `gptrun perplexity`."""
    lines = [f"perplexity: {result.perplexity:.4f} ({result.tokens} tokens scored, window {result.window}, "
             f"stride {result.stride})"]
    if len(result.texts) > 1:
        lines += [f"  {t.name}: {t.perplexity:.4f} ({t.tokens} tokens)" for t in result.texts]
    if result.kl is not None:
        kl = result.kl
        lines += [f"reference:  {reference} perplexity {kl['reference_perplexity']:.4f}, ratio "
                  f"{kl['perplexity_ratio']:.5f} ({(kl['perplexity_ratio'] - 1) * 100:+.3f} %)",
                  f"KL divergence (reference || model), nats per token: mean {kl['mean']:.6f}, median "
                  f"{kl['median']:.6f}, p99 {kl['p99']:.6f}, p99.9 {kl['p99_9']:.6f}, max {kl['max']:.6f}",
                  f"top-1 agreement: {kl['top1_agreement'] * 100:.2f} %"]
    return lines


def summarize(manifest: dict) -> list:
    """Human-readable lines for `gptrun info`.

    Args:
        manifest: a verified manifest.
    Returns:
        Lines of text.
    """
    model, config = manifest.get("model", {}), manifest["config"]
    passes, validation = manifest.get("passes", {}), manifest.get("validation", {})
    lines = [
        f"model:        {model.get('name')} ({model.get('architecture')}, source {model.get('source')}"
        + (", random weights" if model.get("random_weights") else "") + ")",
        f"format:       {manifest['format_version']} (producer {manifest.get('producer', {}).get('version')})",
        f"shape:        {config['num_layers']} layers, {config['num_heads']} heads x {config['head_size']}, "
        f"hidden {config.get('hidden_size')}, vocab {config['vocab_size']}, {config['max_positions']} positions"
        + (f", rotary_dim {config['rotary_dim']}" if config.get("rotary_dim") else ""),
        f"dtype:        {manifest['dtype']} (kv {manifest['kv_dtype']})",
        "kv layout:    " + ("shared_buffer (in-place: one preallocated buffer per request, written by the graph)"
                            if manifest.get("kv_layout") == "shared_buffer" else "concat (past + new each step)"),
        "passes:       " + (", ".join(f"{k}={v}" for k, v in passes.get("counts", {}).items()) or "none")
        + ("" if passes.get("fused") else " (not fused)"),
        "validation:   " + (", ".join(f"{k}={v}" for k, v in validation.items() if not isinstance(v, (list, dict)))
                            or "none"),
        "files:",
    ]
    lines += [f"  {name:<24} {_size(entry['size']):>10}" for name, entry in manifest["files"].items()]
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fail(message: str) -> int:
    click.echo(f"gptrun: error: {message}", err=True)
    return EXIT_ERROR


def main(argv=None) -> int:
    """Console entry point: run the command, turning user errors into one line and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="gptrun", standalone_mode=False)
    except GptexportError as e:
        code = _fail(str(e))
    except click.ClickException as e:
        code = _fail(e.format_message().replace("\n", " "))
    except click.exceptions.Abort:
        code = _fail("aborted")
    except BrokenPipeError:
        code = 0
    except Exception as e:  # noqa: BLE001 - an unattended server gets one line, never a traceback
        if os.environ.get("GPTEXPORT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        code = _fail(f"internal error: {type(e).__name__}: {first} (set GPTEXPORT_DEBUG=1 for a traceback)")
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
