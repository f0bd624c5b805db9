"""int8 / int4 quality and speed on a trained checkpoint, ours next to onnxruntime's stock quantizer, one table.

    nice -n 10 python bench/quant_bench.py [--preset gpt2-bench | --checkpoint DIR] [--work DIR] [--blocks 32 64 128]

The checkpoint is exported once in fp32 (fused, the exporter's default graph) and once in fp16. Every quantized
row starts from that fp32 graph, so the rows differ only in their quantization:

    ours      graphs/precision (symmetric MatMulNBits; scale search weighted by calibration activations gathered by
              exporter/calibrate.py; the lm_head at 8 bits), calibrated on the fp32 model's own samples (the
              export default) or on the checkpoint's calibration.txt
    ours-rtn  the same kernel, round-to-nearest scales, every MatMul at the row's bits (what the stock tool does)
    gptq      GPTQ (graphs/precision/gptq.py) with the Hessians of the same calibration tokens
    lm_head fp32   the tied lm_head left in float32, as the stock tool leaves GPT-2's (its B is a Transpose): the
              artifact size of the stock rows on GPT-2, so these compare at equal bits, block and size
    all 4-bit every MatMul at 4 bits, the lm_head too, as the stock tool quantizes GPT-J's untied lm_head: the
              equal-size row on GPT-J
    ort-rtn   onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer, symmetric, accuracy_level 4
              (it skips the tied lm_head, whose B is a Transpose: that MatMul stays fp32)
    dynamic   int8 DynamicQuantizeMatMul (activations per tensor), the int8 of earlier releases

Quality: runtime.perplexity (sliding window) on the checkpoint's held-out text against the fp32 artifact: held-out
perplexity and its change, mean and p99 KL(fp32 || row), top-1 agreement. Size: the artifact's files. Speed:
greedy decode tokens/s through the runtime at batch 1 and 8, median of --repeats runs in this process (the machine
may be shared: quote whole-process A/B pairs for speed claims).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _export(checkpoint: str, out: Path, dtype: str) -> Path:
    from gptexport.exporter.build import ExportOptions, export

    if not (out / "manifest.json").is_file():
        export(ExportOptions(model=checkpoint, output=str(out), dtype=dtype, force=True, validate=False))
    return out


def _write_variant(fp32: Path, out: Path, model, dtype: str, quantization: dict) -> Path:
    """A copy of the fp32 artifact with another graph: manifest dtype, passes and checksums rewritten."""
    import onnx_ir as ir

    from gptexport.runtime.manifest import checksum_files

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(fp32 / "tokenizer.json", out / "tokenizer.json")
    proto = model if hasattr(model, "SerializeToString") else ir.to_proto(model)
    with open(out / "model.onnx", "wb") as f:
        f.write(proto.SerializeToString())
    manifest = json.loads((fp32 / "manifest.json").read_text())
    manifest["dtype"] = dtype
    manifest["passes"]["quantization"] = quantization
    manifest["files"] = checksum_files(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _ours(fp32: Path, out: Path, bits: int, block: int, method: str, importance, keep_8bit, kernel="nbits",
          hessians=None, keep_float=(), rescore=0):
    import onnx_ir as ir

    from gptexport.graphs.precision import NBitsSummary, quantize_int4, quantize_int8
    from gptexport.graphs.rescore import find_tied_lm_head, rescore_top_k

    model = ir.load(str(fp32 / "model.onnx"))
    head = find_tied_lm_head(model) if rescore else None  # before the lm_head is quantized
    summary = NBitsSummary()
    if bits == 4:
        quantize_int4(model, block_size=block, method=method, importance=importance, keep_8bit=keep_8bit,
                      summary=summary, hessians=hessians, keep_float=keep_float)
    else:
        quantize_int8(model, kernel=kernel, block_size=block, method=method, importance=importance, summary=summary,
                      hessians=hessians, keep_float=keep_float)
    if head is not None:
        rescore_top_k(model, head, rescore)
    return _write_variant(fp32, out, model, f"int{bits}", {"bench": True, "rescore_top_k": rescore,
                                                           **summary.record()})


def _ort(fp32: Path, out: Path, bits: int, block: int):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), algo_config=config)
    quantizer.process()
    return _write_variant(fp32, out, quantizer.model.model, f"int{bits}", {"bench": "onnxruntime stock"})


def _speed(artifact: Path, prompt: str, new_tokens: int, repeats: int) -> tuple[float, float]:
    from gptexport import runtime

    model = runtime.load(str(artifact))
    out = []
    for batch in (1, 8):
        prompts = [prompt] * batch
        model.generate(prompts, max_new_tokens=4, min_new_tokens=4)  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            rates.append(batch * new_tokens / (time.perf_counter() - start))
        out.append(statistics.median(rates))
    return out[0], out[1]


def _size(artifact: Path) -> float:
    return sum(p.stat().st_size for p in artifact.iterdir() if p.name.startswith("model.onnx")) / 1e6


def _default_rows(rows: dict, fp32: Path, work: Path, block: int, importance, hessians) -> None:
    """The rows a block-size default is judged on: the export's int4/int8 defaults and the stock quantizer."""
    rows[f"int4 ours gptq b{block}"] = _ours(fp32, work / f"int4-gptq-b{block}", 4, block, "gptq", importance,
                                             ("lm_head",), hessians=hessians)
    rows[f"int4 ours gptq lm_head fp32 b{block}"] = _ours(fp32, work / f"int4-gptq-lmf-b{block}", 4, block, "gptq",
                                                          importance, (), hessians=hessians, keep_float=("lm_head",))
    rows[f"int4 ours gptq all 4-bit b{block}"] = _ours(fp32, work / f"int4-gptq-all4-b{block}", 4, block, "gptq",
                                                       importance, (), hessians=hessians)
    rows[f"int4 ort-rtn b{block}"] = _ort(fp32, work / f"int4-ort-b{block}", 4, block)
    rows[f"int8 ours gptq b{block}"] = _ours(fp32, work / f"int8-gptq-b{block}", 8, block, "gptq", importance, (),
                                             hessians=hessians)
    rows[f"int8 ort-rtn b{block}"] = _ort(fp32, work / f"int8-ort-b{block}", 8, block)
    _int8_equal_size_rows(rows, fp32, work, block, importance, hessians)


