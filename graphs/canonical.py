"""Bring a graph exported elsewhere (Optimum's TorchScript export) to the form the fusion rules read.

Our own traces (exporter/trace.py) come out of torch.onnx's dynamo exporter already folded and with symbolic
shapes on every value. An Optimum export does not:

    deduplicated weights   a bias shared by value is `Identity(other layer's bias)`, not an initializer
    shape arithmetic       Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape around every Gemm and head split;
                           onnx's own shape inference loses (B, T) through them ([unk__0, sequence_length, 64])
    the attention scale    sqrt(1 / sqrt(Shape(q)[-1])) computed at run time from the query's shape

so before the rules run, `canonicalise` removes the Identity aliases, infers symbolic shapes with onnxruntime's
SymbolicShapeInference (it follows the Shape/Concat arithmetic: the flattened Gemm input is (B*T, K), its
Reshape back (B, T, N)), folds every Shape slice whose dims are static into a constant, and constant-folds
what then became constant (onnxscript's folder: the scale chain ends as one number). The rules then see a graph
like ours; what is still different (the mask as Where(bool, 0, -inf), the NaN guard after Softmax, the scale
split over q and k) the attention rule accepts itself (graphs/fusion/attention.py).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

_KEEP_ELEMENTS = 1024  # initializers up to this size travel to shape inference (shape constants); larger are hidden


def canonicalise(model: ir.Model) -> dict[str, int]:
    """Rewrite `model` in place into the form graphs/fusion reads (see the module docstring).

    Returns:
        what was done: identity aliases removed, values given a shape, static shape slices and other constants
        folded.
    """
    counts = {"identities": _drop_identities(model)}
    counts["shaped_values"] = symbolic_shapes(model)
    counts["static_shape_slices"] = fold_static_shape_slices(model)
    counts["folded_constants"] = _fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    counts["shaped_values"] = symbolic_shapes(model)  # the folded graph: shapes of the values folding made
    return counts


def _drop_identities(model: ir.Model) -> int:
    before = sum(1 for n in model.graph if n.op_type == "Identity")
    common.IdentityEliminationPass()(model)
    return before - sum(1 for n in model.graph if n.op_type == "Identity")


def _fold_constants(model: ir.Model) -> int:
    import onnxscript.optimizer as optimizer

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    before = len(model.graph)
    optimizer.fold_constants(model, onnx_shape_inference=False)
    # onnxruntime's shape inference reads Constant nodes by their `value` attribute only: lift them all
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return max(0, before - len(model.graph))


@contextlib.contextmanager
def _weights_hidden(graph: ir.Graph):
    """Stand an external reference in for every large initializer while the graph is serialised for shape
    inference, which needs their types and shapes, never their bytes (a model may not fit in memory twice)."""
    saved = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.size > _KEEP_ELEMENTS:
            saved[value] = tensor
            value.const_value = ir.ExternalTensor("weights-not-read", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
    try:
        yield
    finally:
        for value, tensor in saved.items():
            value.const_value = tensor


def symbolic_shapes(model: ir.Model) -> int:
    """Give every node output the shape onnxruntime's SymbolicShapeInference computes (dims like `batch_size`,
    `past_sequence_length + sequence_length`); graph outputs keep theirs. Returns the number of values shaped."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = model.graph
    with _weights_hidden(graph):
        proto = ir.serde.serialize_model(model)
    proto.graph.ClearField("value_info")
    hidden = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in hidden:  # an input of known type and shape: the inference never asks for its numbers
        proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    kept = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(kept)
    inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    found = {v.name: v.type.tensor_type for v in inferred.graph.value_info if v.type.HasField("tensor_type")}
    shaped = 0
    for node in graph:
        for value in node.outputs:
            info = found.get(value.name)
            if info is None or not info.HasField("shape") or value in graph.outputs:
                continue
            value.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else ir.SymbolicDim(d.dim_param or None)
                                    for d in info.shape.dim])
            if value.type is None and info.elem_type != onnx.TensorProto.UNDEFINED:
                value.type = ir.TensorType(ir.DataType(info.elem_type))
            shaped += 1
    return shaped


def _static_dims(shape_node: ir.Node) -> list | None:
    """The dims Shape(x) returns (its start/end applied), ints or symbolic; None when x's shape is unknown."""
    x = shape_node.inputs[0]
    if x.shape is None:
        return None
    start, end = shape_node.attributes.get("start"), shape_node.attributes.get("end")
    dims = list(x.shape)
    return dims[(start.value if start is not None else 0):(end.value if end is not None else len(dims))]


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def fold_static_shape_slices(model: ir.Model) -> int:
    """Replace Slice(Shape(x), ...) and Gather(Shape(x), k) by a constant where the dims they pick are static.

    onnxscript's folder folds a Shape only when every dim is known; head_size (Shape(q)[-1]) is static while
    batch and sequence are not, and the attention scale is computed from it.

    Returns:
        The number of Slice/Gather outputs replaced.
    """
    graph, folded = model.graph, 0
    for shape_node in [n for n in graph if n.op_type == "Shape" and n.domain == ""]:
        dims = _static_dims(shape_node)
        if dims is None:
            continue
        for user in list(shape_node.outputs[0].consumers()):
            if not user.outputs[0].consumers():  # already folded (dead until the cleanup)
                continue
            picked = _picked(user, shape_node.outputs[0], dims)
            if picked is None or not all(isinstance(d, int) for d in np.ravel(np.asarray(picked, object))):
                continue
            name, k = f"{user.name or 'shape'}/static_dims", 0
            while name in graph.initializers:
                name, k = f"{user.name or 'shape'}/static_dims_{k + 1}", k + 1
            array = np.asarray(picked, np.int64)
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(array.shape),
                             const_value=ir.tensor(array))
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(user.outputs[0], value)
            folded += 1
    return folded


def _picked(user: ir.Node, shape: ir.Value, dims: list):
    """What `user` selects from the shape vector `dims` (a list, or one dim for a scalar Gather), or None."""
    if user.op_type == "Gather" and user.domain == "" and user.inputs[0] is shape:
        index = _const(user.inputs[1])
        if index is None or index.ndim > 1:
            return None
        picks = [dims[int(i)] for i in np.ravel(index)] if all(-len(dims) <= i < len(dims) for i in np.ravel(index)) \
            else None
        return None if picks is None else (picks[0] if index.ndim == 0 else picks)
    if user.op_type == "Slice" and user.domain == "" and user.inputs[0] is shape:
        starts, ends = _const(user.inputs[1]), _const(user.inputs[2])
        axes = _const(user.inputs[3]) if len(user.inputs) > 3 and user.inputs[3] is not None else None
        steps = _const(user.inputs[4]) if len(user.inputs) > 4 and user.inputs[4] is not None else None
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        if (axes is not None and axes.reshape(-1).tolist() != [0]) or (steps is not None and steps.size != 1):
            return None
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        return dims[slice(start, end, step)]
    return None
