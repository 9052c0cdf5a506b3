"""Insert adapter modules at attention cores (methods that change what attention attends to).

before (SDPA):  ``o = sdpa(q, k, v, mask[, is_causal])``
before (eager): ``s = matmul(q, kᵀ) → (scale, + mask/bias) → softmax → (dropout) → matmul(·, v)``
after:          ``k', v', mask'… = call_module(adapters.<name>.<layer>.<loc>)(kv, k, v, x, q, [mask…])``
                and the core reads ``k'``, ``v'`` and the new masks; ``is_causal`` becomes an explicit mask.

``kv`` is the output of one shared module (``adapters.<name>.prefix``, called once at the graph's
start) for the core's *location* (AdapterHub's words: ``self_prefix``; ``encoder_prefix`` for the
encoder of an encoder-decoder model; ``cross_prefix``); ``x`` is the attention block's input
hidden states (for gates), ``q`` the core's query. Masks are listed with their kind so the module
pads them for whatever it prepends: ``"bool"`` (True attends), ``"additive"`` (0 attends) or
``"fill"`` (``masked_fill`` mask: False attends). ``k``/``v`` are in the layout the core reads
(``[B, H, T, d]``, after GQA's repeat; ``n_rep`` says how many query heads share a key/value head).
What the module computes is the method's business; this pass does *where*.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import SpecError
from ..passes import AdapterRecord, InsertContext, PassResult, annotate, submodule_or_none
from ..composition.site import AttentionComposition, Leaf, SplitNode, attention_refusal
from ..structure.types import AttentionBlock, Layer, StructureMap
from ..vocab import ADAPTERS, CombinePolicy, SiteKind, adapter_target
from .base import SiteKindPlugin, register_site_kind

KIND = SiteKind.ATTENTION

aten = torch.ops.aten
_MATMUL = {aten.matmul.default, aten.bmm.default}
_PASS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default, aten.contiguous.default,
         aten.alias.default, aten.type_as.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}


@dataclass
class AttentionSite:
    """One attention core an adapter acts on."""

    layer: Layer
    block: AttentionBlock
    location: str              # self_prefix | encoder_prefix | cross_prefix
    index: int                 # position among the selected cores of this location (graph order)
    num_kv_heads: int
    head_dim: int
    hidden_size: int           # width of the block's input hidden states

    @property
    def name(self) -> str:
        return f"{self.layer.module_path or f'layer{self.layer.index}'}.{self.location}"


@dataclass
class _Rewire:
    """Where the core reads k, v and masks, found before anything changes."""

    k: fx.Node
    v: fx.Node
    q: fx.Node
    set_k: Callable[[fx.Node], None]
    set_v: Callable[[fx.Node], None]
    masks: list[tuple[fx.Node, str, Callable[[fx.Node], None]]] = field(default_factory=list)
    causal: bool = False
    anchor: fx.Node | None = None
    commit: Callable[[], None] = lambda: None
    """Changes to the core that wiring makes (``is_causal`` → False); finding the inputs changes nothing."""


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def locations_of(sm: StructureMap) -> dict[int, tuple[str, ...]]:
    """Layer index → locations of its attention blocks (self/encoder first, then cross)."""
    enc_dec = any(layer.cross_attention is not None for layer in sm.layers)
    with_cross = {layer.stack for layer in sm.layers if layer.cross_attention is not None}
    out = {}
    for layer in sm.layers:
        first = "encoder_prefix" if enc_dec and layer.stack not in with_cross else "self_prefix"
        out[layer.index] = (first, "cross_prefix") if layer.cross_attention is not None else (first,)
    return out


def select_attention_sites(sm: StructureMap, locations: tuple[str, ...], includes_layer: Callable[[int], bool],
                           adapter_name: str, method_label: str) -> list[AttentionSite]:
    """The attention cores at ``locations`` in the layers ``includes_layer`` accepts (SpecError if none)."""
    out: list[AttentionSite] = []
    count: dict[str, int] = {}
    for layer in sm.layers:
        if not includes_layer(layer.index):
            continue
        for loc, blk in zip(locations_of(sm)[layer.index], (layer.attention, layer.cross_attention)):
            if loc not in locations or blk is None:
                continue
            if blk.k is None or blk.v is None:
                raise SpecError(
                    f"adapter {adapter_name!r}: layer {layer.index}'s attention has no recognised key/value "
                    f"projection (fused head-interleaved QKV?); {method_label} needs them to size its prefix. "
                    "Use LoRA on this model.", field="method")
            head_dim = None
            if blk.num_kv_heads:
                head_dim = blk.k.out_features // blk.num_kv_heads
            elif blk.form == "sdpa" and _val(blk.core.args[0]) is not None:
                head_dim = int(_val(blk.core.args[0]).shape[-1])
            if not head_dim or blk.k.out_features % head_dim:
                raise SpecError(f"adapter {adapter_name!r}: cannot tell the head size of layer {layer.index}'s "
                                "attention from the graph", field="method")
            hidden = blk.q.in_features if blk.q is not None else blk.k.in_features
            out.append(AttentionSite(layer, blk, loc, count.get(loc, 0), blk.k.out_features // head_dim,
                                     head_dim, hidden))
            count[loc] = count.get(loc, 0) + 1
    if not out:
        raise SpecError(
            f"adapter {adapter_name!r}: no attention core found at {list(locations)} in the selected layers "
            f"(model has {len(sm.layers)} recognised layers); see `graphadapt inspect`.", field="layers")
    return out


# ------------------------------------------------------------------ finding the core's inputs
def _set_arg(node: fx.Node, i: int):
    def set_(new):
        args = list(node.args)
        args[i] = new
        node.args = tuple(args)
    return set_


def _set_kwarg(node: fx.Node, key: str):
    def set_(new):
        node.kwargs = {**node.kwargs, key: new}
    return set_


def _sdpa(core: fx.Node) -> _Rewire:
    r = _Rewire(k=core.args[1], v=core.args[2], q=core.args[0], set_k=_set_arg(core, 1), set_v=_set_arg(core, 2),
                anchor=core)
    mask, set_mask = None, None
    if len(core.args) > 3:
        mask, set_mask = core.args[3], _set_arg(core, 3)
    elif "attn_mask" in core.kwargs:
        mask, set_mask = core.kwargs["attn_mask"], _set_kwarg(core, "attn_mask")
    causal = core.args[5] if len(core.args) > 5 else core.kwargs.get("is_causal", False)
    if isinstance(mask, fx.Node):
        val = _val(mask)
        r.masks.append((mask, "bool" if val is not None and val.dtype == torch.bool else "additive", set_mask))
    if causal:
        r.causal = True

        def commit(core=core):
            if len(core.args) > 5:
                _set_arg(core, 5)(False)
            else:
                core.kwargs = {**core.kwargs, "is_causal": False}
        r.commit = commit
        if mask is None:  # the module returns the explicit causal mask (+ prefix) as an extra output
            def set_mask(new, core=core):
                if len(core.args) > 3:
                    _set_arg(core, 3)(new)
                else:
                    core.kwargs = {**core.kwargs, "attn_mask": new}
            r.masks.append((None, "bool", set_mask))
    return r


def _eager(blk: AttentionBlock, where: str) -> _Rewire:
    sm, pv = blk.softmax, blk.core
    order = {n: i for i, n in enumerate(sm.graph.nodes)}
    chain, n = [], sm.args[0]
    for _ in range(16):
        if _is(n, _MATMUL):
            break
        if not _is(n, _ADD | _SCALE | _FILL | _PASS):
            raise SpecError(f"attention at {where}: eager scores pass through {getattr(n, 'target', n)}, which the "
                            "attention pass cannot extend for prepended keys", field="method")
        chain.append(n)
        cands = [a for a in n.all_input_nodes if a.op == "call_function"]
        mm = [a for a in cands if _is(a, _MATMUL)]
        n = mm[0] if mm else (max(cands, key=lambda a: order[a]) if cands else None)
    qk = n
    if not _is(qk, _MATMUL):
        raise SpecError(f"attention at {where}: QKᵀ matmul not found before the softmax", field="method")
    kt = qk.args[1]
    if not (_is(kt, {aten.transpose.int}) and sorted(a % 4 for a in kt.args[1:3]) == [2, 3]):
        raise SpecError(f"attention at {where}: the key enters QKᵀ as {getattr(kt, 'target', kt)}, not a transpose "
                        "of the last two dims; this eager layout is not supported", field="method")
    r = _Rewire(k=kt.args[0], v=pv.args[1], q=qk.args[0], set_k=_set_arg(kt, 0), set_v=_set_arg(pv, 1),
                anchor=kt)
    on_path = set(chain) | {qk}
    for c in chain:
        for i, a in enumerate(c.args):
            if not isinstance(a, fx.Node) or a in on_path:
                continue
            val = _val(a)
            if val is None or val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
                continue  # scalars and operands broadcast along the key axis need nothing
            if _is(c, _ADD):
                r.masks.append((a, "additive", _set_arg(c, i)))
            elif _is(c, _FILL) and i == 1:
                r.masks.append((a, "fill", _set_arg(c, i)))
            else:
                raise SpecError(f"attention at {where}: operand {a.name} of {c.target} spans the key axis; the "
                                "attention pass cannot extend it", field="method")
    return r


def _rewire_plan(site: AttentionSite) -> _Rewire:
    blk = site.block
    where = f"layer {site.layer.index} ({site.location})"
    return _sdpa(blk.core) if blk.form == "sdpa" else _eager(blk, where)


# ------------------------------------------------------------------ insertion
def insert_attention_adapter(gm: fx.GraphModule, ctx: InsertContext, adapter_name: str, method_name: str,
                             sites: list[AttentionSite], pool_target: str, pool: nn.Module,
                             build: Callable[[AttentionSite, dict], nn.Module]) -> PassResult:
    """Add ``pool`` under ``pool_target`` (called once, at the graph's start; it returns one tensor per
    location, in ``pool.locations`` order) and one ``build(site, facts)`` module per core, which reads the
    pool's tensor for its location and rewrites the core's k, v and masks. ``facts``: ``n_rep``, ``mask_kinds``,
    ``causal``."""
    g = gm.graph
    # re-planning (set_active, add_adapter) keeps the modules already there, trained weights and all
    kept = submodule_or_none(gm, pool_target)
    if kept is not None:
        pool = kept
    else:
        gm.add_submodule(pool_target, pool)
        pool.train(gm.training)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    with g.inserting_after(placeholders[-1] if placeholders else next(iter(g.nodes))):
        pool_node = g.call_module(pool_target, ())
    annotate(pool_node, pool_target.rsplit(".", 1)[-1], KIND)
    per_loc: dict[str, fx.Node] = {}
    with g.inserting_after(pool_node):
        for i, loc in reversed(list(enumerate(pool.locations))):
            per_loc[loc] = g.call_function(operator.getitem, (pool_node, i))
    records: list[AdapterRecord] = []
    for site in sites:
        rw = _rewire_plan(site)
        k, v, q = ctx.live(rw.k), ctx.live(rw.v), ctx.live(rw.q)
        kval = _val(k)
        n_rep = int(kval.shape[1]) // site.num_kv_heads if kval is not None else 1
        if kval is not None and int(kval.shape[1]) % site.num_kv_heads:
            raise SpecError(f"layer {site.layer.index}: the core's key has {kval.shape[1]} heads, not a multiple of "
                            f"the {site.num_kv_heads} key/value heads", field="method")
        blk = site.block
        x = ctx.live(blk.q.input) if blk.q is not None else None
        facts = {"n_rep": n_rep, "mask_kinds": tuple(kind for _, kind, _ in rw.masks), "causal": rw.causal}
        target = adapter_target(adapter_name, site.name)
        mod = submodule_or_none(gm, target)
        if mod is None:
            mod = build(site, facts)
            gm.add_submodule(target, mod)
            mod.train(gm.training)
        if ctx.attaches(adapter_name, site_key(site)):  # else a composition (or the one active adapter) wires it
            _wire(g, ctx, rw, target, (per_loc[site.location], k, v, x, q), site.name)
        records.append(AdapterRecord(adapter=adapter_name, method=method_name, site=site.name, target=target,
                                     kind=KIND, role=site.location, layer=site.layer.index,
                                     index=site.index, form=blk.form))
    _reorder(g)
    return PassResult(gm, bool(sites), {"sites": [s.name for s in sites]}, records)


def _wire(g: fx.Graph, ctx: InsertContext, rw: _Rewire, target: str, args: tuple, label: str) -> None:
    """``k', v', *masks' = call_module(target)(*args, masks)`` before the core, which then reads them."""
    rw.commit()
    masks = [ctx.live(m) if m is not None else None for m, _, _ in rw.masks]
    with g.inserting_before(rw.anchor):
        node = g.call_module(target, (*args, masks))
        annotate(node, label, KIND)
        outs = [g.call_function(operator.getitem, (node, i)) for i in range(2 + len(masks))]
    # the outputs keep the inputs' example values (dtype, heads; only the key length grows), so a later adapter
    # planned at this core (dormant, or re-planned into a composition) reads the same facts as on the base graph
    for i, (out, src) in enumerate(zip(outs, [args[1], args[2], *masks])):
        val = _val(src)
        if val is None and i >= 2 and src is None:  # a causal core's mask, made explicit (boolean) by the module
            val = torch.empty((0, 0), dtype=torch.bool, device="meta")
        if val is not None:
            out.meta["val"] = val
    rw.set_k(outs[0])
    rw.set_v(outs[1])
    for (_, _, set_mask), new in zip(rw.masks, outs[2:]):
        set_mask(new)


