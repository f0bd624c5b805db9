"""int4 error against depth on random-weight GPT-J, simulated in torch, one block's weights in memory at a time.

Every Linear weight is quantized and dequantized by graphs/precision/nbits (exactly the codes and scales MatMulNBits
holds; the lm_head at 8 bits, as the export keeps it), with the weights the streamed export generates
(exporter/stream.py RandomWeights, seed 0). The fp32 and the quantized model run block by block
(exporter/validate.py StreamedReference); after every block the final LayerNorm and head are applied to both, so one
run gives the KL(fp32 || int4) of the model truncated at every depth 1..L, on the streamed validation's prompts
(what `gptexport gpt-j-6b --int4` is judged on) and on 255 tokens of README.md.

    python bench/int4_depth.py --width 512 --heads 8 --layers 28 --method search

Not simulated: MatMulNBits' int8 activations (accuracy_level 4); at width 512, 2 layers, the real streamed export
measured 0.00203 on the prompts against 0.00202 simulated (BENCHMARKS.md).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from gptexport.exporter import stream
from gptexport.exporter.tokenizer import gpt2_tokenizer
from gptexport.exporter.validate import STREAMED_PROMPTS, StreamedReference
from gptexport.graphs.precision import nbits


class Quantized:
    """A weight source giving each 2-D Linear weight (not the embedding) as MatMulNBits would reconstruct it."""

    def __init__(self, source, bits: int, block: int, method: str):
        self.source, self.bits, self.block, self.method = source, bits, block, method

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def read(self, name):
        w = self.source.read(name)
        if w.ndim != 2 or name.endswith("wte.weight"):
            return w
        bits = 8 if name.startswith("lm_head") else self.bits
        wt = np.ascontiguousarray(w.T)  # (K, N), as the graph's MatMul holds it
        packed, scales = nbits.quantize_blocks(wt, bits, self.block, self.method)
        return np.ascontiguousarray(nbits.dequantize_blocks(packed, scales, bits, wt.shape[0]).T)


def block_outputs(model, source, rows) -> list[list[torch.Tensor]]:
    """Per row, the hidden state (1, T, D) after every block."""
    reference, out = StreamedReference(model, source), []
    caught: list = []
    hooks = [b.register_forward_hook(lambda m, a, o: caught.append((o[0] if isinstance(o, tuple) else o).clone()))
             for b in reference.blocks]
    try:
        for ids in rows:
            caught.clear()
            reference.logits(ids)
            out.append(list(caught))
    finally:
        for hook in hooks:
            hook.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--method", choices=["rtn", "search"], default="search")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = transformers.GPTJConfig(n_embd=args.width, n_head=args.heads, rotary_dim=64, n_layer=args.layers,
                                     n_positions=2048, vocab_size=50400, bos_token_id=50256, eos_token_id=50256,
                                     tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = stream.empty_model(transformers.GPTJForCausalLM, config)
    weights = stream.RandomWeights.for_model(model, seed=0)
    quantized = Quantized(weights, args.bits, args.block, args.method)
    tokenizer = gpt2_tokenizer(50400)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:6000]
    rows = [np.asarray(tokenizer.encode(p).ids, np.int64) for p in STREAMED_PROMPTS]
    rows.append(np.asarray(tokenizer.encode(text).ids[:256], np.int64))
    start = time.time()
    ref, ours = block_outputs(model, weights, rows), block_outputs(model, quantized, rows)
    ln = [torch.from_numpy(weights.read(f"transformer.ln_f.{x}")) for x in ("weight", "bias")]
    bias = torch.from_numpy(weights.read("lm_head.bias"))
    head, qhead = (torch.from_numpy(s.read("lm_head.weight")) for s in (weights, quantized))

    def logp(h, w):  # (T-1, V) log-probabilities of the positions that predict a next token
        z = torch.nn.functional.layer_norm(h[0], (args.width,), ln[0], ln[1], config.layer_norm_epsilon) @ w.T + bias
        return torch.log_softmax(z.double(), -1)[:-1]

    print("| depth | mean KL, prompts | mean KL, README text |\n|---|---|---|")
    for depth in range(args.layers):
        kl = [float((a.exp() * (a - b)).sum(-1).mean()) for a, b in
              ((logp(r[depth], head), logp(o[depth], qhead)) for r, o in zip(ref, ours))]
        prompts = np.average(kl[:-1], weights=[len(r) - 1 for r in rows[:-1]])
        print(f"| {depth + 1} | {prompts:.5f} | {kl[-1]:.5f} |")
    std = float(torch.nn.functional.layer_norm(ref[-1][-1][0], (args.width,), ln[0], ln[1]).matmul(head.T).std(-1)
                .mean())
    print(json.dumps({**vars(args), "logits_std": round(std, 3), "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
