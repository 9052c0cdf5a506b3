"""Generation with a KV cache: a ``generate`` loop over the cached capture (:mod:`graphadapt.kvcache`).

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

from typing import Any

import torch

from .composition.multitask import check_task_ids, coerce_task_ids
from .composition.route import ROUTE_INPUT, TASK_INPUT, check_adapter_ids, coerce_adapter_ids, routing_input
from .compiling import compiled_options, static_step
from .concurrency import reading
from .contract import check_generate
from .errors import CaptureError, GraphAdaptError
from .inference import optimize_for_inference
from .quantized import has_quantized_weights, quantized_modules
from .vocab import ADAPTERS
from .kvcache import (bind_graph, decode_graph, seq2seq_views, cached_decoder, kv_layout, onnx_io_names,
                      past_input_name)

__all__ = ["cached_decoder", "cached_twin", "generate", "generation_twins", "kv_layout", "past_input_name",
           "onnx_io_names"]


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
        raise GraphAdaptError("an encoder-decoder model has two cached captures (encoder, decoder step): "
                              "use generation_twins(adapted)")
    return twins[0]


def generation_twins(adapted) -> list:
    """``[decoder]`` (causal LM) or ``[encoder, decoder step]`` (encoder-decoder LM): the cached captures
    ``generate`` runs, synced with ``adapted`` (``adapted`` itself when captured with ``cache=True``)."""
    return [adapted] if getattr(adapted, "decoder_cache", None) else _twins(adapted)


def _twins(adapted) -> list:
    """[decoder] or [encoder, decoder step]: cached captures sharing ``adapted``'s parameters, synced."""
    if adapted.is_merged and adapted._merge_state["in_place"]:
        raise GraphAdaptError("generate() cannot follow an in-place merge (the source weights now hold the "
                              "merged values); unmerge() first, or merge(in_place=False)")
    twins = adapted.__dict__.get("_generation_twins")
    if twins is None:
        src = adapted.__dict__.get("_source_model")
        if src is None:
            raise GraphAdaptError("this adapted model has no source model to re-capture with a KV cache; "
                                  "build it with graphadapt.apply(model, spec, cache=True)")
        quantize = adapted.__dict__.get("_quantize")
        if has_quantized_weights(adapted) and not quantized_modules(src) and quantize is None:
            # a re-capture of the dense source would decode over the unquantized base, not this model's packed one
            raise GraphAdaptError("generate() re-captures the source model with a KV cache, which would run its dense "
                                  "weights, not this model's quantized base; build the model with "
                                  "graphadapt.apply(model, spec, cache=True, quantize=...) and generate with it")
        layout = kv_layout(src)
        apply = adapted.services.need("recapture", "graphadapt.api.apply")
        try:
            if layout["encoder_decoder"]:
                (enc, enc_kw), (step, step_kw) = seq2seq_views(src, layout)
                twins = [apply(enc, adapted.spec, example_kwargs=enc_kw), apply(step, adapted.spec,
                                                                               example_kwargs=step_kw)]
                twins[1].decoder_cache = dict(layout)
            else:
                twins = [apply(src, adapted.spec, cache=True, **({"quantize": quantize} if quantize else {}))]
        except GraphAdaptError as e:
            raise GraphAdaptError(f"generate() could not re-capture {type(src).__name__} with a KV cache "
                                  f"for this spec: {e}") from e
        mine = {r.target for r in adapted.adapter_records}
        theirs = {r.target for t in twins for r in t.adapter_records}
        if mine != theirs:
            raise GraphAdaptError("the cached capture placed adapters at different sites "
                                  f"({sorted(mine ^ theirs)[:4]}); select sites by role or module path "
                                  "(not by layer index), or for decoder-only models generate with "
                                  "graphadapt.apply(model, spec, cache=True) and train that model")
        if quantize is not None:  # apply(..., quantize=): the twins run this model's packed modules, not copies
            _share_packed(twins, adapted)
        object.__setattr__(adapted, "_generation_twins", twins)
    for twin in twins:
        _sync(twin, adapted)
    return twins


