"""LN tuning as a method plugin (site kind ``parameter``): spec (:mod:`.spec`), module (:mod:`.module`).

before: ``norm(x; γ, β)``  →  after: ``norm(x; γ', β')`` with trainable copies, at every norm the graph pattern
finds (or those ``targets`` selects). PEFT import: ``LN_TUNING`` (``<path>.ln_tuning_layers.{weight,bias}``).
"""

from __future__ import annotations

from graphadapt.errors import SpecError
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.sites.parameter import ParameterSite
from graphadapt.vocab import SiteKind

from ..transforms import refuse_peft_options
from .module import LNTuningModule
from .spec import LNTuning

def norm_sites(gm, spec: LNTuning, adapter: str) -> list[ParameterSite]:
    """Every normalisation node of the graph with a weight parameter (pattern match), grouped by module."""
    from graphadapt.structure.patterns import norm_match

    seen: dict[str, ParameterSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        m = norm_match(node)
        if not m:
            continue
        norm = m.value
        if norm.weight is None:
            continue
        path = norm.weight.rpartition(".")[0]
        if path in seen or not spec.selects(path):
            continue
        params = [(norm.weight, norm.weight.rpartition(".")[2])]
        if norm.bias is not None:
            params.append((norm.bias, norm.bias.rpartition(".")[2]))
        seen[path] = ParameterSite(name=path, params=tuple(params), role=norm.kind)
    if not seen:
        what = f"matching {list(spec.targets)}" if spec.targets else "with a weight"
        raise SpecError(f"adapter {adapter!r}: no normalisation {what} found in the graph (layer_norm, rms_norm or "
                        "the decomposed RMSNorm pattern); see graphadapt inspect", field="targets")
    return list(seen.values())


@register
class LNTuningMethod(Method):
    name = "ln_tuning"
    spec_class = LNTuning
    site_kind = SiteKind.PARAMETER
    peft_type = "LN_TUNING"

    def parameter_sites(self, gm, sm, spec, adapter):
        return norm_sites(gm, spec, adapter)

    def build(self, spec, adapter, site, seed, params=None, **extra):
        return LNTuningModule(params)   # copies of the base weights: no random draw

    def peft_spec(self, config, targets):
        refuse_peft_options("LN_TUNING", config)
        return LNTuning(targets=targets)

    def peft_key(self, key):
        # ``<path>.ln_tuning_layers[.<adapter>].<weight|bias>``
        parts = key.split(".ln_tuning_layers.")
        if len(parts) != 2:
            return None
        path = parts[0].removeprefix("base_model.model.")
        leaf = parts[1].rpartition(".")[2]
        return path, leaf


__all__ = ["LNTuning", "LNTuningMethod", "LNTuningModule"]
