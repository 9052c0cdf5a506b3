"""Fusable ONNX: ``aten.scaled_dot_product_attention → com.microsoft::MultiHeadAttention`` at export,
then onnxruntime's transformer optimizer on the written file.

torch's dynamo exporter lowers SDPA into MatMul/Softmax/Where subgraphs that
``onnxruntime.transformers.fusion_attention`` does not recognise (it knows the TorchScript
exporter's shapes), so the optimizer fused 0 of the attentions of a graphadapt export. Every
attention core of a captured graph is one SDPA node, so graphadapt does not need to match
patterns: the export translates each SDPA node straight into onnxruntime's fused kernel::

    SDPA(q, k, v [B,N,S,H], mask)  →  MultiHeadAttention(flat(q), flat(k), flat(v), bias=mask)  → unflat
    flat(x) = Reshape(Transpose(x, [0,2,1,3]), [0,0,-1])   # [B,S,N·H]; the model's own Transpose
                                                            # before it is cancelled against this one

A boolean mask becomes an additive bias (0 where attended, the dtype's lowest value elsewhere),
a causal SDPA without a mask sets ``unidirectional=1``, and grouped-query SDPA (``enable_gqa``)
repeats the key/value heads. The result is one ``MultiHeadAttention`` per attention core,
whatever the architecture (BERT, Llama with GQA and rotary, ...). onnxruntime's optimizer then
fuses what it recognises around them (SkipLayerNormalization, BiasGelu, SkipSimplifiedLayerNorm).

Difference from PyTorch: a query row whose mask is entirely False gets NaN or zeros from
PyTorch's SDPA and the mean of the values from onnxruntime here; transformers never feeds such
rows except at padded positions, whose outputs are meaningless in both.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphadapt.errors import ExportError

OPTIMIZE_CHOICES = (None, "ort")
"""``export_onnx(optimize=...)``: None (portable standard ONNX) or ``"ort"`` (onnxruntime's fused kernels)."""

# what onnxruntime.transformers' BertOnnxModel.get_fused_operator_statistics counts as fused attention
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
_FUSED_OPS = (*ATTENTION_OPS, "EmbedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
              "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "RotaryEmbedding", "LayerNormalization",
              "SimplifiedLayerNormalization", "BiasAdd", "BiasSplitGelu", "FusedGemm")
MS_DOMAIN = "com.microsoft"


def check_optimize(optimize: Any) -> None:
    """Refuse an unknown ``optimize`` value before any work, and say when onnxruntime is missing."""
    if optimize not in OPTIMIZE_CHOICES:
        raise ExportError(f"optimize must be one of {OPTIMIZE_CHOICES}, got {optimize!r}: None writes standard "
                          "ONNX, 'ort' writes onnxruntime's fused attention and runs its transformer optimizer")
    if optimize == "ort":
        try:
            import onnxruntime.transformers.optimizer  # noqa: F401
        except ImportError as e:
            raise ExportError(f"optimize='ort' needs onnxruntime's transformer optimizer ({e}); "
                              "pip install onnxruntime") from None


def _mha_op():
    """onnxscript ``Op`` for com.microsoft::MultiHeadAttention (onnx has no schema for contrib ops:
    one is built here for torch.onnx's op recorder, and not registered with onnx)."""
    import onnxscript
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention", MS_DOMAIN, 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("bias", "T", param_option=optional),
                param("key_padding_mask", "M", param_option=optional),
                param("attention_bias", "T", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
                    OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "", required=False)],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), "MultiHeadAttention", schema)


def _lowest(dtype) -> float:
    """The dtype's lowest finite value: the additive bias of a masked position (as transformers uses)."""
    import onnx_ir as ir

    names = {ir.DataType.FLOAT16: np.float16, ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64}
    if dtype == ir.DataType.BFLOAT16:
        return float(torch.finfo(torch.bfloat16).min)
    return float(np.finfo(names.get(dtype, np.float32)).min)


