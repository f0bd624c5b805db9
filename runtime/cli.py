"""`gptrun`: generate text from an artifact, serve it over HTTP, or describe one. Thin commands over runtime's
public API.

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


def _version() -> str:
    from gptexport import __version__

    return __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="gptrun", message="%(prog)s (gptexport) %(version)s")
def cli():
    """Run gptexport artifacts with numpy + onnxruntime (no torch)."""


@cli.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the artifact's generation default.")
@click.option("--min-new-tokens", type=int, default=0, show_default=True)
@click.option("--do-sample/--greedy", default=None,
              help="Sample, or decode greedily. Default, and for the four settings below: the checkpoint's "
                   "generation_config.json as the artifact carries it, else transformers' defaults (greedy, "
                   "temperature 1, top-k 50, top-p 1, repetition penalty 1).")
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None, help="0 disables.")
@click.option("--top-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
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
@click.option("--prompt-lookup", is_flag=True,
              help="Speculative decoding with drafts from the text itself (n-grams of the prompt and output): the "
                   "same output, faster when the output repeats the input.")
@click.option("--draft", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Speculative decoding with a smaller artifact with the same tokenizer as the draft model.")
@click.option("--speculative-tokens", "num_speculative_tokens", type=int, default=None,
              help="With --prompt-lookup or --draft: drafts per round at most (default 10 with --prompt-lookup, 5 "
                   "with --draft; fewer while rejected).")
def generate_cmd(artifact, prompt, stream, provider, threads, manifest_sha256, stats, stop, prompt_lookup, draft,
                 **settings):
    """Print the continuation of PROMPT by the model in ARTIFACT."""
    if prompt_lookup and draft is not None:
        raise click.UsageError("--prompt-lookup and --draft exclude each other: choose one draft source")
    model = load(artifact, provider=provider, threads=threads, manifest_sha256=manifest_sha256)
    settings["stop"] = list(stop) or None
    settings["speculative"] = "prompt_lookup" if prompt_lookup else draft
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
        if settings["speculative"] is not None:
            click.echo(f"speculative: {s.accepted} of {s.drafted} drafted tokens accepted "
                       f"({100 * s.acceptance_rate:.1f} %)", err=True)


@cli.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--model-name", default=None, help="Name clients pass as `model` (default: the artifact's directory name).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="KV cache slots: sequences decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Sequences that may wait for a slot; past that, 429.")
@click.option("--context", type=click.IntRange(2, None), default=None,
              help="Positions per slot, prompt + max_tokens (default: the model's; lower it to shrink the cache).")
@click.option("--api-key", envvar="GPTEXPORT_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1 (or set GPTEXPORT_API_KEY, or --api-key-file).")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Read the key from this file.")
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="onnxruntime threads (default: the usable cores).")
@click.option("--spin-threads", is_flag=True, help="Let onnxruntime's idle threads spin between runs (default: they "
              "sleep, leaving the cores to the HTTP loop and other processes; spinning can help on an idle machine).")
@click.option("--request-timeout", type=click.FloatRange(0, None, min_open=True), default=600.0, show_default=True,
              help="Seconds a request may take, queue included.")
@click.option("--drain-timeout", type=click.FloatRange(0, None), default=30.0, show_default=True,
              help="On SIGTERM, seconds to finish the requests in flight.")
@click.option("--cors-origin", multiple=True, help="Allow this browser origin (repeatable; default: no CORS).")
@click.option("--max-body-bytes", type=click.IntRange(1, None), default=1 << 20, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--manifest-sha256", "manifest_sha256", default=None, metavar="HEX",
              help="Refuse the artifact unless its manifest.json has this sha256 (every replica, with --ray).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve as Ray Serve replicas behind Ray's HTTP proxy "
              "(needs the `ray` extra).")
@click.option("--replicas", type=click.IntRange(1, 1024), default=None, help="With --ray: replicas (default 1).")
@click.option("--replica-cpus", type=click.FloatRange(0, None, min_open=True), default=None,
              help="With --ray: CPUs Ray reserves per replica (default 1); --threads defaults to it.")
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None, show_envvar=True,
              help="With --ray: join this cluster instead of starting a local Ray instance.")
def serve_cmd(artifact, host, port, model_name, api_key, api_key_file, cors_origin, use_ray, replicas,
              replica_cpus, ray_address, **settings):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (needs the `serve` extra; --ray: the `ray` extra)."""
    if not use_ray:
        given = [name for name, value in (("--replicas", replicas), ("--replica-cpus", replica_cpus)) if value]
        if given:
            raise GptexportError(f"{', '.join(given)} can only be used with --ray")
    try:
        from .serve import ServeConfig, serve
    except ImportError as e:
        raise GptexportError(f"gptrun serve needs the serve extra ({e.name} is missing): "
                             "pip install 'gptexport[serve]'") from None
    load_manifest(artifact, verify="size")  # a wrong directory fails here, in one line, before listening
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise GptexportError(f"cannot read --api-key-file {api_key_file}: {e}") from None
        if not api_key:
            raise GptexportError(f"--api-key-file {api_key_file} is empty")
    if api_key is not None and not api_key.strip():
        raise GptexportError("the API key is empty; pass a non-empty --api-key or none")
    config = ServeConfig(artifact=str(artifact), model_name=model_name or Path(artifact).resolve().name,
                         api_key=api_key, cors_origins=list(cors_origin), **settings)
    if use_ray:
        return _serve_ray(config, host, port, replicas or 1, replica_cpus or 1, ray_address, api_key_file)
    try:
        return serve(config, host, port)
    except OSError as e:
        raise GptexportError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _serve_ray(config, host, port, replicas, replica_cpus, address, api_key_file) -> int:
    try:
        from .serve import ray_app
    except ImportError as e:
        raise GptexportError(f"gptrun serve --ray needs the ray extra ({e.name} is missing): "
                             "pip install 'gptexport[ray]'") from None
    key_file = str(api_key_file.resolve()) if api_key_file is not None else None  # read on each replica's node
    return ray_app.run(config, host, port, replicas, replica_cpus, address, api_key_file=key_file)


