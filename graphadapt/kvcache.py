"""KV-cache capture: a causal LM (or a seq2seq decoder step) viewed as a module with flat cache tensors.

before: ``model(input_ids, attention_mask, past_key_values=DynamicCache, use_cache=True)``
after:  ``view(input_ids, attention_mask, position_ids, past_key_values_{i}_key/value…) →
        (logits, present.{i}.key/value…)`` — capturable by torch.export with a dynamic past axis
        (possibly 0), so one graph prefills and decodes. ``graphadapt.apply(..., cache=True)`` uses it;
        :mod:`graphadapt.generation` decodes with it.
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


# --------------------------------------------------------------------------- twin


__all__ = ["cached_decoder", "kv_layout", "onnx_io_names", "past_input_name", "seq2seq_views"]