def _pool_output(gm: fx.GraphModule, owner: str, location: str) -> fx.Node:
    """The node holding ``owner``'s pool tensor for ``location`` (the pool: the module under ``adapters.<owner>``
    with ``locations``, called once at the graph's start)."""
    prefix = f"{ADAPTERS}.{owner}."
    for n in gm.graph.nodes:
        if n.op != "call_module" or not str(n.target).startswith(prefix):
            continue
        locs = getattr(gm.get_submodule(str(n.target)), "locations", None)
        if locs is None or location not in locs:
            continue
        i = list(locs).index(location)
        hit = next((u for u in n.users if u.target is operator.getitem and u.args[1] == i), None)
        if hit is not None:
            return hit
    raise SpecError(f"adapter {owner!r} has no {location} tensor in the graph to compose", field="active")


def _splits_rows(tree) -> bool:
    """Whether ``tree`` divides the batch (BatchSplit/Parallel): then even a lone prefix reaches only its rows."""
    if isinstance(tree, SplitNode) and tree.axis == 0:
        return True
    return any(_splits_rows(k) for k in getattr(tree, "children", ()) if k is not None)


def compose_attention(gm: fx.GraphModule, ctx: InsertContext, target: str, site: AttentionSite, tree,
                      modules: dict) -> None:
    """Wire one :class:`~graphadapt.composition.site.AttentionComposition` at ``site``'s core."""
    paths = {id(m): p for p, m in gm.named_modules()}
    owners = {n: paths[id(m)].split(".")[1] for n, m in modules.items()}
    kvs = tuple(_pool_output(gm, owners[n], site.location) for n in tree.names)
    rw = _rewire_plan(site)
    k, v, q = ctx.live(rw.k), ctx.live(rw.v), ctx.live(rw.q)
    x = ctx.live(site.block.q.input) if site.block.q is not None else None
    mod = AttentionComposition(tree, modules, tuple(kind for _, kind, _ in rw.masks))
    gm.add_submodule(target, mod)
    _wire(gm.graph, ctx, rw, target, (kvs, k, v, x, q), site.name)
    _reorder(gm.graph)