def _share_packed(twins, adapted) -> None:
    from .quantized import PACKED

    mine = {p: m for p, m in adapted.named_modules() if isinstance(m, PACKED)}
    for twin in twins:
        for path, m in list(twin.named_modules()):
            if isinstance(m, PACKED):
                if path not in mine or any(not torch.equal(a, b) for a, b in zip(m.buffers(), mine[path].buffers())):
                    raise GraphAdaptError(f"generate(): the cached capture quantized {path} differently from this "
                                          "model; build it with graphadapt.apply(model, spec, cache=True, quantize=...)")
                parent, _, leaf = path.rpartition(".")
                setattr(twin.get_submodule(parent) if parent else twin, leaf, mine[path])


def _sync(twin, adapted) -> None:
    backups = adapted._merge_state["backups"] if adapted.is_merged else {}
    own = dict(adapted.named_parameters())
    key = _merged_key(twin, adapted, backups, own) if adapted.is_merged else None
    done = twin.__dict__.get("_synced_merge")  # (key, the twin merge it made), or None
    if key is not None and done is not None and done[0] == key and done[1] is twin._merge_state:
        twin.eval()  # merged by us from exactly these tensors: re-folding would give the same weights
        return
    object.__setattr__(twin, "_synced_merge", None)
    if twin.is_merged:
        twin.unmerge()
    for name in [n for n, _ in twin.named_parameters()]:
        p = backups.get(name, own.get(name))
        if p is None:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = twin.get_submodule(owner) if owner else twin
        mod._parameters[leaf] = p
    twin._apply(lambda t: t)  # re-target graph pins if the dtype/device changed
    block = adapted.spec.composition
    if block is not None and type(block).__name__ in ("Route", "MultiTask"):  # keep it (and its adapter_ids/task_ids)
        if twin.spec.composition != block:
            twin.set_active(block)
    else:
        twin.set_active(adapted.active_adapters())
    if adapted.is_merged:
        folded = set(adapted._merge_state["report"].folded)
        names = sorted({r.adapter for r in adapted.adapter_records if r.target in folded}
                       & {r.adapter for r in twin.adapter_records})
        if names:
            twin.merge(names)
            # the tied parameters' requires_grad is ``adapted``'s (its merge froze, its unmerge thaws them): the
            # twin's merge must not freeze them, or unmerging the twin later re-freezes them for good
            for p, flag in twin._merge_state["frozen"]:
                p.requires_grad_(flag)
            twin._merge_state["frozen"] = []
            object.__setattr__(twin, "_synced_merge", (key, twin._merge_state))
    twin.eval()


def _merged_key(twin, adapted, backups, own) -> tuple:
    """What a merged twin's weights are a function of: the adapted model's merge, its active adapters, and
    each tensor the twin ties (identity, storage, dtype, device and in-place version, so an edit re-folds)."""
    tied = []
    for name, _ in twin.named_parameters():
        p = backups.get(name, own.get(name))
        if p is not None:
            tied.append((name, id(p), p.data_ptr(), p.dtype, p.device, p._version))
    return (id(adapted._merge_state), tuple(adapted._merge_state["report"].folded), tuple(adapted.active_adapters()),
            tuple(tied))


def _decoding_graph(cached):
    """What unmerged eval decoding runs: an inference copy of the cached graph (:mod:`graphadapt.inference`: low-rank
    adapters as concatenated GEMMs with the scaling folded in, no dropout), built once and reused while the graph,
    dtype/device, active adapters and every adapter tensor (identity, storage, in-place version) are unchanged —
    an optimizer step or ``load_adapters`` rebuilds it. Merged, training or compiled models decode as they are."""
    records = cached.__dict__.get("adapter_records")
    if not records or cached.training or getattr(cached, "is_merged", True) or compiled_options(cached) is not None:
        return cached
    key = (cached._code, cached._compute_dtype, cached._compute_device,
           tuple((n, id(p), p.data_ptr(), p._version) for n, p in cached.get_submodule(ADAPTERS).named_parameters()),
           tuple(bool(getattr(cached.get_submodule(r.target), "active", True)) for r in records))
    hit = cached.__dict__.get("_decoding_copy")
    if hit is not None and hit[0] == key:
        return hit[1]
    fast = optimize_for_inference(cached)
    if not fast.info["lower_low_rank"]["lowered"] and not fast.info["remove_eval_dropout"]["removed"]:
        fast = cached  # nothing the passes could do: keep the model's own graph
    cached.__dict__["_decoding_copy"] = (key, fast)
    return fast