def _static_dim(value, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    if not isinstance(dim, int):
        raise ExportError(f"optimize='ort' needs a static {what} in every attention core, got {dim!r} "
                          f"(shape {value.shape}); export with optimize=None")
    return dim


def _same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same symbol."""
    if a is None or b is None:
        return False
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and getattr(a, "value", None) == getattr(b, "value", None)


def sdpa_translation(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """torch.onnx custom translation of ``aten.scaled_dot_product_attention`` (see the module docstring)."""
    from onnxscript import opset18 as op

    if dropout_p:
        raise ExportError(f"optimize='ort' exports inference graphs; an attention core has dropout_p={dropout_p} "
                          "(export in eval mode)")
    if query.shape is None or len(query.shape) != 4 or key.shape is None or len(key.shape) != 4:
        raise ExportError(f"optimize='ort' needs [batch, heads, sequence, head_size] attention inputs, got "
                          f"query {query.shape}, key {key.shape}; export with optimize=None")
    heads, head_size = _static_dim(query, 1, "head count"), _static_dim(query, 3, "head size")
    kv_heads = _static_dim(key, 1, "key head count")

    def flat(x, repeat: int = 1):
        x = op.Transpose(x, perm=[0, 2, 1, 3])  # [B, S, N, H]
        if repeat > 1:  # grouped-query attention: head j of the query reads key head j // repeat
            x = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[3])),
                          op.Constant(value_ints=[1, 1, 1, repeat, 1]))
        return op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))

    repeat = 1
    if kv_heads != heads:
        if not enable_gqa or heads % kv_heads:
            raise ExportError(f"attention core with {heads} query heads and {kv_heads} key heads "
                              f"(enable_gqa={enable_gqa}); export with optimize=None")
        repeat = heads // kv_heads
    bias = None
    if attn_mask is not None:
        import onnx_ir as ir

        if attn_mask.dtype == ir.DataType.BOOL:
            bias = op.Where(attn_mask, op.CastLike(op.Constant(value_float=0.0), query),
                            op.CastLike(op.Constant(value_float=_lowest(query.dtype)), query))
        else:
            bias = op.CastLike(attn_mask, query)
        shape = list(attn_mask.shape) if attn_mask.shape is not None else None
        if shape is None or len(shape) < 4:  # MultiHeadAttention's attention_bias is [B or 1, N or 1, S, L]
            rank = len(shape) if shape is not None else 4
            bias = op.Unsqueeze(bias, op.Constant(value_ints=list(range(4 - rank))))
            shape = [1] * (4 - rank) + (shape or [None] * 4)
        if not (_same_dim(shape[2], query.shape[2]) and _same_dim(shape[3], key.shape[2])):
            # only batch and heads broadcast: a [B, 1, 1, L] padding mask is expanded over the queries
            bias = op.Expand(bias, op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(query, start=2, end=3),
                                             op.Shape(key, start=2, end=3), axis=0))
    attrs: dict[str, Any] = {"num_heads": heads}
    if scale is not None:
        attrs["scale"] = float(scale)
    if is_causal:
        attrs["unidirectional"] = 1
    out = _mha_op()(flat(query), flat(key, repeat), flat(value, repeat), None, None, bias, **attrs)
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_size])), perm=[0, 2, 1, 3])


def cancel_transpose_pairs(model) -> int:
    """Drop each ``Transpose`` that undoes the ``Transpose`` before it (the model's [B,S,N,H] → [B,N,S,H]
    followed by ``flat``'s way back), in the exported ``onnx_ir.Model``; returns how many.

    Done before onnxruntime's optimizer, whose own rule for this pair (fusion_constant_fold.py,
    ``fuse_2``) also deletes the first Transpose when it has other consumers and leaves a graph
    that is no longer a DAG."""
    import onnx_ir as ir

    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    removed = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        parent = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if parent is None or parent.op_type != "Transpose" or parent.domain not in ("", "ai.onnx"):
            continue
        outer, inner = node.attributes.get("perm"), parent.attributes.get("perm")
        if outer is None or inner is None or id(node.outputs[0]) in outputs:
            continue
        a, b = list(inner.as_ints()), list(outer.as_ints())
        if len(a) != len(b) or any(a[b[i]] != i for i in range(len(b))):
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], parent.inputs[0])
        graph.remove(node, safe=True)
        removed += 1
        if not parent.outputs[0].uses() and id(parent.outputs[0]) not in outputs:
            graph.remove(parent, safe=True)
    return removed


def _same_shape(a, b) -> bool:
    return (a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
            and all(_same_dim(x, y) for x, y in zip(a.shape, b.shape)))


def _projection(value):
    """``(x, weight, bias)`` when ``value`` is ``x @ weight (+ bias)`` seen through Reshapes that give the
    product's own shape back (split into heads, then ``flat``), weight and bias constant; else None."""
    x = value
    while (p := x.producer()) is not None and p.op_type == "Reshape" and p.domain in ("", "ai.onnx"):
        x = p.inputs[0]
    p = x.producer()
    if p is None or p.domain not in ("", "ai.onnx") or not _same_shape(value, x):
        return None
    bias = None
    if p.op_type == "Add":
        const = [i for i in p.inputs if i is not None and i.const_value is not None and len(i.shape or ()) == 1]
        other = [i for i in p.inputs if i is not None and i not in const]
        if len(const) != 1 or len(other) != 1 or other[0].producer() is None:
            return None
        bias, p = const[0], other[0].producer()
    if p.op_type != "MatMul" or p.domain not in ("", "ai.onnx"):
        return None
    weight = p.inputs[1]
    if weight is None or weight.const_value is None or len(weight.shape or ()) != 2:
        return None
    return p.inputs[0], weight, bias


def _concat_lazily(values, axis: int, name: str):
    """An initializer holding the concatenation of ``values``' constants, computed when the file is
    written (a merged weight behind a value is computed then too, one at a time)."""
    import onnx_ir as ir

    consts = [v.const_value for v in values]
    shape = list(consts[0].shape)
    shape[axis] = sum(c.shape[axis] for c in consts)

    def compute():
        return ir.tensor(np.concatenate([c.numpy() for c in consts], axis=axis), name=name)

    tensor = ir.LazyTensor(compute, dtype=consts[0].dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(consts[0].dtype), const_value=tensor)


def pack_qkv(model) -> int:
    """``MultiHeadAttention(x@Wq+bq, x@Wk+bk, x@Wv+bv, bias=B)`` → ``Attention(x, [Wq|Wk|Wv], [bq|bk|bv], B)``:
    one input projection GEMM per layer (what onnxruntime's BERT fusion produces from the TorchScript
    exporter's graphs). Where the three projections do not read one input through constant weights
    (rotary embeddings, repeated key/value heads, cross-attention), the MultiHeadAttention stays.
    Returns how many were packed."""
    import onnx_ir as ir

    graph = model.graph
    packed = 0
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.inputs) < 3:
            continue
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        if any(v is not None for v in inputs[3:5]):
            continue
        found = [_projection(v) if v is not None else None for v in inputs[:3]]
        if any(f is None for f in found) or len({id(f[0]) for f in found}) != 1:
            continue
        x, weights, biases = found[0][0], [f[1] for f in found], [f[2] for f in found]
        if len({w.shape[0] for w in weights}) != 1 or len({w.const_value.dtype for w in weights}) != 1:
            continue
        stem = node.name or f"attention_{packed}"
        weight = _concat_lazily(weights, 1, f"{stem}.qkv_weight")
        graph.register_initializer(weight)
        bias = None
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                continue
            bias = _concat_lazily(biases, 0, f"{stem}.qkv_bias")
            graph.register_initializer(bias)
        attrs = {a.name: a for a in node.attributes.values()}
        fused = ir.Node(MS_DOMAIN, "Attention", [x, weight, bias, None, None, inputs[5]],
                        attributes=[attrs[k] for k in ("num_heads", "scale", "unidirectional") if k in attrs],
                        name=f"{stem}_packed", num_outputs=1)
        graph.insert_before(node, fused)
        fused.outputs[0].shape, fused.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], fused.outputs[0])
        graph.remove(node, safe=True)
        packed += 1
    if packed:
        _remove_dead(graph)
    return packed


