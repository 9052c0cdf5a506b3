"""Generation with a KV cache: cached capture of decoder-only LMs and a ``generate`` loop.

before: ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` (``forward(input_ids, ..., past_key_values=Cache)``)
after:  a graph with flat tensor inputs ``input_ids [B, T]``, ``attention_mask [B, P+T]``,
        ``position_ids [B, T]``, ``past_key_values_{i}_key/value [B, kv_heads, P, head_dim]``
        and outputs ``logits [B, T, V]``, ``present.{i}.key/value [B, kv_heads, P+T, head_dim]``.

The past length ``P`` is a dynamic axis and may be 0 (the prefill step), so one graph serves
prefill and decode. :func:`generate` runs that graph step by step (greedy or sampling with
temperature / top-k / top-p from an explicit ``torch.Generator``), batched with left padding
like Hugging Face ``generate``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .errors import CaptureError, GraphAdaptError

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


def _seq2seq_views(model: nn.Module, layout: dict[str, Any]):
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
def cached_twin(adapted) -> Any:
    """The cached decoder-only capture that serves ``adapted.generate`` and the decoder ONNX export.

    ``adapted`` itself when captured with ``cache=True``; otherwise a twin built once and re-synced
    on every call: parameters tied by name (adapters trained on ``adapted`` are used as they are
    now), active adapters and merge state mirrored.
    """
    if getattr(adapted, "decoder_cache", None):
        return adapted
    twins = _twins(adapted)
    if len(twins) != 1:
        raise GraphAdaptError("decoder ONNX export supports decoder-only causal LMs; encoder-decoder models "
                              "generate in PyTorch only (adapted.generate)")
    return twins[0]


def _twins(adapted) -> list:
    """[decoder] or [encoder, decoder step]: cached captures sharing ``adapted``'s parameters, synced."""
    from .api import apply

    if adapted.is_merged and adapted._merge_state["in_place"]:
        raise GraphAdaptError("generate() cannot follow an in-place merge (the source weights now hold the "
                              "merged values); unmerge() first, or merge(in_place=False)")
    twins = adapted.__dict__.get("_generation_twins")
    if twins is None:
        src = adapted.__dict__.get("_source_model")
        if src is None:
            raise GraphAdaptError("this adapted model has no source model to re-capture with a KV cache; "
                                  "build it with graphadapt.apply(model, spec, cache=True)")
        layout = kv_layout(src)
        try:
            if layout["encoder_decoder"]:
                (enc, enc_kw), (step, step_kw) = _seq2seq_views(src, layout)
                twins = [apply(enc, adapted.spec, example_kwargs=enc_kw), apply(step, adapted.spec,
                                                                               example_kwargs=step_kw)]
                twins[1].decoder_cache = dict(layout)
            else:
                twins = [apply(src, adapted.spec, cache=True)]
        except GraphAdaptError as e:
            raise GraphAdaptError(f"generate() could not re-capture {type(src).__name__} with a KV cache "
                                  f"for this spec: {e}") from e
        mine = {r["target"] for r in adapted.adapter_records}
        theirs = {r["target"] for t in twins for r in t.adapter_records}
        if mine != theirs:
            raise GraphAdaptError("the cached capture placed adapters at different sites "
                                  f"({sorted(mine ^ theirs)[:4]}); select sites by role or module path "
                                  "(not by layer index), or for decoder-only models generate with "
                                  "graphadapt.apply(model, spec, cache=True) and train that model")
        object.__setattr__(adapted, "_generation_twins", twins)
    for twin in twins:
        _sync(twin, adapted)
    return twins


def _sync(twin, adapted) -> None:
    if twin.is_merged:
        twin.unmerge()
    backups = adapted._merge_state["backups"] if adapted.is_merged else {}
    own = dict(adapted.named_parameters())
    for name in [n for n, _ in twin.named_parameters()]:
        p = backups.get(name, own.get(name))
        if p is None:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = twin.get_submodule(owner) if owner else twin
        mod._parameters[leaf] = p
    twin._apply(lambda t: t)  # re-target graph pins if the dtype/device changed
    twin.set_active(adapted.active_adapters())
    if adapted.is_merged:
        folded = set(adapted._merge_state["report"].folded)
        names = sorted({r["adapter"] for r in adapted.adapter_records if r["target"] in folded}
                       & {r["adapter"] for r in twin.adapter_records})
        if names:
            twin.merge(names)
    twin.eval()


