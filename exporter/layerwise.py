"""GPTQ's Hessians gathered block by block, for a model that is never all in memory (a streamed export).

The in-memory export runs the float model once over the calibration tokens and holds every MatMul's (K, K) Hessian
until the save step quantizes it (exporter/calibrate.py). A streamed GPT-J-6B cannot: 28 x (64 MiB + 64 MiB + 1 GiB)
in float32. Here the Hessians are made when the save step asks for them, one at a time, from activations carried
from block to block, as GPTQ's own implementation does:

    tokens (B, T) --embeddings--> X_0 (B*T rows of the hidden size; block 0's inputs, its other arguments kept)
    the save step quantizes a MatMul of block i (graphs/precision/quantize.py, in graph order):
        X_i --block i, weights read as each module runs--> H = mean x x^T of that MatMul's input
             (one H at a time; MatMuls reading the same input, q/k/v/fc_in, share it)
        GPTQ of the MatMul with H (graphs/precision/gptq.py) --> its codes and scales, kept until block i is passed
    the first MatMul of block i+1:
        X_{i+1} = block i (X_i) with each of its MatMuls dequantized from those codes (sequential: the next block is
                  calibrated on what the quantized model will feed it, as GPTQ does); then X_i, H and the codes go
    the lm_head: X_L --ln_f--> H

Resident: the activations (tokens x width, and tokens x 4 x width inside a block: 32 MiB for 512 tokens of
GPT-J-6B), one module's float weights, one Hessian (fc_out's 16384 x 16384 float32: 1 GiB, which gptq.prepare
factors in place) and one block's codes. The cost is block forwards: one per Hessian asked for (a recompute when
the save asks again for an input it has dropped) and one to pass each block on.
"""

from __future__ import annotations

import numpy as np

from gptexport.graphs.precision.gptq import HessianSource

_HOOKED = ("Linear", "Conv1D")  # torch.nn.Linear (GPT-J, lm_head) and transformers' Conv1D (GPT-2)
FLOAT64_MAX_K = 4096  # Hessians up to this K are summed in float64, as exporter/calibrate.py does; larger in float32


class _Stop(Exception):
    """Raised in block 0's pre-hook: the forward has produced block 0's inputs, nothing more is needed."""


