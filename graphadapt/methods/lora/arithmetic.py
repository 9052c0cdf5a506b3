"""LoRA adapter arithmetic: PEFT's ``add_weighted_adapter`` (every combination type) and any weight change as a LoRA.

``weighted_lora`` (PEFT 0.22 ``LoraModel.add_weighted_adapter``, same numbers): the new adapter has ``alpha = r``
(scaling 1, no rsLoRA, no patterns) and, at each site, only the sources adapting that site contribute:

* ``cat``: ``A = [w_1 s_1 A_1; …]``, ``B = [B_1 | …]`` (rank = Σ ranks) — exact: ``BA = Σ w_i s_i B_i A_i``;
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the rule combines the A factors with
  weights ``sign(w_i s_i)·sqrt|w_i s_i|`` and the B factors with ``sqrt|w_i s_i|`` (all ranks equal);
* ``svd`` and the ``*_svd`` rules: the rule combines the deltas ``s_i B_i A_i``, then a truncated SVD factorises the
  result at ``svd_rank`` (default: the largest source rank), optionally clamped (``svd_clamp``).

``lora_bias`` sources give ``b_B = Σ w_i s_i b_i``. Random (DARE) masks are drawn from the generator, site by site
in the base model's module order, A factors before B factors (or one delta per source), as PEFT draws them — after
skipping the draws PEFT's creation of the new adapter makes (``nn.Linear`` init, then its ``lora_A`` init), so that a generator seeded with
``s`` gives PEFT's masks after ``torch.manual_seed(s)``.

``low_rank_lora``: a LoRA of rank ``r`` whose ``s·BA`` is the best rank-``r`` approximation (truncated SVD) of a
given weight change ``ΔW`` per site, and whose ``b_B`` is the bias change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from graphadapt.errors import SpecError

from ..task_arithmetic import COMBINATIONS, SVD_COMBINATIONS, check_options, combine, exact_targets, svd_factors
from .module import LoRAModule
from .spec import LoRA

ALL_COMBINATIONS = SVD_COMBINATIONS[:1] + ("linear", "cat") + tuple(c for c in COMBINATIONS if c != "linear") + \
    SVD_COMBINATIONS[1:]


def _check_source(adapter: str, spec: LoRA, modules: Mapping[str, Any]) -> None:
    if spec.use_dora:
        raise SpecError(f"add_weighted_adapter does not combine DoRA adapters ({adapter!r}; PEFT refuses them too): "
                        "convert it with to_low_rank(...) first", field="adapters")
    if spec.use_gating:
        raise SpecError(f"add_weighted_adapter cannot combine the gated LoRA {adapter!r}: its gate depends on the "
                        "input", field="adapters")
    for site, m in modules.items():
        if not isinstance(m, LoRAModule):
            raise SpecError(f"add_weighted_adapter combines LoRA on linear layers; {adapter!r} adapts the expert "
                            f"weights at {site} (PEFT refuses target_parameters too)", field="adapters")


def _new_spec(sources, sites: list[str], rank: int) -> LoRA:
    first = sources[0][1]
    where = {(s.targets, s.layers, s.leave_out) for _, s, _ in sources}
    if len(where) == 1:
        targets, layers, leave_out = where.pop()
    else:
        targets, layers, leave_out = exact_targets(sites), None, ()
    return dataclasses.replace(first, r=rank, alpha=rank, use_rslora=False, init="lora", targets=targets,
                               layers=layers, leave_out=leave_out,
                               lora_bias=any(s.lora_bias for _, s, _ in sources), **_no_patterns(first))


def _no_patterns(spec) -> dict:
    return {k: {} for k in ("rank_pattern", "alpha_pattern") if hasattr(spec, k)}


@torch.no_grad()
def weighted_lora(sources: list[tuple[str, LoRA, dict]], weights: list[float], sites: list[str],
                  options: Mapping[str, Any]):
    """``(spec, fill)`` of the LoRA combining ``sources`` (see the module docstring); ``options``:
    ``combination_type``, ``svd_rank``, ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``, ``density``,
    ``majority_sign_method``, ``generator``."""
    ctype = options.get("combination_type") or "svd"
    density, sign_method = options.get("density"), options.get("majority_sign_method", "total")
    check_options(ctype, ALL_COMBINATIONS, density, sign_method)
    for adapter, spec, modules in sources:
        _check_source(adapter, spec, modules)
    if len(sources) == 1:
        ctype = "linear"   # PEFT: one adapter is only ever combined linearly
    ranks = [max(m.r for m in modules.values()) for _, _, modules in sources]
    if ctype in COMBINATIONS:
        if len(set(ranks)) != 1:
            raise SpecError(f"combination_type {ctype!r} needs adapters of one rank, got "
                            f"{dict(zip((a for a, _, _ in sources), ranks))}; use 'cat' or an '*_svd' combination",
                            field="combination_type")
        rank = ranks[0]
    elif ctype == "cat":
        rank = sum(ranks)
    else:
        svd_rank = options.get("svd_rank")
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise SpecError(f"svd_rank must be a positive int, got {svd_rank!r}", field="svd_rank")
        rank = svd_rank or max(ranks)
    clamp = options.get("svd_clamp")
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0.0 <= clamp <= 1.0):
        raise SpecError(f"svd_clamp must be a quantile in [0, 1], got {clamp!r}", field="svd_clamp")
    spec = _new_spec(sources, sites, rank)
    generator = options.get("generator")

    def fill(new_modules: Mapping[str, LoRAModule]) -> None:
        if generator is not None and ctype.startswith("dare"):
            _skip_peft_init_draws([new_modules[s] for s in sites], sources[0][1].init, generator)
        for site in sites:
            target = new_modules[site]
            present = [(m, w) for (_, _, mods), w in zip(sources, weights) if (m := mods.get(site)) is not None]
            if ctype == "cat":
                a, b = _cat(present)
                target.lora_A.zero_()
                target.lora_B.zero_()
                target.lora_A[: a.shape[0]] = a.to(target.lora_A.dtype)
                target.lora_B[:, : b.shape[1]] = b.to(target.lora_B.dtype)
            elif ctype in COMBINATIONS:
                _factor_rule(target, present, ctype, density, sign_method, generator, site)
            else:
                deltas = [_peft_delta(m) for m, _ in present]
                w = torch.tensor([float(x) for _, x in present]).to(deltas[0].device)
                delta = combine(ctype, deltas, w, density, sign_method, generator)
                if target.fan_in_fan_out:
                    delta = delta.T
                a, b = svd_factors(delta, rank, clamp, options.get("svd_full_matrices", True),
                                   options.get("svd_driver"))
                target.lora_A.copy_(a)
                target.lora_B.copy_(b)
            if target.lora_bias is not None:
                bias = torch.zeros_like(target.lora_bias)
                for m, w in present:
                    if m.lora_bias is not None:
                        bias += w * m.scaling * m.lora_bias
                target.lora_bias.copy_(bias)

    return spec, fill


def _skip_peft_init_draws(modules, init: str, generator: torch.Generator) -> None:
    """Advance ``generator`` past the draws PEFT makes from the global RNG when it creates the new adapter, before
    its masks: per module (in module order) ``nn.Linear(in, r)`` and ``nn.Linear(r, out[, bias])`` initialise
    themselves (``uniform_`` each), then PEFT re-draws ``lora_A`` (``uniform_`` for ``init="lora"``, ``normal_`` for
    ``"gaussian"``) — so ``seed=s`` reproduces PEFT's masks after ``torch.manual_seed(s)``."""
    for m in modules:
        draws = [(m.lora_A.shape, "u"), (m.lora_B.shape, "u")]
        if m.lora_bias is not None:
            draws.append((m.lora_bias.shape, "u"))
        if init in ("lora", "gaussian"):
            draws.append((m.lora_A.shape, "n" if init == "gaussian" else "u"))
        for shape, how in draws:
            scratch = torch.empty(shape, dtype=m.lora_A.dtype)
            scratch.normal_(generator=generator) if how == "n" else scratch.uniform_(generator=generator)