# --------------------------------------------------------------------------- generate
def _generation_config(model):
    """The source model's ``generation_config`` (else its config): default eos/pad ids, as transformers."""
    if isinstance(model, tuple):
        model = model[-1]
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
             num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float | None = None,
             early_stopping: bool | str | None = None, output_scores: bool = False,
             adapter_ids: torch.Tensor | None = None, task_ids: torch.Tensor | list | None = None,
             cache_implementation: str | None = None):
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
    ``num_beams > 1``: beam search as transformers runs it (``length_penalty`` and
    ``early_stopping`` default to the generation config: 1.0 and ``False``; ``True``/``False``/
    ``"never"``), returning the best ``num_return_sequences`` per prompt (``[B * n, …]``); the flat
    cache is reordered by beam each step.
    ``adapter_ids`` (a model whose active block is ``Route``): one id per prompt row (``-1``: base model); beams
    and returned sequences of a prompt inherit its id. ``task_ids`` likewise for a model whose active block is
    ``MultiTask`` (one task id or task name per prompt row).
    ``output_scores=True`` also returns the per-step logits ``[new, B, V]`` (before warping), or with
    beams the final beam scores ``[B * num_return_sequences]`` (transformers' ``sequences_scores``).
    ``cache_implementation="static"`` (decoder-only, ``num_beams=1``): decode steps after the prefill write into a
    preallocated cache of ``prompt + max_new_tokens`` slots in place and run one fixed-shape graph per step
    (compiled once under ``adapted.compile()``); ``None`` / ``"dynamic"``: the cache grows by one column a step.
    """
    if cache_implementation not in (None, "dynamic", "static"):
        raise GraphAdaptError(f"cache_implementation must be None, 'dynamic' or 'static', got {cache_implementation!r}")
    static = cache_implementation == "static"
    src_cfg = (model[-1] if isinstance(model, tuple) else model).__dict__.get("source_config")
    if static and (num_beams > 1 or getattr(src_cfg, "is_encoder_decoder", False)):
        raise GraphAdaptError("cache_implementation='static' decodes decoder-only models with num_beams=1; "
                              "leave cache_implementation out for beam search and encoder-decoder models")
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams)
    _check_beam_args(num_beams, num_return_sequences, do_sample, early_stopping)
    input_ids, attention_mask = check_generate(model, input_ids, attention_mask, max_new_tokens)  # graphadapt.contract
    # a tuple of prepared twins (e.g. dtype-converted copies, as the ONNX verification builds) is taken as is
    twins = list(model) if isinstance(model, tuple) else generation_twins(model)
    cached = _decoding_graph(twins[-1])
    layout = cached.decoder_cache
    seq2seq = bool(layout.get("encoder_decoder"))
    if static and (seq2seq or num_beams > 1):
        raise GraphAdaptError("cache_implementation='static' decodes decoder-only models with num_beams=1; "
                              "leave cache_implementation out for beam search and encoder-decoder models")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise GraphAdaptError("input_ids must be an integer tensor [batch, prompt_length]")
    if input_ids.shape[1] == 0:
        raise GraphAdaptError("input_ids needs at least one prompt token per sequence")
    dev, dt = cached._compute_device, cached._compute_dtype
    ids = input_ids.to(dev).contiguous()  # a sliced prompt would fail the compiled graph's stride guards
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev).long().contiguous()
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
    routed = routing_input(getattr(cached, "input_names", None))
    if routed == TASK_INPUT:
        if adapter_ids is not None:
            raise GraphAdaptError("adapter_ids is for a Route model; this model's block is MultiTask: pass task_ids")
        block = cached.spec.composition
        task_ids = coerce_task_ids(task_ids, block.children)
        check_task_ids(task_ids, block.children, ids.shape[0])
        route = {TASK_INPUT: task_ids.to(dev)}
    elif task_ids is not None:
        raise GraphAdaptError("task_ids is for a model whose active block is MultiTask (set_active(ga.MultiTask(...)));"
                              " this model does not route rows by task: leave task_ids out")
    elif routed == ROUTE_INPUT:
        block = cached.spec.composition
        adapter_ids = coerce_adapter_ids(adapter_ids)
        check_adapter_ids(adapter_ids, len(block.children), ids.shape[0], block.children)
        route = {ROUTE_INPUT: adapter_ids.to(dev)}
    elif adapter_ids is not None:
        raise GraphAdaptError("adapter_ids is for a model whose active block is Route (set_active(ga.Route(...))); "
                              "this model runs one adapter setup for every row: leave adapter_ids out")
    else:
        route = {}
    if num_beams > 1:  # every prompt row repeated num_beams times, as transformers expands before the prefill
        ids, mask = ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
        route = {k: v.repeat_interleave(num_beams, 0) for k, v in route.items()}
    b = ids.shape[0]

    if seq2seq:
        start = decoder_start_token_id
        if start is None:
            cfg = cached.config
            start = getattr(cfg, "decoder_start_token_id", None)
            start = getattr(cfg, "pad_token_id", None) if start is None else start
        if start is None:
            raise GraphAdaptError("pass decoder_start_token_id= (the config has none)")
        with torch.no_grad():
            enc = twins[0](input_ids=ids, attention_mask=mask, **route)["last_hidden_state"]
        stepper = _Seq2SeqStepper(cached, enc, mask, route)
        out_ids = torch.full((b, 1), int(start), dtype=ids.dtype, device=dev)
    elif static:
        stepper = _StaticCausalStepper(cached, mask, route, layout, ids.shape[1] + max_new_tokens)
        out_ids = ids
    else:
        stepper = _CausalStepper(cached, mask, route)
        out_ids = ids
    past = {past_input_name(i, kv): torch.zeros(b, layout["kv_heads"], 0, layout["head_dim"], device=dev, dtype=dt)
            for i in range(layout["num_layers"]) for kv in ("key", "value")}
    if num_beams > 1:
        cfg_lp = getattr(gen_cfg, "length_penalty", None)
        cfg_es = getattr(gen_cfg, "early_stopping", None)
        return _beam_search(stepper, out_ids, past, layout["num_layers"], num_beams, max_new_tokens,
                            num_return_sequences, eos, pad,
                            float(length_penalty if length_penalty is not None else (cfg_lp if cfg_lp is not None
                                                                                     else 1.0)),
                            early_stopping if early_stopping is not None else (cfg_es if cfg_es is not None
                                                                               else False),
                            output_scores)

    eos_t = torch.tensor(eos, device=dev, dtype=ids.dtype)
    step_ids = out_ids
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    scores = []
    for _ in range(max_new_tokens):
        out = stepper(step_ids, past)
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
        if not static:
            past = _presents(out, layout["num_layers"])
        stepper.advance()
        step_ids = nxt[:, None]
    if output_scores:
        return out_ids, torch.stack(scores) if scores else torch.empty(0, b, 0)
    return out_ids


def _presents(out, num_layers: int, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The step's ``present.{i}.key/value`` as the next step's past inputs (rows reordered by ``order``)."""
    return {past_input_name(i, kv): (t if order is None else t.index_select(0, order))
            for i in range(num_layers) for kv in ("key", "value") for t in (out[f"present.{i}.{kv}"],)}


def _step(cached, checked, **inputs):
    """One call of the cached graph. The first step goes through the model's input contract; later steps'
    inputs are built by this loop from the first step's (same names, dtypes and device, one column longer), so
    they run a decode copy of the graph (:func:`graphadapt.kvcache.decode_graph`: no input guards, no pytree
    packing, ATen calls without a Python frame each) or, compiled, the graph's compiled ``forward`` — still under
    the model's read lock. ``checked``: None for the first step, else the step function to run."""
    if checked is None:
        return cached(**inputs)
    with reading(cached):
        return checked(**inputs)


class _Scratch(dict):
    """Per-model decoding state (step functions bound to the model, static cache buffers): a copy or a pickle of the
    model starts without it (its functions would run the original model)."""

    def __deepcopy__(self, memo):
        return _Scratch()

    def __reduce__(self):
        return _Scratch, ()


def _scratch(cached) -> _Scratch:
    held = cached.__dict__.get("_decoding_scratch")
    if held is None:
        held = cached.__dict__["_decoding_scratch"] = _Scratch()
    return held


def _eager_fns(cached) -> dict:
    """Decode functions of ``cached``'s current graph, built once per graph (keyed by its generated code)."""
    scratch = _scratch(cached)
    fns = scratch.get("fns")
    key = (cached._code, id(cached))
    if fns is None or fns[0] != key:
        fns = scratch["fns"] = (key, {})
    return fns[1]


def _dynamic_step(cached):
    """What decode steps after the first call: the compiled ``forward`` when compiled, else the eager decode copy
    (outputs as a dict, like the model's); the model's own ``forward`` if the graph has no decode copy."""
    if compiled_options(cached) is not None:
        return lambda **inputs: cached.forward(**inputs, **cached.constant_inputs)
    fns = _eager_fns(cached)
    fn = fns.get("dynamic")
    if fn is None:
        try:
            graph, names = decode_graph(cached, cached.decoder_cache["num_layers"])
            raw = bind_graph(cached, graph, fast=True)

            def fn(**inputs):
                return dict(zip(names, raw(**inputs)))
        except CaptureError:  # an unusual cached graph: run it as it is
            def fn(**inputs):
                return cached.forward(**inputs, **cached.constant_inputs)
        fns["dynamic"] = fn
    return fn


def _static_graph(cached, *, fast: bool):
    try:
        graph, _ = decode_graph(cached, cached.decoder_cache["num_layers"], static=True)
    except CaptureError as e:
        raise GraphAdaptError(f"cache_implementation='static' cannot rewrite this cached graph: {e}") from e
    return bind_graph(cached, graph, fast=fast)


def _static_step(cached):
    """The fixed-shape decode step over a preallocated cache (:func:`graphadapt.kvcache.decode_graph` with
    ``static=True``): compiled once per graph with the model's compile options (shapes static) when the model is
    compiled, else the eager decode copy. Returns ``fn(**inputs) -> logits``."""
    compiled = static_step(cached, lambda m: _static_graph(m, fast=False))
    if compiled is not None:
        return compiled
    fns = _eager_fns(cached)
    fn = fns.get("static")
    if fn is None:
        raw = _static_graph(cached, fast=True)

        def fn(**inputs):
            return raw(**inputs)[0]
        fns["static"] = fn
    return fn


class _CausalStepper:
    """One decoder-only step: mask grows by one column, positions ``cumsum(mask) - 1`` as transformers."""

    def __init__(self, cached, mask, route=None):
        self.cached, self.mask, self.route, self.checked = cached, mask, route or {}, None
        self.pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def __call__(self, step_ids, past):
        out = _step(self.cached, self.checked, input_ids=step_ids, attention_mask=self.mask, position_ids=self.pos,
                    **past, **self.route)
        if self.checked is None:
            self.checked = _dynamic_step(self.cached)
        return out

    def advance(self):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos[:, -1:] + 1


class _StaticCausalStepper:
    """Prefill with the dynamic graph (through the input contract), then every step over a static cache: the
    prefill's keys/values copied into ``[B, kv_heads, L, head_dim]`` buffers (kept on the model and reused by
    later calls of the same batch, dtype and device with ``L`` large enough), a ``[B, L]`` mask with one more
    slot set per step, and the step graph writing the new token's keys/values at ``cache_position``."""

    def __init__(self, cached, mask, route, layout, total: int):
        self.cached, self.mask, self.route, self.layout, self.total = cached, mask, route or {}, layout, total
        self.pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.cur, self.step, self.held = mask.shape[1] - 1, None, None

    def _buffers(self, b, dev, dt):
        lay, total = self.layout, self.total
        held = _scratch(self.cached).get("static_cache")
        if held is not None and held["batch"] == b and held["device"] == dev and held["dtype"] == dt and \
                held["length"] >= total:
            for t in held["past"].values():
                t.zero_()
            held["mask"].zero_()
            return held
        past = {past_input_name(i, kv): torch.zeros(b, lay["kv_heads"], total, lay["head_dim"], device=dev, dtype=dt)
                for i in range(lay["num_layers"]) for kv in ("key", "value")}
        held = {"batch": b, "device": dev, "dtype": dt, "length": total, "past": past,
                "mask": torch.zeros(b, total, dtype=torch.long, device=dev),
                "position": torch.zeros(1, dtype=torch.long, device=dev)}
        _scratch(self.cached)["static_cache"] = held
        return held

    def __call__(self, step_ids, past):
        if self.step is None:  # the prefill: the dynamic graph over an empty past, through the input contract
            out = _step(self.cached, None, input_ids=step_ids, attention_mask=self.mask, position_ids=self.pos,
                        **past, **self.route)
            first = out["present.0.key"]
            held = self._buffers(first.shape[0], first.device, first.dtype)
            t0 = self.mask.shape[1]
            for i in range(self.layout["num_layers"]):
                for kv in ("key", "value"):
                    held["past"][past_input_name(i, kv)][:, :, :t0].copy_(out[f"present.{i}.{kv}"])
            held["mask"][:, :t0].copy_(self.mask)
            self.held, self.pos = held, self.pos[:, -1:].contiguous()  # the same strides every step (no recompile)
            self.step = _static_step(self.cached)
            return out
        held = self.held
        held["mask"][:, self.cur] = 1
        held["position"].fill_(self.cur)
        with reading(self.cached):
            logits = self.step(input_ids=step_ids, attention_mask=held["mask"], position_ids=self.pos,
                               **held["past"], cache_position=held["position"], **self.route)
        return {"logits": logits}

    def advance(self):
        self.cur += 1
        self.pos = self.pos + 1


class _Seq2SeqStepper:
    """One decoder step of an encoder-decoder LM over a fixed encoder output and mask."""

    def __init__(self, cached, enc, mask, route=None):
        self.cached, self.enc, self.mask, self.route, self.checked = cached, enc, mask, route or {}, None

    def __call__(self, step_ids, past):
        out = _step(self.cached, self.checked, decoder_input_ids=step_ids, encoder_hidden_states=self.enc,
                    attention_mask=self.mask, **past, **self.route)
        if self.checked is None:
            self.checked = _dynamic_step(self.cached)
        return out

    def advance(self):
        pass


def _check_beam_args(num_beams, num_return_sequences, do_sample, early_stopping):
    if not isinstance(num_beams, int) or num_beams < 1:
        raise GraphAdaptError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or not 1 <= num_return_sequences <= num_beams:
        raise GraphAdaptError(f"num_return_sequences must be an int in [1, num_beams={num_beams}], "
                              f"got {num_return_sequences!r}")
    if num_beams > 1 and do_sample:
        raise GraphAdaptError("beam sampling (num_beams > 1 with do_sample=True) is not implemented; "
                              "use num_beams=1 to sample, or do_sample=False for beam search")
    if early_stopping not in (None, True, False, "never"):
        raise GraphAdaptError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def _beam_search(stepper, prompt, past, num_layers, num_beams, max_new_tokens, num_return, eos, pad,
                 length_penalty, early_stopping, output_scores):
    """Beam search over the flat cache, step for step as transformers' vectorised ``_beam_search``.

    ``prompt`` is ``[B * num_beams, T]`` (each prompt repeated); every step keeps the best
    ``max(2, 1 + len(eos)) * num_beams`` continuations per prompt, moves those ending in eos (or at
    the length limit) among the top ``num_beams`` to the finished set (scored with the length
    penalty), continues the best unfinished ``num_beams`` and gathers the cache rows of their parents.
    """
    dev = prompt.device
    bk, t0 = prompt.shape
    b, k = bk // num_beams, num_beams
    max_len = t0 + max_new_tokens
    if max_new_tokens == 0:
        out = prompt.view(b, k, t0)[:, :num_return].reshape(b * num_return, t0)
        return (out, torch.zeros(b * num_return, device=dev)) if output_scores else out
    keep = max(2, 1 + len(eos)) * k
    top_mask = torch.arange(keep, device=dev) < k
    fill = (pad if pad else eos[0]) if eos else -1  # transformers: `pad or eos[0]` (a pad id of 0 counts as unset)
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
    running = torch.full((b, k, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :t0] = prompt.view(b, k, t0)
    finished_seqs = running.clone()
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = -1e9  # only the first copy of each prompt seeds the beams
    fin_scores = torch.full((b, k), -1e9, device=dev)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    run_parent = torch.full((b, k, max_new_tokens), -1, dtype=torch.int32, device=dev)
    fin_parent = run_parent.clone()
    offset = torch.arange(b, device=dev).view(-1, 1) * k
    cur, step_ids = t0, prompt

    def take(x, idx):
        while idx.dim() < x.dim():
            idx = idx.unsqueeze(-1)
        return torch.take_along_dim(x, idx, dim=1)

    while True:
        out = stepper(step_ids, past)
        logp = torch.log_softmax(out["logits"][:, -1, :].float(), dim=-1)
        vocab = logp.shape[-1]
        logp = (logp.view(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
        cand_scores, cand = torch.topk(logp, keep)
        parent = cand // vocab
        cand_parent = take(run_parent, parent)
        cand_seqs = take(running, parent)
        token = cand % vocab
        cand_seqs[:, :, cur] = token
        cand_parent[:, :, cur - t0] = parent + offset
        stop = torch.isin(token, eos_t) | (cur + 1 >= max_len)

        # the best num_beams candidates that did not stop continue
        live = cand_scores + stop.to(torch.float32) * -1.0e9
        nxt = torch.topk(live, k)[1]
        running, run_scores, run_parent = take(cand_seqs, nxt), take(live, nxt), take(cand_parent, nxt)

        # candidates among the top num_beams that stopped compete with the finished set
        done_now = stop & top_mask[None, :]
        scored = cand_scores / ((cur + 1 - t0) ** length_penalty)
        scored = scored + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * -1.0e9
        scored = scored + (~improvable).to(torch.float32) * -1.0e9
        scored = scored + (~done_now) * -1.0e9
        best = torch.topk(torch.cat([fin_scores, scored], 1), k)[1]
        finished_seqs = take(torch.cat([finished_seqs, cand_seqs], 1), best)
        fin_scores = take(torch.cat([fin_scores, scored], 1), best)
        fin_parent = take(torch.cat([fin_parent, cand_parent], 1), best)
        is_finished = take(torch.cat([is_finished, done_now], 1), best)

        past = _presents(out, num_layers, run_parent[..., cur - t0].reshape(-1).long())
        cur += 1
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        hyp_len = (max_len if early_stopping == "never" and length_penalty > 0.0 else cur) - t0
        best_running = run_scores[:, :1] / (hyp_len ** length_penalty)
        worst_done = torch.where(is_finished, fin_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(is_finished.all()) and early_stopping is True)
                and not bool(stop.all())):
            break
        stepper.advance()
        step_ids = running[:, :, cur - 1].reshape(bk, 1)

    seqs = finished_seqs[:, :num_return].reshape(b * num_return, max_len)
    parents = fin_parent[:, :num_return].reshape(b * num_return, max_new_tokens)
    out_len = t0 + int((parents + 1).bool().sum(1).max())
    seqs = seqs[:, :out_len]
    if output_scores:
        return seqs, fin_scores[:, :num_return].reshape(-1)
    return seqs