class LayerwiseHessians:
    """A mapping from the graph's initializer names to lazy Hessians (graphs/precision/gptq.py HessianSource).

    Args:
        loaded: exporter.load.Loaded: a streamed model (`weights` set: every parameter read from it as its module
            runs) or one in memory.
        tokens: (B, T) calibration ids.
        prefix: what the traced graph puts before a parameter's name (trace.FlatDecoder's `model.`).
        sequential: carry each block's *quantized* outputs to the next block (GPTQ); False carries the float
            model's, which gives the Hessians of exporter/calibrate.py's single float forward.
    """

    RECORD = ("sequential, block by block: each block's Hessians from the calibration tokens carried through the "
              "blocks before it as quantized (exporter/layerwise.py)")

    def __init__(self, loaded, tokens: np.ndarray, prefix: str = "model.", sequential: bool = True):
        from .stream import parameter_aliases

        self.model, self.source, self.sequential = loaded.model, loaded.weights, sequential
        self.tokens = np.ascontiguousarray(tokens)
        self.aliases = parameter_aliases(self.model)
        self.module_names = {id(m): n for n, m in self.model.named_modules()}
        base = self.model.base_model
        self.stages = [list(block.modules()) for block in base.h] + [[base.ln_f, self.model.lm_head]]
        self.blocks = list(base.h)
        self.where: dict[str, tuple[int, object]] = {}  # initializer name -> (stage, module)
        for stage, modules in enumerate(self.stages):
            for module in modules:
                if type(module).__name__ in _HOOKED and getattr(module, "weight", None) is not None:
                    own = f"{self.module_names[id(module)]}.weight"
                    for alias in self.aliases.get(own, [own]):
                        self.where[prefix + alias] = (stage, module)
        self.stage = None  # the stage whose inputs are held
        self.inputs = None  # (args, kwargs) of that stage's forward, its hidden states first
        self.held = None  # (module ids sharing the input, H) of the one Hessian kept
        self.results: dict[int, tuple] = {}  # id(module) -> (packed, scales, bits, block) of the held stage
        self.forwards = 0  # block forwards run (what this costs)

    # ---- the mapping quantize.py reads ----------------------------------------------------------------------------

    def get(self, name: str, default=None):
        entry = self.where.get(name)
        return default if entry is None else _Lazy(self, name, *entry)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    # ---- the work ---------------------------------------------------------------------------------------------------

    def hessian(self, name: str, stage: int, module) -> np.ndarray:
        """(K, K) float32 mean x x^T of `module`'s input over the calibration tokens, the caller's to overwrite."""
        self._reach(stage, name)
        if self.held is not None and id(module) in self.held[0]:
            h = self.held[1]
        else:
            self.held = None  # one Hessian at a time
            group, h = self._collect(stage, module)
            self.held = (group, h)
        if h.shape[0] > FLOAT64_MAX_K:  # too large to keep beside gptq.prepare's work: handed over, not copied
            self.held = None
            return h
        return h.copy()

    def quantized(self, stage: int, module, packed, scales, bits: int, block_size: int) -> None:
        self.results[id(module)] = (packed, scales, bits, block_size)

    def _reach(self, stage: int, name: str) -> None:
        """Hold `stage`'s inputs, passing every earlier stage on (each with its quantized MatMuls)."""
        if self.stage is None:
            self.stage, self.inputs = 0, self._embed()
        if stage < self.stage:
            raise RuntimeError(f"layerwise GPTQ: {name} (block {stage}) was asked for after block {self.stage}'s "
                               f"inputs were computed: the save step must quantize in graph order")
        while self.stage < stage:
            args, kwargs = self.inputs
            out = self._run(self.stage, args, kwargs, quantized=self.sequential)
            self.inputs = ((out, *args[1:]), kwargs)
            self.stage, self.held, self.results = self.stage + 1, None, {}

    def _embed(self):
        """Block 0's (args, kwargs) for the calibration tokens: the model's own forward, stopped at block 0."""
        import torch

        caught = {}

        def catch(module, args, kwargs):
            caught["args"], caught["kwargs"] = args, kwargs
            raise _Stop

        inside = {id(m) for stage in self.stages for m in stage}
        outside = [m for m in self.model.modules() if id(m) not in inside]
        hook = self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        handles = [hook] + self._weights_hooks(outside)
        try:
            with torch.no_grad():
                ids = torch.from_numpy(self.tokens)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return caught["args"], caught["kwargs"]

    def _run(self, stage: int, args, kwargs, quantized: bool = False, hooks=()):
        """One forward of `stage` on its inputs; its MatMuls dequantized from their GPTQ codes where `quantized`."""
        import torch

        self.forwards += 1
        handles = self._weights_hooks(self.stages[stage], self.results if quantized else {}) + list(hooks)
        try:
            with torch.no_grad():
                if stage < len(self.blocks):
                    out = self.blocks[stage](*args, **kwargs)
                    return out[0] if isinstance(out, tuple) else out
                base = self.model.base_model
                return self.model.lm_head(base.ln_f(args[0]))
        finally:
            for h in handles:
                h.remove()

    def _collect(self, stage: int, module) -> tuple[set, np.ndarray]:
        """H of `module`'s input over one forward of `stage`, and every module of the stage that read that very
        tensor (they share H)."""
        import torch

        seen, want, sums = [], {}, {}

        def watch(mod, args):
            x = args[0]
            seen.append((x, mod))  # holding x keeps its id from being reused by a later tensor of this forward
            if mod is module:
                flat = x.detach().reshape(-1, x.shape[-1])  # (tokens, K)
                flat = flat.double() if flat.shape[-1] <= FLOAT64_MAX_K else flat.float()
                sums["outer"] = flat.T @ flat
                sums["count"] = flat.shape[0]
                want["x"] = x

        linears = [m for m in self.stages[stage] if type(m).__name__ in _HOOKED]
        hooks = [m.register_forward_pre_hook(watch) for m in linears]
        args, kwargs = self.inputs
        self._run(stage, args, kwargs, quantized=False, hooks=hooks)
        group = {id(m) for x, m in seen if x is want["x"]}
        h = sums["outer"].div_(max(sums["count"], 1)).float().numpy()  # in place: fc_out's is 1 GiB
        del seen, want, sums
        return group, h

    def _weights_hooks(self, modules, quantized: dict | None = None) -> list:
        """Hooks giving each module real parameters while it runs: from the checkpoint (streamed; in memory the
        model's own), a MatMul's weight from its GPTQ codes where `quantized` has them; dropped after."""
        import torch

        from .stream import checkpoint_name

        quantized = quantized or {}

        def load(module, args):
            saved = []
            for leaf, param in list(module._parameters.items()):
                if param is None:
                    continue
                if leaf == "weight" and id(module) in quantized:
                    value = torch.from_numpy(_dequantized(module, *quantized[id(module)]))
                elif self.source is not None:
                    key = checkpoint_name(f"{self.module_names[id(module)]}.{leaf}".lstrip("."), self.source,
                                          self.aliases)
                    value = torch.from_numpy(self.source.read(key))
                else:
                    continue
                saved.append((leaf, param))
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
            module._gptexport_saved = saved

        def drop(module, args, output):
            # back to its own parameter: streamed, the allocated, never-written one (no resident memory)
            for leaf, param in module.__dict__.pop("_gptexport_saved", []):
                module._parameters[leaf] = param

        handles = []
        for module in modules:
            if any(p is not None for p in module._parameters.values()):
                handles.append(module.register_forward_pre_hook(load))
                handles.append(module.register_forward_hook(drop))
        return handles


def _dequantized(module, packed, scales, bits: int, block_size: int) -> np.ndarray:
    """The module's weight in its own layout from GPTQ's codes: Conv1D (K, N), Linear (N, K)."""
    from gptexport.graphs.precision import nbits

    k = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
    w = nbits.dequantize_blocks(packed, scales, bits, k)  # (K, N)
    return np.ascontiguousarray(w if type(module).__name__ == "Conv1D" else w.T)


class _Lazy(HessianSource):
    """One MatMul's Hessian, made when graphs/precision quantizes it."""

    def __init__(self, owner: LayerwiseHessians, name: str, stage: int, module):
        self.owner, self.name, self.stage, self.module = owner, name, stage, module

    def hessian(self) -> np.ndarray:
        return self.owner.hessian(self.name, self.stage, self.module)

    def quantized(self, packed, scales, bits: int, block_size: int) -> None:
        self.owner.quantized(self.stage, self.module, packed, scales, bits, block_size)