@cli.command("info")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify", type=click.Choice(["auto", "full", "size"]), default="size", show_default=True)
@click.option("--manifest-sha256", "manifest_sha256", default=None, metavar="HEX",
              help="Refuse the artifact unless its manifest.json has this sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as one JSON object.")
def info_cmd(artifact, verify, manifest_sha256, as_json):
    """Describe the artifact in ARTIFACT from its manifest."""
    import json

    manifest, digest = load_manifest(artifact, verify=verify, manifest_sha256=manifest_sha256)
    if as_json:
        click.echo(json.dumps(dict(describe(manifest), manifest_sha256=digest), indent=2))
        return
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
                  f"KL divergence (reference || model), nats per token: mean {kl['mean']:.3g}, median "
                  f"{kl['median']:.3g}, p99 {kl['p99']:.3g}, p99.9 {kl['p99_9']:.3g}, max {kl['max']:.3g}",
                  f"top-1 agreement: {kl['top1_agreement'] * 100:.2f} %"]
    return lines


OPTIMUM_FILES = ("config.json", "generation_config.json")  # what Optimum's ORTModelForCausalLM reads beside the graph


def describe(manifest: dict) -> dict:
    """The facts `gptrun info` shows, as data (`--json` prints this; the text form renders it).

    Args:
        manifest: a verified manifest.
    Returns:
        {"model", "format_version", "producer", "config", "dtype", "kv_dtype", "kv_layout", "passes", "fused",
         "validation", "optimum_loadable", "files"}; validation keeps its scalar figures, files map name -> bytes.
    """
    model, passes = manifest.get("model", {}), manifest.get("passes", {})
    layout = manifest.get("kv_layout", "concat")
    return {
        "model": {k: model.get(k) for k in ("name", "architecture", "source", "random_weights")},
        "task": manifest.get("task") or "text-generation",  # runtime/heads.py serves the others
        "labels": manifest.get("labels"),
        "format_version": manifest["format_version"],
        "producer": manifest.get("producer", {}),
        "config": manifest["config"],
        "dtype": manifest["dtype"],
        "kv_dtype": manifest["kv_dtype"],
        "kv_layout": layout,
        "passes": dict(passes.get("counts", {})),
        "fused": bool(passes.get("fused")),
        "validation": {k: v for k, v in manifest.get("validation", {}).items() if not isinstance(v, (list, dict))},
        # the default graph with Optimum's config files loads in ORTModelForCausalLM; the in-place one cannot
        "optimum_loadable": layout == "concat" and all(f in manifest["files"] for f in OPTIMUM_FILES)
        and (manifest.get("task") or "text-generation") == "text-generation",
        "files": {name: entry["size"] for name, entry in manifest["files"].items()},
    }


def summarize(manifest: dict) -> list:
    """Human-readable lines for `gptrun info` (the facts of `describe`).

    Args:
        manifest: a verified manifest.
    Returns:
        Lines of text.
    """
    facts = describe(manifest)
    model, config, validation = facts["model"], facts["config"], facts["validation"]
    if facts["optimum_loadable"]:
        optimum = "loadable (ORTModelForCausalLM.from_pretrained)"
    elif facts["kv_layout"] != "concat":
        optimum = "not loadable (the in-place shared_buffer graph is gptexport's own)"
    else:
        optimum = f"not loadable (no {' / '.join(f for f in OPTIMUM_FILES if f not in facts['files'])})"
    lines = [
        f"model:        {model['name']} ({model['architecture']}, source {model['source']}"
        + (", random weights" if model["random_weights"] else "") + ")",
        f"task:         {facts['task']}" + (f" (labels: {', '.join(facts['labels'].values())})"
                                             if facts["labels"] else ""),
        f"format:       {facts['format_version']} (producer {facts['producer'].get('version')})",
        f"shape:        {config['num_layers']} layers, {config['num_heads']} heads x {config['head_size']}, "
        f"hidden {config.get('hidden_size')}, vocab {config['vocab_size']}, {config['max_positions']} positions"
        + (f", rotary_dim {config['rotary_dim']}" if config.get("rotary_dim") else ""),
        f"dtype:        {facts['dtype']} (kv {facts['kv_dtype']})",
        "kv layout:    " + ("shared_buffer (in-place: one preallocated buffer per request, written by the graph)"
                            if facts["kv_layout"] == "shared_buffer" else "concat (past + new each step)"),
        "passes:       " + (", ".join(f"{k}={v}" for k, v in facts["passes"].items()) or "none")
        + ("" if facts["fused"] else " (not fused)"),
        "validation:   " + (", ".join(f"{k}={v}" for k, v in validation.items()) or "none"),
        f"optimum:      {optimum}",
        "files:",
    ]
    lines += [f"  {name:<24} {_size(size):>10}" for name, size in facts["files"].items()]
    return lines


from .heads_cli import register  # noqa: E402 - embed, classify, tag, answer, choose (runtime/heads.py)

register(cli)


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
