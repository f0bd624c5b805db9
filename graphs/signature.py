"""A graph's inputs and outputs as the manifest lists them (docs/ARTIFACT.md): name, dtype name, shape.

Shared by the exporter (every artifact) and graphs/shared_kv.py (the variant rewrites the inputs), so that the
manifest always describes the graph it ships with, in one spelling.
"""

from __future__ import annotations

import onnx_ir as ir

DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
               ir.DataType.INT32: "int32"}


def io_spec(values) -> list[dict]:
    """Manifest entries for graph inputs or outputs.

    Args:
        values: onnx_ir values (graph.inputs or graph.outputs).
    Returns:
        [{"name", "dtype", "shape"}], symbolic dims as their names.
    Raises:
        KeyError: a dtype the artifact contract does not use.
    """
    return [{"name": v.name, "dtype": DTYPE_NAMES[v.dtype],
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape]} for v in values]
