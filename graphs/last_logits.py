"""`logits_to_keep`: an optional input that lets the default graph return the last positions' logits only.

The default (concat) graph returns logits for every position of the step: (B, L, vocab) at prefill, 206 MB per
row for a 1,024-token GPT-2 prompt, when generation reads only the last position. This pass adds the input
transformers' own forward has (`logits_to_keep`: 0 keeps every position, k the last k) and slices lm_head's input
on the sequence axis, so lm_head itself runs on k positions:

```
 hidden (B, L, D) ──Slice(starts=-k, ends=INT64_MAX, axes=1)──▶ (B, k or L, D) ──lm_head──▶ logits
 logits_to_keep: int64 scalar, an initializer (default 0: every position) that is also a graph input
```

The input has a default, so a caller that does not know it (Optimum, onnxruntime-genai, the exporter's own
validation) feeds nothing and gets the full (B, L, vocab) logits of the Optimum-compatible graph; onnxruntime lists
it among the overridable initializers, not the required inputs. gptexport's runtime feeds 1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .fusion._match import Reject
from .shared_kv import _lm_head_input

INPUT = "logits_to_keep"
_PREFIX = "/model/logits_to_keep"


def add_logits_to_keep(model: ir.Model) -> int:
    """Add the `logits_to_keep` input and slice lm_head's input by it.

    Args:
        model: a traced (fused or not, any precision) default-layout graph, changed in place.
    Returns:
        1 when the input was added.
    Raises:
        Reject: the graph already has the input, has no logits output, or no final norm before lm_head.
    """
    graph = model.graph
    if any(v.name == INPUT for v in graph.inputs):
        raise Reject(f"graph already has a {INPUT} input")
    hidden = _lm_head_input(graph)  # (B, L, D)
    users = list(hidden.consumers())
    keep = ir.Value(name=INPUT, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=INPUT))
    graph.inputs.append(keep)
    graph.register_initializer(keep)  # the default: every position

    def const(name, values):
        value = ir.Value(name=f"{_PREFIX}/{name}", const_value=ir.tensor(np.array(values, dtype=np.int64)))
        graph.register_initializer(value)
        return value

    neg = ir.Node("", "Neg", [keep], name=f"{_PREFIX}/Neg")  # -k: Slice from the k-th last (0: from 0)
    start = ir.Node("", "Unsqueeze", [neg.outputs[0], const("axis0", [0])], name=f"{_PREFIX}/Unsqueeze")  # (1,)
    sliced = ir.Node("", "Slice", [hidden, start.outputs[0], const("end", [np.iinfo(np.int64).max]),
                                   const("axes", [1])], name=f"{_PREFIX}/Slice")  # (B, k, D)
    for node in (neg, start, sliced):
        node.outputs[0].name = f"{node.name}/output_0"
    graph.insert_before(users[0], [neg, start, sliced])
    for user in users:
        for i, value in enumerate(user.inputs):
            if value is hidden:
                user.replace_input_with(i, sliced.outputs[0])
    logits = next(o for o in graph.outputs if o.name == "logits")
    if logits.shape is not None and len(logits.shape) == 3:  # (batch, kept positions, vocab)
        logits.shape = ir.Shape([logits.shape[0], "logits_sequence", logits.shape[2]])
    return 1