def _int8_equal_size_rows(rows: dict, fp32: Path, work: Path, block: int, importance, hessians) -> None:
    """int8 at equal size both ways: ours with the lm_head fp32 (the stock tool's size on GPT-2, whose tied lm_head it
    leaves fp32), and the stock math (our RTN) with the lm_head at 8 bits (our default's size)."""
    rows[f"int8 ours gptq lm_head fp32 b{block}"] = _ours(fp32, work / f"int8-gptq-lmf-b{block}", 8, block, "gptq",
                                                          importance, (), hessians=hessians, keep_float=("lm_head",))
    rows[f"int8 ours-rtn b{block}"] = _ours(fp32, work / f"int8-ours-rtn-b{block}", 8, block, "rtn", None, ())


def _int8_rows(fp32: Path, work: Path, block: int, importance, hessians) -> dict:
    """The int8 kernels on the same calibration: MatMulNBits (per token and block of K), token (MatMulIntegerToFloat,
    activations per token, weights per column) and dynamic (DynamicQuantizeMatMul, activations per tensor)."""
    rows = {f"int8 nbits gptq b{block}": _ours(fp32, work / f"int8-gptq-b{block}", 8, block, "gptq", importance, (),
                                               hessians=hessians)}
    for method in ("gptq", "search", "rtn"):
        rows[f"int8 token {method}"] = _ours(fp32, work / f"int8-token-{method}", 8, block, method, importance, (),
                                             "token", hessians=hessians if method == "gptq" else None)
    rows["int8 token gptq lm_head fp32"] = _ours(fp32, work / "int8-token-gptq-lmf", 8, block, "gptq", importance, (),
                                                 "token", hessians=hessians, keep_float=("lm_head",))
    rows["int8 dynamic"] = _ours(fp32, work / "int8-dynamic", 8, 32, "rtn", None, (), "dynamic")
    return rows


