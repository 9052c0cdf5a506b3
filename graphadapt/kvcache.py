"""KV-cache capture: a causal LM (or a seq2seq decoder step) viewed as a module with flat cache tensors.

before: ``model(input_ids, attention_mask, past_key_values=DynamicCache, use_cache=True)``
after:  ``view(input_ids, attention_mask, position_ids, past_key_values_{i}_key/value…) →
        (logits, present.{i}.key/value…)`` — capturable by torch.export with a dynamic past axis
        (possibly 0), so one graph prefills and decodes. ``graphadapt.apply(..., cache=True)`` uses it;
        :mod:`graphadapt.generation` decodes with it.

:func:`decode_graph` derives the graphs the decode loop runs from that capture (a lean copy, and the
static-cache step); :func:`bind_graph` turns one into a function of the model.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .errors import CaptureError

__all__ = ["cached_decoder", "cached_twin", "generate", "kv_layout", "past_input_name", "onnx_io_names"]


def past_input_name(layer: int, kind: str) -> str:
    """Python name of a cache input in the captured graph (``past_key_values_0_key``)."""
    return f"past_key_values_{layer}_{kind}"


def onnx_io_names(num_layers: int) -> dict[str, str]:
    """Captured input name → Optimum's ONNX name (``past_key_values.0.key``)."""
    return {past_input_name(i, kv): f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")}


def kv_layout(model: nn.Module) -> dict[str, Any]:
    """``{"num_layers", "kv_heads", "head_dim", "encoder_decoder"}`` of a causal or seq2seq LM,
    read from one tiny eager cached forward (self-attention cache for encoder-decoder models)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CaptureError(f"generation needs a transformers model with a `.config`; got {type(model).__name__}")
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise CaptureError("generation needs transformers") from e
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    ids = torch.zeros(1, 2, dtype=torch.long, device=_device(model))
    kw = {"input_ids": ids, "use_cache": True}
    if seq2seq:
        kw["decoder_input_ids"] = ids
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**kw)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{type(model).__name__} fails a cached forward ({type(e).__name__}: {e}); "
                           "generation needs a causal LM (…ForCausalLM) or a seq2seq LM "
                           "(…ForConditionalGeneration)") from e
    finally:
        model.train(was)
    cache = _returned_cache(out)
    if seq2seq and isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, DynamicCache) or not hasattr(out, "logits"):
        raise CaptureError(f"{type(model).__name__} did not return logits and a DynamicCache with use_cache=True; "
                           "generation supports causal LMs (…ForCausalLM / …LMHeadModel) and seq2seq LMs "
                           "(…ForConditionalGeneration)")
    odd = [type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer]
    if odd:
        raise CaptureError(f"{type(model).__name__} uses cache layers {sorted(set(odd))} (sliding window / hybrid); "
                           "only full-attention DynamicLayer caches are supported")
    k = cache.layers[0].keys
    return {"num_layers": len(cache.layers), "kv_heads": int(k.shape[1]), "head_dim": int(k.shape[-1]),
            "encoder_decoder": seq2seq}


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.x names the cache argument ``cache``; earlier versions ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class _FlatCacheDecoder(nn.Module):
    """A view of a causal LM (same submodules and parameter names) with flat cache tensors in and out.

    Not a copy: it shares the model's ``_modules``/``_parameters``/``_buffers`` dicts, so the
    captured parameter names are exactly the model's (adapter checkpoints stay interchangeable
    with the uncached capture).
    """

    def __init__(self, model: nn.Module, layout: dict[str, Any]):
        super().__init__()
        object.__setattr__(self, "graphadapt_source", model)
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.training = model.training
        self.layout = layout
        self.config = model.config

    def _run(self, input_ids, attention_mask, position_ids, flat):
        from transformers.cache_utils import DynamicCache

        model = self.graphadapt_source
        cache = DynamicCache([(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)], config=model.config)
        out = model.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **{_cache_kwarg(model): cache}, use_cache=True, return_dict=True)
        res = {"logits": out.logits}
        for i, layer in enumerate(_returned_cache(out).layers):
            res[f"present.{i}.key"], res[f"present.{i}.value"] = layer.keys, layer.values
        return res


def _view_class(num_layers: int) -> type:
    """A ``_FlatCacheDecoder`` subclass whose ``forward`` names every cache tensor (torch.export binds by name)."""
    names = [past_input_name(i, kv) for i in range(num_layers) for kv in ("key", "value")]
    src = (f"def forward(self, input_ids, attention_mask, position_ids, {', '.join(names)}):\n"
           f"    return self._run(input_ids, attention_mask, position_ids, ({', '.join(names)},))\n")
    ns: dict[str, Any] = {}
    exec(src, ns)  # noqa: S102 - generated from integers only
    return type(f"FlatCacheDecoder{num_layers}", (_FlatCacheDecoder,), {"forward": ns["forward"]})


class _Seq2SeqStep(_FlatCacheDecoder):
    """Decoder step of an encoder-decoder LM: self-attention cache flat in/out; cross-attention
    keys/values are recomputed from ``encoder_hidden_states`` every step (so adapters on the
    cross-attention k/v projections stay in this graph)."""

    def _run(self, decoder_input_ids, encoder_hidden_states, attention_mask, flat):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        model = self.graphadapt_source
        self_cache = DynamicCache([(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)])
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        out = model.forward(encoder_outputs=(encoder_hidden_states,), attention_mask=attention_mask,
                            decoder_input_ids=decoder_input_ids, **{_cache_kwarg(model): cache}, use_cache=True,
                            return_dict=True)
        res = {"logits": out.logits}
        for i, layer in enumerate(_returned_cache(out).self_attention_cache.layers):
            res[f"present.{i}.key"], res[f"present.{i}.value"] = layer.keys, layer.values
        return res


class _Encoder(_FlatCacheDecoder):
    """The encoder of an encoder-decoder LM, under the full model's parameter names."""

    def forward(self, input_ids, attention_mask):
        enc = self.graphadapt_source.get_encoder()
        return {"last_hidden_state": enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state}