def _reorder(g: fx.Graph) -> None:
    """Stable topological re-sort: the module call sits before the core, but some of its inputs (the value
    projection, an eager mask operand) may come later in the graph; move them up, keeping the rest in place."""
    order = {n: i for i, n in enumerate(g.nodes)}
    out, done = [], set()
    for n in list(g.nodes):
        stack = [(n, False)]
        while stack:
            m, expanded = stack.pop()
            if m in done:
                continue
            if expanded:
                done.add(m)
                out.append(m)
                continue
            stack.append((m, True))
            for a in sorted(m.all_input_nodes, key=lambda a: -order[a]):
                if a not in done:
                    stack.append((a, False))
    prev = g._root
    for n in out:
        if n.prev is not prev:
            prev.append(n)
        prev = n


_POS_PATH = {aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.expand.default,
             aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.add.Tensor, aten.mul.Tensor,
             aten.matmul.default, aten.bmm.default, aten.transpose.int, aten.cat.default}


def _feeds_positions(n: fx.Node, depth: int = 8) -> bool:
    """Whether ``n`` reaches a position embedding lookup or rotary ``cos``/``sin`` through shape/cast/scale ops."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            for u in f.users:
                if _is(u, {aten.cos.default, aten.sin.default}):
                    return True
                if _is(u, {aten.embedding.default}) and u.args[1] is f:
                    return True
                if _is(u, _POS_PATH):
                    nxt.append(u)
        frontier = nxt
    return False


def insert_position_offset(gm: fx.GraphModule, adapter_name: str, method_name: str, target: str,
                           module: nn.Module) -> PassResult:
    """Route the model's position ids through ``module`` (``adapters.<name>.positions``).

    The position ids are the ``arange(T)`` (+ past length) computed in the graph that feeds the position
    embedding lookup or the rotary ``cos``/``sin`` (HF's ``cache_position``); SpecError unless exactly one
    is found. Used for PEFT's prefix form, where the prefix acts as a KV cache before the real tokens."""
    g = gm.graph
    srcs = []
    for n in g.nodes:
        if not _is(n, {aten.arange.default, aten.arange.start, aten.arange.start_step}):
            continue
        out = n
        if len(n.users) == 1:
            u = next(iter(n.users))
            if _is(u, {aten.add.Tensor}) and u.args[0] is n and not isinstance(u.args[1], fx.Node):
                out = u  # arange(T) + past_length
        if _feeds_positions(out):
            srcs.append(out)
    if len(srcs) != 1:
        raise SpecError(f"adapter {adapter_name!r}: position_offset needs the model's position ids computed in the "
                        f"graph (one arange feeding the position embedding or RoPE); found {len(srcs)}",
                        field="position_offset")
    src = srcs[0]
    gm.add_submodule(target, module)
    with g.inserting_after(src):
        node = g.call_module(target, (src,))
    src.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    annotate(node, "positions", KIND)
    if "val" in src.meta:
        node.meta["val"] = src.meta["val"]
    rec = AdapterRecord(adapter=adapter_name, method=method_name, site="positions", target=target, kind=KIND,
                        role="positions", source=src.name)
    return PassResult(gm, True, {"positions": src.name}, [rec])


def site_key(site: AttentionSite) -> str:
    return site.name


@register_site_kind
class AttentionKind(SiteKindPlugin):
    """Attention cores. The spec says ``locations`` (a subset of ``self_prefix``, ``encoder_prefix``, ``cross_prefix``) and ``includes_layer``.

    Method protocol: ``prepare(gm, adapter, spec, sites, seed) → extra build kwargs``;
    ``attention_pool(gm, adapter, spec, sites, seed, **extra) → (key, module)``: the module called once at
    the graph's start (``adapters.<adapter>.<key>``) returning one tensor per location, in its ``locations``
    order; ``build(spec, adapter, site, seed, facts=…, **extra)`` per core (``facts``: ``n_rep``,
    ``mask_kinds``, ``causal``), a module ``(kv, k, v, x, q, masks) → (k', v', *masks')``; and optionally
    ``after_insert`` (e.g. routing the position ids through a module)."""

    kind = KIND
    phase = 5
    combine = CombinePolicy.EXCLUSIVE

    def select(self, sm, spec, adapter, method):
        return select_attention_sites(sm, spec.locations, spec.includes_layer, adapter, method.label)

    def key(self, site) -> str:
        return site_key(site)

    def refuse_composition(self, site, key, names, tree, describe):
        """Stack, BatchSplit and Parallel compose prefixes as AdapterHub does; its prefix layer defines no other
        block (its ``Average`` raises ``NotImplementedError``), so neither does graphadapt."""
        from ..composition.site import RouteNode

        if isinstance(tree, RouteNode):  # a prefix applied as it is would run on every row, whatever its id
            return super().refuse_composition(site, key, names, tree, describe)
        if len(names) == 1 and not _splits_rows(tree):
            return False  # a lone prefix inside a block that does not divide the batch applies as it is
        why = attention_refusal(tree)
        if why:
            raise SpecError(f"adapters {list(names)} share the attention site {key} inside {describe(tree)}: {why}",
                            field="active")
        return not isinstance(tree, Leaf)

    def compose(self, gm, ctx, target, site, tree, modules, fusion_layer):
        compose_attention(gm, ctx, target, site, tree, modules)
        return site.layer.index, site.location, {}

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)
        key, pool = method.attention_pool(gm, adapter, spec, sites, seed, **extra)
        res = insert_attention_adapter(gm, ctx, adapter, method.name, sites, adapter_target(adapter, key), pool,
                                       lambda site, facts: method.build(spec, adapter, site, seed, facts=facts, **extra))
        res.records.extend(method.after_insert(gm, ctx, adapter, spec, seed))
        return res


__all__ = ["AttentionKind", "AttentionSite", "KIND", "insert_attention_adapter", "insert_position_offset", "locations_of",
           "select_attention_sites", "site_key"]
