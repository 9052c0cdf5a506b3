"""CorDA initialisation (PEFT ``init_lora_weights="corda"`` + ``preprocess_corda``), driven by a calibration callback.

Per site, from inputs ``X`` seen during calibration (one example per call, as PEFT: ``x.squeeze(0)`` must be
``[T, in]``): ``C = mean over calls of (X/max X)ᵀ(X/max X)``; ``C' = C + damp·mean(diag C)·I`` (``damp`` doubling
from 0.01 until ``‖C' C'⁻¹ − I‖ < 0.05``); ``W C' = U S Vhᵀ``, ``V = (Vh C'⁻¹)ᵀ``; keep the first ``r`` triplets
(``"ipm"``, instruction-previewed) or the last ``r`` (``"kpm"``, knowledge-preserving); ``S ← S / s``;
``A = Vᵀ·sqrt(S)``, ``B = U·sqrt(S)``; the base weight becomes the residual ``W − s·BA`` (a new Parameter: the caller's
model is untouched), so the model's outputs do not change.

The residual base is not recorded in the spec: an adapter saved with ``save_adapters`` after CorDA applies to that
residual, not to the original base (as in PEFT, which asks to convert such adapters before sharing them).
"""

from __future__ import annotations

from typing import Callable

import torch

from graphadapt.errors import GraphAdaptError, SpecError

from .module import LoRAModule

CORDA_METHODS = ("ipm", "kpm")


def _eigens(w: torch.Tensor, cov: torch.Tensor):
    damp = 0.01
    eye = torch.eye(cov.size(0), device=cov.device)
    while True:
        fix = cov + torch.diag(torch.ones(cov.size(0), device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fix)
        if torch.dist(fix @ inv, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fix, full_matrices=False)
    return u, s, (vh @ inv).transpose(0, 1)


@torch.no_grad()
def corda_init(adapted, adapter: str, run_model: Callable[[], object], method: str = "ipm") -> None:
    """Initialise LoRA adapter ``adapter`` of ``adapted`` by CorDA from the inputs its sites see while ``run_model()``
    runs (your calibration loop: call ``adapted(**batch)`` with one example per call). The adapter is switched off
    during calibration (its sites see the inputs the model without it gives) and keeps its activation afterwards.
    ``method``: ``"ipm"`` (keep the principal directions of ``W·C``) or ``"kpm"`` (the least ones)."""
    if method not in CORDA_METHODS:
        raise SpecError(f"CorDA method must be one of {CORDA_METHODS}, got {method!r}", field="method")
    if adapter not in adapted.spec.adapters or adapted.spec.adapters[adapter].method != "lora":
        raise GraphAdaptError(f"corda_init needs a LoRA adapter of this model; got {adapter!r} "
                              f"(adapters: {list(adapted.spec.adapters)})")
    if adapted.is_merged:
        raise GraphAdaptError("unmerge() before corda_init")
    records = {}
    for r in adapted.adapter_records:
        if r.adapter == adapter and r.target not in records:
            records[r.target] = r
    mods = {t: adapted.get_submodule(t) for t in records}
    for t, m in mods.items():
        if not isinstance(m, LoRAModule) or m.use_dora or m.gate is not None:
            raise SpecError(f"CorDA initialises plain LoRA on linear layers; {t} is not one (DoRA, gated or expert "
                            "LoRA)", field="init")
    stats = {t: [0, 0] for t in mods}

    def hook_for(target):
        def hook(module, inputs, output):
            x = inputs[0].detach().squeeze(0).float()
            if x.dim() != 2:
                raise GraphAdaptError(f"CorDA calibration takes one example per call (PEFT's rule); {target} saw "
                                      f"an input of shape {tuple(inputs[0].shape)}")
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise GraphAdaptError(f"CorDA calibration: non-finite input at {target}")
            stats[target][0] += 1
            stats[target][1] = stats[target][1] + x.t().matmul(x)
        return hook

    handles = [m.register_forward_hook(hook_for(t)) for t, m in mods.items()]
    active = {t: m.active for t, m in mods.items()}
    training = adapted.training
    try:
        for m in mods.values():
            m.active = False
        adapted.eval()
        run_model()
    finally:
        for h in handles:
            h.remove()
        for t, m in mods.items():
            m.active = active[t]
        adapted.train(training)
    unseen = [t for t, (n, _) in stats.items() if n == 0]
    if unseen:
        raise GraphAdaptError(f"the calibration callback never reached {unseen[:3]}…: call the adapted model in it")
    from graphadapt.passes.linear import replace_parameter

    for t, m in mods.items():
        n, total = stats[t]
        cov = total / n
        weight = adapted.get_parameter(records[t].weight)
        rows = m._rows(weight.detach()).float()
        u, s, v = _eigens(rows, cov.float())
        keep = slice(0, m.r) if method == "ipm" else slice(s.shape[0] - m.r, s.shape[0])
        if m.r > s.shape[0]:
            raise SpecError(f"CorDA needs r <= min(out, in) = {s.shape[0]} at {t}, got r={m.r}", field="r")
        s, u, v = s[keep] / m.scaling, u[:, keep], v[:, keep]
        m.lora_A.copy_(v.t().mul(s.sqrt().view(-1, 1)))
        m.lora_B.copy_(u.mul(s.sqrt()))
        new = weight.detach().clone()
        own = m._rows(new)
        own.copy_((rows - m.scaling * m.lora_B.float() @ m.lora_A.float()).to(new.dtype))
        m._commit_rows(new, own)
        replace_parameter(adapted, records[t].weight, new)


__all__ = ["CORDA_METHODS", "corda_init"]