def _peft_delta(m: LoRAModule) -> Tensor:
    """``s·BA`` of the module's own rows, in the base layout (PEFT's ``get_delta_weight``)."""
    d = m.lora_B @ m.lora_A
    if m.fan_in_fan_out:
        d = d.T
    return d.mul_(m.scaling)


def _cat(present) -> tuple[Tensor, Tensor]:
    return (torch.cat([m.lora_A * w * m.scaling for m, w in present], dim=0),
            torch.cat([m.lora_B for m, _ in present], dim=1))


def _factor_rule(target: LoRAModule, present, ctype, density, sign_method, generator, site) -> None:
    if len({m.r for m, _ in present}) != 1 or present[0][0].r != target.r:
        raise SpecError(f"combination_type {ctype!r} needs one rank at {site}, got {[m.r for m, _ in present]}",
                        field="combination_type")
    wa, wb = [], []
    for m, w in present:
        ws = w * m.scaling
        sign = 1 if ws >= 0 else -1
        wa.append(math.sqrt(abs(ws)) * sign)
        wb.append(math.sqrt(abs(ws)))
    dtype = present[0][0].lora_A.dtype
    a = combine(ctype, [m.lora_A for m, _ in present], torch.tensor(wa).to(target.lora_A.device), density,
                sign_method, generator)
    b = combine(ctype, [m.lora_B for m, _ in present], torch.tensor(wb).to(target.lora_B.device), density,
                sign_method, generator)
    target.lora_A.copy_(a.to(dtype))
    target.lora_B.copy_(b.to(dtype))


def low_rank_lora(deltas: Mapping[str, tuple[Any, Tensor, Tensor | None]], rank: int, sites: list[str],
                  options: Mapping[str, Any]):
    """``(spec, fill)``: a LoRA of rank ``rank`` (``alpha = rank``: scaling 1) at ``sites`` whose update is the best
    rank-``rank`` approximation of each ``ΔW`` (``deltas[site] = (record, ΔW base layout full shape, Δb or None)``);
    ``lora_bias`` carries ``Δb`` when any site's bias changes. ``rank >= min(out, in)`` reproduces ``ΔW``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SpecError(f"rank must be a positive int, got {rank!r}", field="rank")
    with_bias = any(db is not None and bool(db.abs().max() > 0) for _, _, db in deltas.values())
    spec = LoRA(r=rank, alpha=rank, targets=exact_targets(sites), lora_bias=with_bias,
                dropout=float(options.get("dropout", 0.0)))

    @torch.no_grad()
    def fill(new_modules: Mapping[str, LoRAModule]) -> None:
        for site in sites:
            _, dw, db = deltas[site]
            target = new_modules[site]
            full = dw.detach().to(torch.float32)
            rows = target._rows(full).clone()
            rest = full.clone()
            target._commit_rows(rest, target._rows(rest).zero_())
            if rest.abs().max() > 0:
                raise SpecError(f"the weight change at {site} reaches channels outside the site; it cannot be "
                                "written as a LoRA of this site", field="rank")
            a, b = svd_factors(rows, rank, full_matrices=False)
            target.lora_A.copy_(a)
            target.lora_B.copy_(b)
            if target.lora_bias is not None:
                target.lora_bias.copy_(target._bias_slice(db) if db is not None else torch.zeros_like(target.lora_bias))

    return spec, fill


__all__ = ["ALL_COMBINATIONS", "low_rank_lora", "weighted_lora"]