def seq2seq_views(model: nn.Module, layout: dict[str, Any]):
    """(encoder view, example kwargs), (decoder-step view, example kwargs) for an encoder-decoder LM."""
    names = [past_input_name(i, kv) for i in range(layout["num_layers"]) for kv in ("key", "value")]
    src = (f"def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, {', '.join(names)}):\n"
           f"    return self._run(decoder_input_ids, encoder_hidden_states, attention_mask, ({', '.join(names)},))\n")
    ns: dict[str, Any] = {}
    exec(src, ns)  # noqa: S102 - generated from integers only
    step = type(f"Seq2SeqStep{layout['num_layers']}", (_Seq2SeqStep,), {"forward": ns["forward"]})(model, layout)
    enc = _Encoder(model, layout)
    dev, dt = _device(model), _dtype(model)
    g = torch.Generator().manual_seed(1234)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    b, s, t, past = 2, 7, 3, 4
    hidden = int(getattr(model.config, "d_model", None) or model.config.hidden_size)
    enc_kw = {"input_ids": torch.randint(0, vocab, (b, s), generator=g).to(dev),
              "attention_mask": torch.ones(b, s, dtype=torch.long, device=dev)}
    step_kw: dict[str, Any] = {
        "decoder_input_ids": torch.randint(0, vocab, (b, t), generator=g).to(dev),
        "encoder_hidden_states": torch.randn(b, s, hidden, generator=g).to(dev, dt),
        "attention_mask": torch.ones(b, s, dtype=torch.long, device=dev)}
    for n in names:
        step_kw[n] = torch.randn(b, layout["kv_heads"], past, layout["head_dim"], generator=g).to(dev, dt)
    step.graphadapt_dynamic_axes = {
        "decoder_input_ids": {0: "batch", 1: "sequence"}, "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
        "attention_mask": {0: "batch", 1: "encoder_sequence"}, **{n: {0: "batch", 2: "past_sequence"} for n in names}}
    return (enc, enc_kw), (step, step_kw)


