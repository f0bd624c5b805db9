"""The fusion pipeline: rules in order, cleanup, a count per rule, and the counts each architecture must reach.

    fuse(model, "gpt2", facts) -> FusionReport(counts={"rotary": 0, "attention": 12, ...}, rejections={...})
    shortfalls(report, expected_counts("gpt2", facts)) -> ["attention: 11/12 fused; first rejection: ..."]

The exporter records the counts in the manifest and, with --strict, refuses an artifact that falls short.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common

from .fusion import RULES
from .fusion._match import MS_DOMAIN, RuleResult
from .fusion.matmul_3d import drop_identity_reshapes


@dataclass
class FusionReport:
    """counts: rule -> rewrites made; rejections: rule -> one reason per candidate that did not fuse."""

    counts: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, list[str]] = field(default_factory=dict)


def expected_counts(architecture: str, facts: dict) -> dict[str, int]:
    """The exact count every rule must reach on a graph traced by exporter/trace.py.

    Args:
        architecture: "gpt2" or "gptj" (exporter.presets.Architecture.name).
        facts: the architecture facts; only num_layers is read.
    Returns:
        rule name -> count.
    Raises:
        ValueError: an architecture this pipeline does not know.
    """
    layers = facts["num_layers"]
    if architecture == "gpt2":
        # ln_1 of layer 0 (wte + wpe), ln_2 of every layer, ln_1 of layers 1.. and ln_f all read a sum.
        # matmul_3d: c_attn, attn c_proj, c_fc, mlp c_proj (Conv1D = addmm on a flattened activation).
        return {"matmul_3d": 4 * layers, "rotary": 0, "attention": layers, "skip_layernorm": 2 * layers + 1,
                "gelu": layers}
    if architecture == "gptj":
        # GPT-J: attention and MLP both read ln_1(x); ln_1 of layer 0 reads the embedding alone (no sum), the
        # ln_1 of layers 1.. and ln_f read x + attn + mlp. Rotary: q and k of every layer.
        # nn.Linear traces as MatMul on the 3-D activation already: no matmul_3d rewrite.
        return {"matmul_3d": 0, "rotary": 2 * layers, "attention": layers, "skip_layernorm": layers,
                "gelu": layers}
    raise ValueError(f"no fusion counts for architecture {architecture!r}; known: gpt2, gptj")


def fuse(model: ir.Model, architecture: str, facts: dict) -> FusionReport:
    """Apply every fusion rule in order (rotary before attention), then remove what became unused.

    Args:
        model: the traced graph, changed in place.
        architecture: "gpt2" or "gptj"; recorded for expected_counts (the rules themselves are generic).
        facts: the architecture facts.
    Returns:
        FusionReport with a count and the rejection reasons per rule.
    """
    report = FusionReport()
    for name, rule in RULES:
        result = RuleResult()
        rule(model, result)
        report.counts[name] = result.count
        report.rejections[name] = result.rejections
    _cleanup(model)
    return report


def _cleanup(model: ir.Model) -> None:
    drop_identity_reshapes(model)  # matmul_3d's Reshape of the attention context, now (B, T, D) already
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
              common.TopologicalSortPass()):
        p(model)
    if any(n.domain == MS_DOMAIN for n in model.graph):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    unique_node_names(model)


def unique_node_names(model: ir.Model) -> int:
    """Suffix repeated node and value names (onnxruntime refuses a graph that repeats either); returns the renamed.

    Graphs traced by exporter/trace.py have hierarchical names, so the rules' names are unique there; a graph from
    elsewhere (an adopted Optimum export, flat TorchScript names) can make two rewrites pick the same name.
    """
    graph = model.graph
    nodes: set[str] = set()
    values: set[str] = {v.name for v in graph.inputs} | set(graph.initializers)
    renamed = 0

    def fresh(name: str, taken: set[str]) -> str:
        k = 1
        while f"{name}_{k}" in taken:
            k += 1
        return f"{name}_{k}"

    for node in graph:
        if node.name and node.name in nodes:
            node.name, renamed = fresh(node.name, nodes), renamed + 1
        nodes.add(node.name)
        for value in node.outputs:
            if value.name and value.name in values and value not in graph.outputs:
                value.name, renamed = fresh(value.name, values), renamed + 1
            values.add(value.name)
    return renamed


def shortfalls(report: FusionReport, expected: dict[str, int]) -> list[str]:
    """One line per rule whose count differs from the expected one, naming it and its first rejection."""
    lines = []
    for name, want in expected.items():
        got = report.counts.get(name, 0)
        if got != want:
            reasons = report.rejections.get(name) or ["no candidate found"]
            lines.append(f"{name}: {got}/{want} fused; first rejection: {reasons[0]}")
    return lines
