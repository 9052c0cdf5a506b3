"""Insert an adapter module at the input embeddings ("embedding" sites): methods that add tokens (prompt tuning).

Adding ``P`` tokens to a captured graph changes the sequence length, and every shape, position and mask
computation in the graph was recorded for the input's length ``T``. So the pass makes the whole graph run on
``T + P`` by growing the inputs themselves, and recomputes only the embedding it replaces on the original ones:

before::

    ids, mask ─▶ embeddings(ids) ─▶ S ─▶ layers (positions, mask from T) ─▶ out [B, T, H]

after::

    ids ─▶ M(ids, "pad_ids")   = [0]*P ++ ids     ─┐  every other reader of the inputs (mask building,
    mask ─▶ M(mask, "pad_mask") = [1]*P ++ mask   ─┤  positions, shapes) reads these: T + P everywhere
    ids, mask ─▶ copy of S's input-dependent subgraph on the *original* inputs ─▶ S₀ ─▶ M(S₀, "embed") ─▶ layers
                                                                                 (prompt ++ S₀) ─▶ out [B, P+T, H]

``M`` is one module (the adapter), called at each of those nodes. ``S`` is either the word-embedding lookup
(``aten.embedding(W, input_ids)``: the prompt joins the word embeddings, so the model's position / token-type
embeddings and embedding norm then see ``P + T`` tokens — PEFT's form) or the embedding block's output, the
stream entering the first layer (the prompt is added after positions and norm — AdapterHub's form). Inputs
with a dynamic ``sequence`` axis are grown: ``attention_mask`` with ones (the prompt is always attended),
every other one (``input_ids``, ``token_type_ids``, …) with zeros. The graph's guard module keeps reading the
original inputs. An inactive module passes everything through, so the graph runs on ``T`` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import SpecError
from ..passes import AdapterRecord, PassResult, annotate, erase_dead, submodule_or_none
from ..structure.types import StructureMap
from ..vocab import CombinePolicy, SiteKind, adapter_target
from .base import SiteKindPlugin, register_site_kind

KIND = SiteKind.EMBEDDING
MASK_INPUT = "attention_mask"
IDS_INPUT = "input_ids"
SITE = "embeddings"

aten = torch.ops.aten
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
              aten.contiguous.default, aten.alias.default}


@dataclass(frozen=True)
class EmbeddingSite:
    """Where token-adding adapters go: the word-embedding lookup and the embedding block's output."""

    ids: fx.Node                                # the input_ids placeholder
    lookup: fx.Node                             # aten.embedding(W, input_ids)
    weight: str                                 # qualified name of W (the word embeddings)
    output: fx.Node                             # the stream entering the first layer
    hidden: int                                 # width of the word embeddings
    output_hidden: int                          # width of the first layer's input (differs: ALBERT)
    padded: tuple[tuple[fx.Node, int], ...]     # (sequence input placeholder, fill value)
    name: str = SITE

    def node(self, at: str) -> fx.Node:
        return self.lookup if at == "word_embeddings" else self.output

    def width(self, at: str) -> int:
        return self.hidden if at == "word_embeddings" else self.output_hidden


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def find_embedding_site(gm: fx.GraphModule, sm: StructureMap, adapter: str) -> EmbeddingSite:
    """The token-input embedding site of a captured text model, or a :class:`SpecError` saying what is missing."""
    phs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    ids = phs.get(IDS_INPUT)
    if ids is None:
        raise SpecError(f"adapter {adapter!r}: adding prompt tokens needs a token input named {IDS_INPUT!r}; this "
                        f"graph takes {sorted(phs)}", field="method")
    dims = getattr(gm, "dynamic_dims", {}) or {}
    if dims.get(IDS_INPUT, {}).get(1) != "sequence":
        raise SpecError(f"adapter {adapter!r}: the model was captured with a fixed sequence length, so no tokens "
                        "can be added; apply with dynamic=True", field="method")
    views = {ids}  # the ids, possibly reshaped first (GPT-2: input_ids.view(-1, T))
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SHAPE_OPS and n.args and n.args[0] in views:
            views.add(n)
    lookups = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default
               and len(n.args) >= 2 and n.args[1] in views and getattr(n.args[0], "op", None) == "get_attr"]
    if len(lookups) != 1:
        raise SpecError(f"adapter {adapter!r}: expected one word-embedding lookup of {IDS_INPUT!r} "
                        f"(aten.embedding), found {len(lookups)}", field="method")
    lookup = lookups[0]
    layers = sorted(sm.layers, key=lambda layer: layer.index)
    res = layers[0].attention.residual if layers else None
    if res is None:
        raise SpecError(f"adapter {adapter!r}: no transformer layer with a residual stream was recognised, so the "
                        "embedding output is unknown (see graphadapt inspect)", field="method")
    output = res.stream
    if lookup not in _ancestors(output):
        raise SpecError(f"adapter {adapter!r}: the first layer's input does not come from the {IDS_INPUT!r} "
                        "embeddings", field="method")
    w = getattr_path(gm, str(lookup.args[0].target))
    padded = []
    for name, axes in dims.items():
        if axes.get(1) == "sequence" and name in phs:
            padded.append((phs[name], 1 if name == MASK_INPUT else 0))
    val = output.meta.get("val")
    out_hidden = int(val.shape[-1]) if hasattr(val, "shape") else int(w.shape[-1])
    return EmbeddingSite(ids=ids, lookup=lookup, weight=str(lookup.args[0].target), output=output,
                         hidden=int(w.shape[-1]), output_hidden=out_hidden, padded=tuple(padded))