# --------------------------------------------------------------------------- generate
def _generation_config(model):
    """The source model's ``generation_config`` (else its config): default eos/pad ids, as transformers."""
    src = model.__dict__.get("_source_model")
    return getattr(src, "generation_config", None) or getattr(model, "config", None)


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, as in transformers' warpers."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p (always >= 1)
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams):
    if num_beams not in (None, 1):
        raise GraphAdaptError("beam search is not implemented in graphadapt.generate (num_beams must be 1); "
                              "use to_base_model() and Hugging Face generate for beams")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GraphAdaptError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise GraphAdaptError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GraphAdaptError(f"top_p must be in (0, 1], got {top_p!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise GraphAdaptError(f"top_k must be an int >= 0, got {top_k!r}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = 50, top_p: float | None = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, decoder_start_token_id: int | None = None,
             generator: torch.Generator | None = None, seed: int | None = None,
             num_beams: int = 1, output_scores: bool = False):
    """Decode ``max_new_tokens`` tokens with the KV cache; returns ids like transformers' ``generate``.

    ``model``: an :class:`~graphadapt.AdaptedModel` — a causal LM captured with ``cache=True`` or a
    plain capture of a causal LM (prompts left-padded; returns ``[B, T + new]``) or of an
    encoder-decoder LM such as T5 (any padding; returns ``[B, 1 + new]`` starting with
    ``decoder_start_token_id``, default from the config). For a plain capture, cached twins sharing
    its parameters are captured once. Greedy by default; with ``do_sample`` temperature → top-k
    (default 50, as transformers) → top-p filtering, drawing from ``generator`` (or a new one
    seeded with ``seed``), never from the global RNG. ``eos_token_id``/``pad_token_id`` default to
    the source model's generation config, as in transformers (``eos_token_id=[]``: never stop);
    after eos a sequence is filled with pad (default: the eos id); decoding stops once every
    sequence has finished.
    ``output_scores=True`` also returns the per-step logits ``[new, B, V]`` (before warping).
    Beam search is not implemented.
    """
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams)
    twins = [model] if getattr(model, "decoder_cache", None) else _twins(model)
    cached = twins[-1]
    layout = cached.decoder_cache
    seq2seq = bool(layout.get("encoder_decoder"))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise GraphAdaptError("input_ids must be an integer tensor [batch, prompt_length]")
    if input_ids.shape[1] == 0:
        raise GraphAdaptError("input_ids needs at least one prompt token per sequence")
    dev, dt = cached._compute_device, cached._compute_dtype
    ids = input_ids.to(dev)
    b = ids.shape[0]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev).long()
    if mask.shape != ids.shape:
        raise GraphAdaptError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    if not seq2seq and bool((mask[:, -1] == 0).any()):
        raise GraphAdaptError("attention_mask ends with padding: pad prompts on the left for generation "
                              "(tokenizer.padding_side = 'left')")
    gen_cfg = _generation_config(model)
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    if do_sample and generator is None:
        generator = torch.Generator(device=dev).manual_seed(0 if seed is None else seed)
    eos_t = torch.tensor(eos, device=dev, dtype=ids.dtype)

    past = {past_input_name(i, kv): torch.zeros(b, layout["kv_heads"], 0, layout["head_dim"], device=dev, dtype=dt)
            for i in range(layout["num_layers"]) for kv in ("key", "value")}
    if seq2seq:
        start = decoder_start_token_id
        if start is None:
            cfg = cached.config
            start = getattr(cfg, "decoder_start_token_id", None)
            start = getattr(cfg, "pad_token_id", None) if start is None else start
        if start is None:
            raise GraphAdaptError("pass decoder_start_token_id= (the config has none)")
        with torch.no_grad():
            enc = twins[0](input_ids=ids, attention_mask=mask)["last_hidden_state"]
        out_ids = torch.full((b, 1), int(start), dtype=ids.dtype, device=dev)

        def step(step_ids, past):
            return cached(decoder_input_ids=step_ids, encoder_hidden_states=enc, attention_mask=mask, **past)
    else:
        out_ids = ids
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

        def step(step_ids, past):
            return cached(input_ids=step_ids, attention_mask=mask, position_ids=pos, **past)

    step_ids = out_ids
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    scores = []
    for _ in range(max_new_tokens):
        out = step(step_ids, past)
        logits = out["logits"][:, -1, :].float()
        if output_scores:
            scores.append(logits)
        if do_sample:
            probs = _warp(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if eos and pad is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
            if not bool(unfinished.any()):
                break
        past = {past_input_name(i, kv): out[f"present.{i}.{kv}"]
                for i in range(layout["num_layers"]) for kv in ("key", "value")}
        if not seq2seq:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = pos[:, -1:] + 1
        step_ids = nxt[:, None]
    if output_scores:
        return out_ids, torch.stack(scores) if scores else torch.empty(0, b, 0)
    return out_ids
