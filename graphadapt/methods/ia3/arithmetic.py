"""IA3 adapter arithmetic: PEFT 0.22 ``IA3Model.add_weighted_adapter`` — at each site ``l = Σ w_i l_i`` over the
sources adapting it (each ``l_i`` with its ``alpha`` applied), scaling inputs where the sources do."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from graphadapt.errors import SpecError

from ..task_arithmetic import exact_targets
from .module import IA3Module
from .spec import IA3


def weighted_ia3(sources: list[tuple[str, IA3, dict]], weights: list[float], sites: list[str],
                 options: Mapping[str, Any]):
    """``(spec, fill)`` of the IA3 adapter combining ``sources`` linearly (PEFT defines no other rule for IA3)."""
    ctype = options.get("combination_type", "linear")
    if ctype not in ("linear", None):
        raise SpecError(f"IA3 adapters combine linearly only (PEFT's rule), got combination_type={ctype!r}",
                        field="combination_type")
    feedforward: dict[str, bool] = {}
    for adapter, spec, modules in sources:
        if spec.use_gating:
            raise SpecError(f"add_weighted_adapter cannot combine the gated IA3 {adapter!r}: its gate depends on the "
                            "input", field="adapters")
        for site, m in modules.items():
            if not isinstance(m, IA3Module):
                raise SpecError(f"add_weighted_adapter combines IA3 on linear layers; {adapter!r} adapts the expert "
                                f"weights at {site}", field="adapters")
            if feedforward.setdefault(site, m.feedforward) != m.feedforward:
                raise SpecError(f"the adapters scale the input at {site} in one adapter and the output in another; "
                                "they cannot be combined there", field="adapters")
    first = sources[0][1]
    where = {(s.targets, s.feedforward, s.layers, s.leave_out) for _, s, _ in sources}
    if len(where) == 1:
        targets, ff, layers, leave_out = where.pop()
    else:
        out_sites = [s for s in sites if not feedforward[s]]
        ff_sites = [s for s in sites if feedforward[s]]
        ff = exact_targets(ff_sites) if ff_sites else ()
        targets = (exact_targets(out_sites) if out_sites else ()) + ff
        layers, leave_out = None, ()
    spec = dataclasses.replace(first, targets=targets, feedforward=ff, layers=layers, leave_out=leave_out,
                               alpha=1.0, init_ia3_weights=True)

    @torch.no_grad()
    def fill(new_modules: Mapping[str, IA3Module]) -> None:
        for site in sites:
            target = new_modules[site]
            target.ia3_l.zero_()
            for (_, _, mods), w in zip(sources, weights):
                m = mods.get(site)
                if m is not None:
                    target.ia3_l += m._scale() * w

    return spec, fill


__all__ = ["weighted_ia3"]