def getattr_path(gm: nn.Module, name: str):
    obj = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


Builder = Callable[[EmbeddingSite], nn.Module]


def insert_embedding_adapter(gm: fx.GraphModule, ctx, adapter: str, method_name: str, site: EmbeddingSite,
                             at: str, build: Builder) -> PassResult:
    """Install ``build(site)`` as ``adapters.<adapter>.<site>`` and rewire the graph as in the module docstring.

    ``at``: ``"word_embeddings"`` (replace the lookup) or ``"embedding_output"`` (replace the first layer's input).
    """
    target = adapter_target(adapter, site.name)
    mod = submodule_or_none(gm, target)  # re-planning (set_active, add_adapter) keeps the trained module
    if mod is None:
        mod = build(site)
        mod.train(gm.training)
        gm.add_submodule(target, mod)
    graph = gm.graph
    s = ctx.live(site.node(at))
    inputs = {p for p, _ in site.padded}

    # 1. S's input-dependent ancestors, recomputed on the original inputs
    order = {n: i for i, n in enumerate(graph.nodes)}
    anc = _ancestors(s)
    dependent: set[fx.Node] = set()
    for n in sorted(anc, key=order.__getitem__):
        if n in inputs or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(s):
        for n in sorted(dependent - inputs, key=order.__getitem__):
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    copies = set(env.values())
    s0 = env[s]

    # 2. grow every sequence input; its other readers (guards excepted) read the grown one
    last = max((n for n in graph.nodes if n.op == "placeholder"), key=order.__getitem__)
    pads = []
    for p, fill in site.padded:
        with graph.inserting_after(last):
            pad = graph.call_module(target, (p, "pad_mask" if fill == 1 else "pad_ids"))
        annotate(pad, site.name, KIND)
        keep = copies | {pad}
        p.replace_all_uses_with(pad, delete_user_cb=lambda u, keep=keep: u not in keep and not (
            u.op == "call_module" and str(u.target).startswith("_guards")))
        pads.append(pad)
        last = pad

    # 3. the prompt joins the recomputed embeddings
    with graph.inserting_after(s0):
        node = graph.call_module(target, (s0, "embed"))
    annotate(node, site.name, KIND)
    s.replace_all_uses_with(node)
    ctx.replaced[s] = node
    erase_dead(gm, [s])
    record = AdapterRecord(adapter=adapter, method=method_name, site=site.name, target=target, kind=KIND,
                           at=at, weight=site.weight, grown_inputs=tuple(str(p.target) for p, _ in site.padded))
    return PassResult(gm, True, {"site": site.name, "at": at}, [record])


def site_key(site: EmbeddingSite) -> str:
    return site.name


@register_site_kind
class EmbeddingKind(SiteKindPlugin):
    """The input embeddings (one site per model). The spec says ``insert_at`` (``"word_embeddings"`` or
    ``"embedding_output"``). Method protocol: ``prepare(gm, adapter, spec, sites, seed) → extra build kwargs``
    (e.g. the word-embedding weight); ``build(spec, adapter, site, seed, **extra)``: one module called
    ``(t, "pad_ids" | "pad_mask" | "embed")`` at each node this kind rewires."""

    kind = KIND
    phase = 20   # after linear and residual passes: it re-creates the embedding subgraph
    combine = CombinePolicy.EXCLUSIVE

    def select(self, sm, spec, adapter, method):
        nodes = [s.node for s in sm.linear_sites]
        if not nodes:
            raise SpecError(f"adapter {adapter!r}: no linear layers recognised; {method.label} needs a transformer "
                            "with token inputs", field="method")
        return [find_embedding_site(nodes[0].graph.owning_module, sm, adapter)]

    def key(self, site) -> str:
        return site_key(site)

    def refuse_composition(self, site, key, names, tree, describe):
        from ..composition.site import RouteNode

        if len(names) > 1 and not isinstance(tree, RouteNode):
            raise SpecError(f"adapters {list(names)} all add tokens at the input embeddings inside {tree.describe()}; "
                            "AdapterHub 1.3 composes no prompt-tuning adapters (its PromptTuningLayer runs only the "
                            "block's first adapter, adapter_setup.first(), and ignores the others there); graphadapt "
                            "refuses rather than drop some silently: activate at most one of them (AdapterHub's result is "
                            "the block's first adapter if it is one of them, else none)", field="active")
        return super().refuse_composition(site, key, names, tree, describe)

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)
        return insert_embedding_adapter(gm, ctx, adapter, method.name, sites[0], spec.insert_at,
                                        lambda s: method.build(spec, adapter, s, seed, **extra))


__all__ = ["EmbeddingKind", "EmbeddingSite", "KIND", "find_embedding_site", "insert_embedding_adapter", "site_key"]