def _remove_dead(graph) -> None:
    """Nodes and initializers nothing reads any more (the separate projections of packed attentions)."""
    outputs = {id(v) for v in graph.outputs}
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not v.uses() and id(v) not in outputs for v in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    inputs = {id(v) for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and id(value) not in inputs and id(value) not in outputs:
            del graph.initializers[name]


def translation_table(optimize: str | None) -> dict | None:
    """``custom_translation_table`` for torch.onnx.export, None for standard ONNX."""
    if optimize != "ort":
        return None
    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa_translation}


@contextlib.contextmanager
def _quiet():
    """The optimizer logs each fusion at INFO and 'model producer not matched' at WARNING."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("onnxruntime", "fusion", "onnx_model"))]
    loggers = [logging.getLogger(n) for n in ["onnxruntime", *names]]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_ort_optimizer(path: Path, external_data: bool, model_type: str = "bert") -> dict[str, int]:
    """Run ``onnxruntime.transformers.optimizer.optimize_model`` on ``path`` in place (python fusions
    only, ``opt_level=0``: no hardware-specific onnxruntime rewrites are baked into the file).
    Returns the count of each fused op in the result."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        try:
            optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
            optimized.save_model_to_file(str(path), use_external_data_format=external_data,
                                         all_tensors_to_one_file=True)
        except Exception as e:
            from graphadapt.exporters._model import one_line

            raise ExportError(f"onnxruntime's transformer optimizer failed on the export: {one_line(e)}; "
                              "export with optimize=None") from e
    return fused_op_counts(path)


def fused_op_counts(path: Path | str) -> dict[str, int]:
    """Count of each onnxruntime fused op (com.microsoft domain) in the graph at ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in proto.graph.node
                                 if n.domain == MS_DOMAIN and n.op_type in _FUSED_OPS)
    return dict(counts.most_common())
