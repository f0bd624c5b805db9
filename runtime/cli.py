"""`gptrun`: generate text from an artifact, or describe one. Thin commands over runtime's public API.

Every error a user can cause (bad artifact, bad argument, click usage error) is one line on stderr,
`gptrun: error: ...`, with exit code 2 and no traceback.
"""

import os
import sys
from pathlib import Path

import click

from .errors import GptexportError
from .manifest import read_manifest
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
@click.option("--stats", is_flag=True, help="Print prefill time and tokens/s to stderr.")
def generate_cmd(artifact, prompt, stream, provider, stats, stop, **settings):
    """Print the continuation of PROMPT by the model in ARTIFACT."""
    model = load(artifact, provider=provider)
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
def info_cmd(artifact, verify):
    """Describe the artifact in ARTIFACT from its manifest."""
    for line in summarize(read_manifest(artifact, verify=verify)):
        click.echo(line)


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
