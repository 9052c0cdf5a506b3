"""Op vocabularies the recognition patterns are written in, and small node helpers."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# value-preserving ops torch.export leaves around (a same-dtype ``to`` is a no-op at capture)
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.to.device,
}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
TRANSPOSES = {aten.t.default, aten.numpy_T.default}

# ops a q/k/v tensor flows through between its projection and the attention core
# (head split, RoPE, GQA repeat, scaling) and between the core and the output projection
SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.contiguous.default,
    aten.clone.default, aten.flatten.using_ints, aten.unflatten.int, aten.t.default,
    aten.repeat_interleave.self_int, operator.getitem, aten.alias.default,
} | PASSTHROUGH
QKV_OPS = SHAPE_OPS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
    aten.sub.Tensor, aten.neg.default, aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.stack.default, aten.chunk.default, aten.index.Tensor, aten.lift_fresh_copy.default,
}
if hasattr(aten, "broadcast_to"):   # Falcon's GQA repeats k/v heads with broadcast_to
    QKV_OPS.add(aten.broadcast_to.default)
MASKING = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.where.ScalarOther, aten.where.ScalarSelf,
} | PASSTHROUGH
BRANCH_TAIL = {aten.dropout.default, aten.mul.Tensor, aten.mul.Scalar, aten.native_dropout.default} | PASSTHROUGH
ADDS = {aten.add.Tensor, aten.add_.Tensor}  # Falcon sums its parallel branches in place
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
ACTIVATIONS = {"gelu", "silu", "relu", "tanh", "sigmoid", "gelu_", "relu_", "leaky_relu", "elu",
               "mish", "hardswish", "softplus"}


def is_op(n, targets) -> bool:
    """``n`` is a ``call_function`` node whose target is in ``targets``."""
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def strip(n):
    """Follow value-preserving ops back to their source."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in PASSTHROUGH:
        n = n.args[0]
    return n


def strip_shape(n):
    """Like :func:`strip`, also through reshapes: the same stream, flattened or not."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in (PASSTHROUGH | RESHAPES):
        n = n.args[0]
    return n


def node_args(args) -> list[fx.Node]:
    """The nodes among ``args`` (nested lists/tuples flattened)."""
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += node_args(a)
    return out


def op_name(n) -> str:
    """Readable target of a node: ``aten.mul.Tensor``, ``getitem``, ``placeholder``, ``get_attr``."""
    if not isinstance(n, fx.Node):
        return type(n).__name__
    if n.op != "call_function":
        return n.op
    t = n.target
    s = str(t)
    if s.startswith("<built-in function"):
        return getattr(t, "__name__", s)
    return s


def short_op(n) -> str:
    """Short form for paths: ``view``, ``transpose``, ``getitem``."""
    name = op_name(n)
    return name.split(".")[1] if name.startswith("aten.") and name.count(".") >= 1 else name


def module_path(node) -> str:
    """Innermost module that produced ``node`` (from ``nn_module_stack``); ``""`` when unknown."""
    stack = node.meta.get("nn_module_stack") if isinstance(node, fx.Node) else None
    if not stack:
        return ""
    return list(stack.values())[-1][0]