def cached_decoder(model: nn.Module, example_kwargs: Mapping[str, Any] | None = None,
                   batch: int = 2, seq: int = 3, past: int = 4):
    """``(view, example_kwargs, dynamic_axes)`` for capturing ``model`` with a flat KV cache.

    ``example_kwargs`` may give ``input_ids`` (and ``attention_mask``); the cache examples are
    random tensors of length ``past`` (>1 so torch.export keeps the axis symbolic).
    """
    layout = kv_layout(model)
    if layout["encoder_decoder"]:
        raise CaptureError(f"cache=True captures decoder-only causal LMs; {type(model).__name__} is an "
                           "encoder-decoder model: apply(model, spec) without cache and call "
                           "adapted.generate(...) (it captures the encoder and a cached decoder step)")
    view = _view_class(layout["num_layers"])(model, layout)
    dev, dt = _device(model), _dtype(model)
    g = torch.Generator().manual_seed(1234)
    given = dict(example_kwargs or {})
    extra = set(given) - {"input_ids", "attention_mask"}
    if extra:
        raise CaptureError(f"with cache=True, example_kwargs may hold input_ids/attention_mask only; got {sorted(extra)}")
    ids = given.get("input_ids")
    if ids is None:
        ids = torch.randint(0, int(getattr(model.config, "vocab_size", 100) or 100), (batch, seq), generator=g)
    ids = ids.to(dev)
    b, t = ids.shape
    kw: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones(b, past + t, dtype=torch.long, device=dev),
        "position_ids": torch.arange(past, past + t, device=dev).expand(b, t).clone(),
    }
    for i in range(layout["num_layers"]):
        for kv in ("key", "value"):
            kw[past_input_name(i, kv)] = torch.randn(b, layout["kv_heads"], past, layout["head_dim"],
                                                     generator=g).to(dev, dt)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}}
    for k in kw:
        if k.startswith("past_key_values_"):
            axes[k] = {0: "batch", 2: "past_sequence"}
    return view, kw, axes


# --------------------------------------------------------------------------- decode-step graphs
_INT_MAX = 2 ** 62


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is_aten(node, *names) -> bool:
    tgt = getattr(node, "target", None)
    return (getattr(node, "op", None) == "call_function" and isinstance(tgt, torch._ops.OpOverload)
            and tgt.namespace == "aten" and tgt._schema.name.split("::")[-1] in names)


