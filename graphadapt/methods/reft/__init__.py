"""ReFT (representation fine-tuning) as a method plugin: spec and presets (:mod:`.spec`), module (:mod:`.module`),
AdapterHub interop (:mod:`.adapterhub`), registry entry below. Site kind ``hidden``, point ``layer_output``
(:mod:`graphadapt.sites.hidden`).

before: ``out_i = layer_i(…)``  →  after: ``out_i' = ReftIntervention(out_i, attention_mask)`` (chosen positions only)
Not mergeable (it acts on hidden states at positions, not on a weight); stays in the graph.
"""

from __future__ import annotations

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.vocab import SiteKind

from . import adapterhub as _ah
from .module import ReftIntervention, ReftUnit
from .spec import PRESETS, DiReft, LoReft, NoReft, Reft


@register
class ReftMethod(Method):
    name = "reft"
    spec_class = Reft
    site_kind = SiteKind.HIDDEN
    adapterhub_architectures = ("reft",)

    def points(self, spec: Reft) -> tuple[str, ...]:
        return ("layer_output",)

    def prepare(self, gm, adapter, spec: Reft, sites, seed):
        if spec.orthogonality:
            narrow = [s for s in sites if spec.r >= s.hidden]
            if narrow:
                raise SpecError(f"adapter {adapter!r}: orthogonality needs r < hidden size ({narrow[0].hidden}), got "
                                f"r={spec.r}", field="r")
        ref = next(gm.parameters())
        return {"dtype": ref.dtype, "device": ref.device}

    def build(self, spec: Reft, adapter, site, seed, dtype=None, device=None):
        return ReftIntervention(
            site.hidden, spec.r, spec.prefix_positions, spec.suffix_positions, orthogonal=spec.orthogonality,
            tied_weights=spec.tied_weights, subtract_projection=spec.subtract_projection,
            non_linearity=spec.non_linearity, dropout=spec.dropout,
            generator=adapter_generator(seed, adapter, site.name), dtype=dtype, device=device)

    def adapterhub_spec(self, config):
        return _ah.spec_from_config(config)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _ah.load_weights(adapted, adapter, saved_name, state_dict, strict, directory)


__all__ = ["PRESETS", "DiReft", "LoReft", "NoReft", "Reft", "ReftIntervention", "ReftMethod", "ReftUnit"]
