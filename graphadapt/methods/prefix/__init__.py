"""Prefix tuning as a method plugin: spec (:mod:`.spec`), modules (:mod:`.module`), AdapterHub and PEFT
interop (:mod:`.interop`), and the registry entry below. Site kind ``attention``
(:mod:`graphadapt.sites.attention`).

before: ``o = attention(q, k, v, mask)``
after:  ``o = attention(q, [P_k; k], [P_v; v], [attend-to-prefix; mask])`` at every selected core, with
        ``P`` from ``adapters.<name>.prefix`` (one call per forward) and the per-core module
        ``adapters.<name>.<layer path>.<location>`` (gate, GQA repeat, mask padding).
Not mergeable; :func:`eject_prefix` swaps the reparametrisation for its output (identical outputs).
"""

from __future__ import annotations

from graphadapt.errors import GraphAdaptError, SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.sites.attention import insert_position_offset
from graphadapt.vocab import SiteKind, adapter_prefix, adapter_target

from . import interop as _io
from .module import FlatPrefix, PositionOffset, PrefixAttention, PrefixGenerator, PrefixPool
from .spec import PrefixTuning

POOL = "prefix"


@register
class PrefixTuningMethod(Method):
    name = "prefix_tuning"
    spec_class = PrefixTuning
    site_kind = SiteKind.ATTENTION
    peft_type = "PREFIX_TUNING"
    adapterhub_architectures = ("prefix_tuning",)

    def build_pool(self, spec: PrefixTuning, adapter: str, sites, seed: int, ref) -> PrefixPool:
        gens = {}
        for loc in dict.fromkeys(s.location for s in sites):
            at = [s for s in sites if s.location == loc]
            shapes = {(s.num_kv_heads, s.head_dim, s.hidden_size) for s in at}
            if len(shapes) != 1:
                raise SpecError(f"adapter {adapter!r}: the {loc} attention cores differ in key/value heads, head "
                                f"size or width {sorted(shapes)}; one prefix module cannot serve them", field="method")
            heads, head_dim, hidden = shapes.pop()
            g = adapter_generator(seed, adapter, f"{POOL}.{loc}")
            kw = {"generator": g, "dtype": ref.dtype, "device": ref.device}
            gens[loc] = (FlatPrefix(spec.prefix_length, len(at), heads, head_dim, **kw) if spec.flat else
                         PrefixGenerator(spec.prefix_length, hidden, spec.bottleneck_size, len(at), heads, head_dim,
                                         spec.non_linearity, **kw))
        return PrefixPool(gens)

    def prepare(self, gm, adapter, spec: PrefixTuning, sites, seed):
        if spec.use_gating and any(s.block.q is None for s in sites):
            raise SpecError(f"adapter {adapter!r}: use_gating needs each attention block's input (its q "
                            "projection), which was not recognised", field="use_gating")
        return {"ref": gm.get_parameter(sites[0].block.k.weight)}

    def attention_pool(self, gm, adapter, spec: PrefixTuning, sites, seed, ref=None):
        return POOL, self.build_pool(spec, adapter, sites, seed, ref)

    def after_insert(self, gm, ctx, adapter, spec: PrefixTuning, seed):
        if not spec.position_offset:
            return []
        return insert_position_offset(gm, adapter, self.name, adapter_target(adapter, "positions"),
                                      PositionOffset(spec.prefix_length)).records

    def build(self, spec: PrefixTuning, adapter, site, seed, facts=None, ref=None):
        facts = facts or {}
        return PrefixAttention(
            site.index, spec.prefix_length, n_rep=facts.get("n_rep", 1), mask_kinds=facts.get("mask_kinds", ()),
            dropout=spec.dropout, gate_outputs=(1 if spec.shared_gating else 2) if spec.use_gating else 0,
            hidden=site.hidden_size, generator=adapter_generator(seed, adapter, site.name),
            dtype=ref.dtype, device=ref.device)

    # -- interop
    def adapterhub_spec(self, config):
        return _io.spec_from_adapterhub(config)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _io.load_adapterhub(adapted, adapter, saved_name, state_dict, strict, directory)

    def peft_read(self, model, config, weights, name, directory):
        return _io.read_peft_prefix(model, config, weights, name, directory)


def eject_prefix(adapted, name: str | None = None) -> int:
    """Replace the reparametrisation MLP of prefix adapter ``name`` (every adapter when None; unions
    included) by its output — a directly stored prefix — for inference. Outputs are unchanged; the MLP's
    parameters are gone (save the adapter first if you want to keep training it). Returns how many
    prefix modules were ejected. The adapter's spec becomes ``flat=True``, so ``save_adapters`` → ``load``
    rebuilds the ejected form."""
    if getattr(adapted, "is_merged", False):
        raise GraphAdaptError("unmerge() before eject_prefix()")
    if name is not None and name not in adapted.spec.adapters:
        raise GraphAdaptError(f"unknown adapter {name!r}; this model has {list(adapted.spec.adapters)}")
    prefix = adapter_prefix(name)
    done = {}
    for mname, mod in adapted.named_modules():
        if isinstance(mod, PrefixPool) and mname.startswith(prefix):
            done[mname.split(".")[1]] = done.get(mname.split(".")[1], 0) + mod.eject()
    changed = {n: _flat_spec(adapted.spec.adapters[n]) for n, k in done.items() if k}
    if changed:  # the spec follows the modules, so save_adapters → load rebuilds the ejected form
        from graphadapt.spec import Spec

        old = adapted.spec
        adapted.spec = Spec({n: changed.get(n, s) for n, s in old.adapters.items()}, active=old.active,
                            seed=old.seed)
    return sum(done.values())


def _flat_spec(spec):
    if isinstance(spec, PrefixTuning):
        return spec.replace(flat=True)
    members = getattr(spec, "members", None)
    if members is not None:
        return type(spec)(members=tuple(_flat_spec(m) for m in members), seed=spec.seed)
    return spec


__all__ = ["FlatPrefix", "PositionOffset", "PrefixAttention", "PrefixGenerator", "PrefixPool", "PrefixTuning", "PrefixTuningMethod",
           "eject_prefix"]