def _is_empty_1d(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == 0


def decode_graph(gm, num_layers: int, *, static: bool = False) -> tuple[torch.fx.Graph, list[str]]:
    """A copy of the cached graph of ``gm`` for the decode loop, and the names of its outputs.

    before: ``forward(input_ids, attention_mask, position_ids, past…) → {logits, present.{i}.key/value}``
            (pytree in/out, torch.export's ``_guards_fn`` call, ``cat([lifted empty, past])`` of the initial
            ``DynamicCache``, full-range ``slice`` views)
    after:  plain positional graph returning a tuple; the guard call, the empty concatenations and the no-op
            slices gone (each returns its input's values: exact). Inputs are built by the decode loop, which
            the model's input contract checked on the first step.

    ``static=True`` (one new token per row over a preallocated cache of ``L`` slots): an extra input
    ``cache_position [1]``; each ``present = cat([past, new], -2)`` becomes ``past.index_copy_(2, cache_position,
    new)`` (in place: the caller's buffers are the cache) and every read of the past length ``P`` becomes
    ``L - 1``, so the key length is ``L`` and the query sits at the last position: the causal part of the mask
    admits every slot and ``attention_mask [B, L]`` (1 on filled slots) masks the rest. Outputs: ``logits``.
    Raises :class:`CaptureError` naming the node when the graph uses its past in another way.
    """
    out_spec = gm.__dict__.get("_out_spec")
    if out_spec is None:
        raise CaptureError("the decode graph needs the captured output names (a graph from torch.export)")
    import torch.utils._pytree as pytree

    g = torch.fx.Graph()
    env: dict = {}
    flat_out = g.graph_copy(gm.graph, env)
    flat_out = list(flat_out if isinstance(flat_out, (list, tuple)) else [flat_out])
    index = pytree.tree_unflatten(list(range(len(flat_out))), out_spec)
    if not isinstance(index, dict) or "logits" not in index:
        raise CaptureError("the cached graph has no `logits` output")
    names = list(index)
    outs = {k: flat_out[i] for k, i in index.items()}
    places = {n.target: n for n in g.nodes if n.op == "placeholder"}
    pasts = {past_input_name(i, kv): places.get(past_input_name(i, kv)) for i in range(num_layers)
             for kv in ("key", "value")}
    for n in list(g.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            g.erase_node(n)  # torch.export's input guards: the contract checked the first step's inputs
        elif _is_aten(n, "cat") and len(n.args[0]) > 1:
            keep = [a for a in n.args[0] if not _is_empty_1d(a)]  # cat skips 1-D empty tensors (legacy rule)
            if len(keep) == 1:
                n.replace_all_uses_with(keep[0])
                g.erase_node(n)
        elif (_is_aten(n, "slice") and len(n.args) >= 4 and n.args[2] in (0, None)
              and isinstance(n.args[3], int) and n.args[3] >= _INT_MAX and (len(n.args) < 5 or n.args[4] == 1)
              and not n.kwargs):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    if static:
        last = next(n for n in reversed(g.nodes) if n.op == "placeholder")
        with g.inserting_after(last):
            pos = g.placeholder("cache_position")
        for i in range(num_layers):
            for kv in ("key", "value"):
                name = past_input_name(i, kv)
                past, present = pasts[name], outs.get(f"present.{i}.{kv}")
                if past is None or present is None:
                    raise CaptureError(f"static cache: the graph has no input {name} / output present.{i}.{kv}")
                if not (_is_aten(present, "cat") and len(present.args[0]) == 2 and present.args[0][0] is past
                        and (present.args[1] if len(present.args) > 1 else 0) in (2, -2)):
                    raise CaptureError(f"static cache: present.{i}.{kv} is not cat([{name}, new], dim=-2) "
                                       f"(got {present.format_node()})")
                with g.inserting_before(present):
                    upd = g.call_function(torch.ops.aten.index_copy_.default, (past, 2, pos, present.args[0][1]))
                present.replace_all_uses_with(upd)
                g.erase_node(present)
                outs[f"present.{i}.{kv}"] = upd
                for user in list(past.users):
                    if user is upd or (user.op == "call_function" and user.target is torch.ops.aten.sym_size.int
                                       and user.args[1] in (0, 1, 3)):
                        continue
                    if user.op == "call_function" and user.target is torch.ops.aten.sym_size.int and user.args[1] == 2:
                        with g.inserting_after(user):
                            less = g.call_function(_operator().sub, (user, 1))
                        user.replace_all_uses_with(less, delete_user_cb=lambda u, less=less: u is not less)
                        continue
                    raise CaptureError(f"static cache: {name} is read by {user.format_node()}; only its sizes and "
                                       "the cache concatenation are supported")
        names = ["logits"]
        g.output((outs["logits"],))
    else:
        g.output(tuple(outs[k] for k in names))
    g.eliminate_dead_code(is_impure_node=lambda n: n.op not in ("call_function", "get_attr") or n.is_impure())
    for n in reversed(list(g.nodes)):  # fresh copies of constants nobody reads (detach_ counts as impure)
        if not n.users and (_is_aten(n, "lift_fresh_copy", "detach_") or n.op == "get_attr"):
            g.erase_node(n)
    g.lint()
    return g, names


def _operator():
    import operator

    return operator


def bind_graph(gm, graph: torch.fx.Graph, *, fast: bool):
    """The Python ``forward`` of ``graph`` run on ``gm`` (``fn(**inputs)``; ``self`` is a global of the function,
    so torch.compile traces a plain function rather than a GraphModule's forward): its ``get_attr`` and
    ``call_module`` names resolve on ``gm`` at every call, so weights swapped in later (merge, load) are read.

    ``fast``: ATen calls go straight to the operator's C++ entry (``OpOverload._op``, what
    ``OpOverload.__call__`` calls) instead of through a Python frame per op: the same kernels, fewer host
    cycles. Not for ``torch.compile`` (dynamo traces ``OpOverload`` targets)."""
    import re

    code = graph.python_code("self")
    src, glb = code.src, dict(code.globals)
    if fast:
        def repl(m):
            name, overload = m.group(1), m.group(2)
            op = getattr(getattr(torch.ops.aten, name, None), overload, None)
            if not isinstance(op, torch._ops.OpOverload):
                return m.group(0)
            key = f"_fast_aten_{name}_{overload}"
            glb[key] = op._op
            return key + "("
        src = re.sub(r"torch\.ops\.aten\.(\w+)\.(\w+)\(", repl, src)
    head = "def forward(self, "
    if head not in src:
        raise CaptureError("unexpected generated code for the decode graph (no `def forward(self, ...)`)")
    src = src.replace(head, "def forward(*, ", 1)
    glb.update(self=gm, __builtins__=__builtins__)
    exec(compile(src, f"<graphadapt decode step {id(graph):x}>", "exec"), glb)  # noqa: S102
    return glb["forward"]


__all__ = ["bind_graph", "cached_decoder", "decode_graph", "kv_layout", "onnx_io_names", "past_input_name",
           "seq2seq_views"]
