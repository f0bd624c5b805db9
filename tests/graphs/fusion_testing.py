"""Helpers for the graph tests: tiny traced models and a numpy decode loop over any runner.

Parameters are perturbed away from transformers' init (LayerNorm weights 1, biases 0) so the graph looks like a
trained checkpoint's: no zero bias folded away, no identical initializers merged.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (config class, model class, config kwargs). Every architecture of exporter.presets has a case.
TINY = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_head=4, n_embd=32)),
    "gpt2-n_inner": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_head=4, n_embd=32, n_inner=48)),
    "gptj-partial-rotary": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_head=4, n_embd=64, rotary_dim=8)),
    "gptj-full-rotary": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_head=4, n_embd=64, rotary_dim=16)),
}
VOCAB, POSITIONS = 100, 64


class Traced:
    """One tiny model: the torch module, its facts, and the unfused / fused graphs as serialized ONNX."""

    def __init__(self, name: str):
        import onnx_ir as ir
        import torch
        import transformers

        from gptexport.exporter.presets import ARCHITECTURES
        from gptexport.exporter.trace import trace
        from gptexport.graphs.pipeline import fuse

        config_class, model_class, kwargs = TINY[name]
        config = getattr(transformers, config_class)(vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=0,
                                                     eos_token_id=0, **kwargs)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        self.model = getattr(transformers, model_class)(config).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        self.architecture = ARCHITECTURES[config_class].name
        self.facts = ARCHITECTURES[config_class].facts(config)
        graph = trace(self.model, self.facts)
        self.unfused = ir.to_proto(graph).SerializeToString()
        self.report = fuse(graph, self.architecture, self.facts)
        self.fused_model = graph
        self.fused = ir.to_proto(graph).SerializeToString()


class G:
    """A tiny graph builder: g.op("Mul", "a", "b") -> output name; constants become initializers."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs, self.n = [], [], [], [], 0

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, array):
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(array), f"c{self.n}"))
        return f"c{self.n}"

    def op(self, op_type, *inputs, out=None, **attrs):
        self.n += 1
        out = out or f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self.n}", **attrs))
        return out

    def ops(self, op_type, *inputs, outputs: int, **attrs) -> list[str]:
        """A node of several outputs (Split): their names."""
        self.n += 1
        outs = [f"t{self.n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self.n}", **attrs))
        return outs

    def model(self, *outputs) -> ir.Model:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def positions(mask: np.ndarray, new: int) -> np.ndarray:
    """position_ids of the last `new` slots: cumsum(mask) - 1, pads 0 (docs/ARTIFACT.md)."""
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 0
    return pos[:, mask.shape[1] - new:]


def empty_past(facts: dict, batch: int) -> list[np.ndarray]:
    shape = (batch, facts["num_heads"], 0, facts["head_size"])
    return [np.zeros(shape, np.float32) for _ in range(2 * facts["num_layers"])]


def feeds(facts: dict, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> dict:
    from gptexport.exporter.trace import input_names

    values = [ids, mask, positions(mask, ids.shape[1]), *past]
    return dict(zip(input_names(facts["num_layers"]), values))


def torch_runner(model):
    """feeds -> [logits, *presents] through transformers, same interface as an onnxruntime session."""
    import torch

    from gptexport.exporter.trace import FlatDecoder

    wrapper = FlatDecoder(model).eval()

    def run(f: dict) -> list[np.ndarray]:
        names = list(f)
        with torch.no_grad():
            out = wrapper(*(torch.from_numpy(f[n]) for n in names))
        return [t.numpy() for t in out]

    return run


def ort_runner(model_bytes: bytes):
    sess = session(model_bytes)
    return lambda f: sess.run(None, f)


def greedy(run, facts: dict, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decode: prefill with an empty past, then one token per step feeding presents back as pasts."""
    past = empty_past(facts, ids.shape[0])
    tokens = []
    for _ in range(steps):
        logits, *past = run(feeds(facts, ids, mask, past))
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        tokens.append(ids[:, 0])
    return np.stack(tokens, axis=1)  # (B, steps)