def _rescore_rows(fp32: Path, work: Path, importance, hessians, ks=(8, 16, 32)) -> dict:
    """graphs/rescore.py (a tied lm_head's top-k logits recomputed in float32) on the int8 kernels and int4's
    default, each beside the same quantization without it."""
    rows = {}
    for kernel in ("nbits", "token", "hybrid"):
        for k in (0, *ks) if kernel == "nbits" else (0, 16):
            rows[f"int8 {kernel} gptq b32 rescore {k}"] = _ours(fp32, work / f"int8-{kernel}-gptq-r{k}", 8, 32, "gptq",
                                                                importance, (), kernel, hessians=hessians, rescore=k)
    for k in (0, 16):
        rows[f"int4 gptq b128 rescore {k}"] = _ours(fp32, work / f"int4-gptq-b128-r{k}", 4, 128, "gptq", importance,
                                                    ("lm_head",), hessians=hessians, rescore=k)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-bench", help="a tests/trained.py preset (trained when missing)")
    parser.add_argument("--checkpoint", help="a trained checkpoint dir with heldout.txt (instead of --preset)")
    parser.add_argument("--work", default="/tmp/gptexport-quant-bench")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--chars", type=int, default=30000, help="held-out characters scored")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="quality only (speed: whole-process A/B pairs)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--rescore-k", type=int, nargs="+", default=[8, 16, 32],
                        help="--rows rescore: the top-k sizes of the nbits rows (beside k 0: no rescoring)")
    parser.add_argument("--rows", default="all", choices=["all", "int4", "default", "int8", "rescore"],
                        help="'all'; 'int4': the int4 rows and the peers they are judged against only; 'default': the "
                             "export's defaults (int4 and int8 GPTQ), their equal-size variants and the stock rows; "
                             "'int8': the int8 kernels side by side (nbits, token, dynamic) at --blocks' first size; "
                             "'rescore': the int8 kernels and int4 with and without the tied lm_head's rescoring")
    args = parser.parse_args()

    from gptexport.exporter.calibrate import activation_statistics, calibration_tokens
    from gptexport.exporter.load import load
    from gptexport.runtime.perplexity import perplexity

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        import trained

        checkpoint = trained.checkpoint(args.preset, log=lambda line: print(f"[train] {line}", flush=True))
    heldout = (checkpoint / "heldout.txt").read_text(encoding="utf-8")[:args.chars]
    work = Path(args.work) / checkpoint.name
    work.mkdir(parents=True, exist_ok=True)
    fp32 = _export(str(checkpoint), work / "fp32", "float32")
    rows = {"fp32": fp32, "fp16": _export(str(checkpoint), work / "fp16", "float16")}

    loaded = load(str(checkpoint))  # the torch model: calibration statistics, exactly as the exporter gathers them
    importance, hessians = {}, {}
    for source in ("self", "file"):
        files = () if source == "self" else (str(checkpoint / "calibration.txt"),)
        tokens, record = calibration_tokens(loaded, files)
        importance[source], hessians[source] = activation_statistics(loaded, tokens, hessians=True)
        print(f"calibration {source}: {record}", flush=True)

    lm8, lm_float = ("lm_head",), ("lm_head",)
    if args.rows == "rescore":
        rows.update(_rescore_rows(fp32, work, importance["self"], hessians["self"], tuple(args.rescore_k)))
    if args.rows == "int8":
        rows.update(_int8_rows(fp32, work, args.blocks[0], importance["self"], hessians["self"]))
    for block in args.blocks if args.rows not in ("int8", "rescore") else ():
        if args.rows == "default":
            _default_rows(rows, fp32, work, block, importance["self"], hessians["self"])
            continue
        rows[f"int4 ours gptq b{block}"] = _ours(fp32, work / f"int4-gptq-b{block}", 4, block, "gptq",
                                                 importance["self"], lm8, hessians=hessians["self"])
        rows[f"int4 ours gptq calib.txt b{block}"] = _ours(fp32, work / f"int4-gptq-file-b{block}", 4, block, "gptq",
                                                           importance["file"], lm8, hessians=hessians["file"])
        rows[f"int4 ours gptq lm_head fp32 b{block}"] = _ours(
            fp32, work / f"int4-gptq-lmf-b{block}", 4, block, "gptq", importance["self"], (),
            hessians=hessians["self"], keep_float=lm_float)
        rows[f"int4 ours gptq all 4-bit b{block}"] = _ours(fp32, work / f"int4-gptq-all4-b{block}", 4, block, "gptq",
                                                       importance["self"], (), hessians=hessians["self"])
        rows[f"int4 ours search lm_head fp32 b{block}"] = _ours(
            fp32, work / f"int4-search-lmf-b{block}", 4, block, "search", importance["self"], (), keep_float=lm_float)
        rows[f"int4 ours b{block}"] = _ours(fp32, work / f"int4-ours-b{block}", 4, block, "search",
                                            importance["self"], ("lm_head",))
        rows[f"int4 ort-rtn b{block}"] = _ort(fp32, work / f"int4-ort-b{block}", 4, block)
        if args.rows == "int4":
            continue
        rows[f"int8 ours b{block}"] = _ours(fp32, work / f"int8-ours-b{block}", 8, block, "search",
                                            importance["self"], ())
        rows[f"int8 ort-rtn b{block}"] = _ort(fp32, work / f"int8-ort-b{block}", 8, block)
        rows[f"int4 ours calib.txt b{block}"] = _ours(fp32, work / f"int4-ours-file-b{block}", 4, block, "search",
                                                      importance["file"], ("lm_head",))
        rows[f"int4 ours no-calib b{block}"] = _ours(fp32, work / f"int4-ours-nocal-b{block}", 4, block, "search",
                                                     None, ("lm_head",))
        rows[f"int4 ours-rtn b{block}"] = _ours(fp32, work / f"int4-ours-rtn-b{block}", 4, block, "rtn", None, ())
        rows[f"int4 ours-rtn+lm_head8 b{block}"] = _ours(fp32, work / f"int4-ours-rtn8-b{block}", 4, block, "rtn",
                                                         None, ("lm_head",))
        rows[f"int8 ours gptq b{block}"] = _ours(fp32, work / f"int8-gptq-b{block}", 8, block, "gptq",
                                                 importance["self"], (), hessians=hessians["self"])
        _int8_equal_size_rows(rows, fp32, work, block, importance["self"], hessians["self"])
    if args.rows == "all":
        rows["int8 dynamic (earlier int8)"] = _ours(fp32, work / "int8-dynamic", 8, 32, "rtn", None, (),
                                                    "dynamic")

    tokenizer = loaded.tokenizer
    prompt = tokenizer.decode(tokenizer.encode(heldout).ids[:32])  # batch 8 x (32 + new tokens) within the positions
    results = []
    for name, artifact in rows.items():
        kw = dict(window=args.window, stride=args.window // 2)
        r = perplexity(str(artifact), heldout, reference=None if name == "fp32" else str(fp32), **kw)
        b1, b8 = (float("nan"),) * 2 if args.no_speed else _speed(artifact, prompt, args.new_tokens, args.repeats)
        kl = r.kl or {"mean": 0.0, "p99": 0.0, "top1_agreement": 1.0, "reference_perplexity": r.perplexity}
        results.append({"row": name, "perplexity": r.perplexity, "tokens": r.tokens,
                        "change_pct": 100 * (r.perplexity / kl["reference_perplexity"] - 1),
                        "mean_kl": kl["mean"], "p99_kl": kl["p99"], "top1": kl["top1_agreement"],
                        "size_mb": _size(artifact), "b1_tps": b1, "b8_tps": b8})
        x = results[-1]
        print(f"{name}: ppl {x['perplexity']:.3f} kl {x['mean_kl']:.2e} top1 {x['top1']:.4f}", flush=True)

    report_file = checkpoint / "train_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    s = report.get("settings", {})
    print(f"\n{checkpoint.name}: {s.get('architecture', '?')} {s.get('n_layer', '?')} layers, width "
          f"{s.get('n_embd', '?')}, held-out {results[0]['tokens']} tokens scored (window {args.window}, stride "
          f"{args.window // 2}); speed: greedy {args.new_tokens} new tokens, median of {args.repeats}, "
          f"{os.cpu_count()} cores")
    print("| row | perplexity | change | mean KL | p99 KL | top-1 | size MB | b1 tok/s | b8 tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in results:
        print(f"| {x['row']} | {x['perplexity']:.3f} | {x['change_pct']:+.2f} % | {x['mean_kl']:.2e} | "
              f"{x['p99_kl']:.2e} | {100 * x['top1']:.2f} % | {x['size_mb']:.1f} | {x['b1_tps']:.0f} | "
              f"{x['b8_tps']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
