"""AdaLoRA's rank allocator during training (PEFT's ``RankAllocator`` semantics) and its orthogonality regulariser.

Per step, after ``loss.backward()`` (and ``optimizer.step()``, before ``zero_grad()``), ``update_and_allocate(step)``:

* sensitivity ``I = |p ⊙ ∇p|`` of every A, E, B entry, smoothed ``Ī ← β₁Ī + (1−β₁)I`` and its uncertainty
  ``Ū ← β₂Ū + (1−β₂)|I − Ī|`` (at steps before ``total_step − tfinal``);
* budget: all ``init_r × sites`` triplets for ``step <= tinit``, ``target_r × sites`` after ``total_step − tfinal``,
  in between ``int((b₀ − b_T)(1 − (step − tinit)/(total_step − tfinal − tinit))³ + b_T)``, applied every ``deltaT``
  steps (and once more, forced, at ``total_step − tfinal``);
* a triplet's score is ``ĪŪ`` of its E entry plus the mean ``ĪŪ`` of its A row and of its B column; the
  ``b₀ − budget`` lowest-scoring triplets (the ``kthvalue`` threshold, ties pruned too) get ``E = 0``; after the
  final allocation the kept pattern is re-applied every step.

``rank_pattern`` (``{'<module path>.lora_E': [bool…]}``) is PEFT's format; :meth:`RankAllocator.finalise` cuts the
factors to the kept triplets and records the pattern in the adapter's spec, so a saved and reloaded adapter has
exactly the kept ranks (as PEFT's checkpoints do).
"""

from __future__ import annotations

import torch

from graphadapt.errors import GraphAdaptError, SpecError

from .module import AdaLoRAModule


def _modules(adapted, adapter: str) -> dict[str, AdaLoRAModule]:
    spec = adapted.spec.adapters.get(adapter)
    if spec is None or spec.method != "adalora":
        raise GraphAdaptError(f"{adapter!r} is not an AdaLoRA adapter of this model "
                              f"(adapters: {list(adapted.spec.adapters)})")
    out = {}
    for r in adapted.adapter_records:
        if r.adapter == adapter and r.site not in out:
            out[r.site] = adapted.get_submodule(r.target)
    return dict(sorted(out.items()))


class RankAllocator:
    """Budgeted rank pruning of AdaLoRA adapter ``adapter`` of ``adapted`` (see the module docstring)."""

    def __init__(self, adapted, adapter: str, total_step: int | None = None):
        self.adapted, self.adapter = adapted, adapter
        self.spec = adapted.spec.adapters.get(adapter)
        self.modules = _modules(adapted, adapter)
        self.total_step = total_step or self.spec.total_step
        if not self.total_step:
            raise SpecError("AdaLoRA's budget schedule needs total_step (in the spec or given here)", field="total_step")
        if self.spec.tinit >= self.total_step - self.spec.tfinal:
            raise SpecError("tinit/tfinal leave no budgeting phase for this total_step", field="total_step")
        self.init_bgt = sum(m.r for m in self.modules.values())
        self.target_bgt = self.spec.target_r * len(self.modules)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def _params(self):
        for site, m in self.modules.items():
            for kind in ("svd_A", "svd_E", "svd_B"):
                yield (site, kind), getattr(m, kind)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        tinit, tfinal, total = self.spec.tinit, self.spec.tfinal, self.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul = 1 - (step - tinit) / (total - tfinal - tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), step % self.spec.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.spec.beta1, self.spec.beta2
        for key, p in self._params():
            if p.grad is None:
                raise GraphAdaptError(f"AdaLoRA: {key[0]} {key[1]} has no gradient; call update_and_allocate after "
                                      "loss.backward() and before zero_grad()")
            if key not in self.ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
            self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _score(self, key):
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        triplet = {}
        for site in self.modules:
            a = torch.mean(self._score((site, "svd_A")), dim=1, keepdim=True)
            b = torch.mean(self._score((site, "svd_B")), dim=0, keepdim=False).view(-1, 1)
            triplet[site] = (self._score((site, "svd_E")).view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)
                             ).view(-1, 1)
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for site, m in self.modules.items():
            m.svd_E.masked_fill_(triplet[site] <= threshold, 0.0)
            pattern[f"{site}.lora_E"] = (~(triplet[site] <= threshold)).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern) -> None:
        for site, m in self.modules.items():
            keep = torch.tensor(pattern[f"{site}.lora_E"], device=m.svd_E.device).unsqueeze(-1)
            m.svd_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, global_step: int) -> int | None:
        """One step of the schedule (PEFT's ``AdaLoraModel.update_and_allocate``); returns the budget when it
        allocated, else None."""
        final = self.total_step - self.spec.tfinal
        if global_step < final:
            self.update_ipt()
            budget, mask = self.budget_schedule(global_step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
                return budget
        elif global_step == final:   # scores as of the previous step (PEFT updates them only before this one)
            budget, _ = self.budget_schedule(global_step)
            self.rank_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
            return budget
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern(self.rank_pattern)
        return None


    @torch.no_grad()
    def finalise(self) -> dict[str, int]:
        """After training: keep only the allocated triplets (the factors shrink to the kept rank: new Parameters, so
        build the optimizer again if training goes on) and record ``rank_pattern`` in the adapter's spec, so
        ``save_adapters``/``load`` and the spec reproduce the pruned adapter. Returns the rank per site."""
        if self.rank_pattern is None:
            raise GraphAdaptError("finalise() needs an allocation first: run update_and_allocate up to "
                                  "total_step - tfinal")
        from torch import nn

        ranks = {}
        for site, m in self.modules.items():
            keep = torch.tensor(self.rank_pattern[f"{site}.lora_E"], device=m.svd_E.device)
            if keep.numel() != m.r:
                raise GraphAdaptError(f"{site} was already finalised (rank {m.r})")
            for name, cut in (("svd_A", lambda t: t[keep]), ("svd_E", lambda t: t[keep]),
                              ("svd_B", lambda t: t[:, keep])):
                old = getattr(m, name)
                setattr(m, name, nn.Parameter(cut(old.detach()).clone(), requires_grad=old.requires_grad))
            m.r = ranks[site] = int(keep.sum())
        spec = self.spec.replace(rank_pattern=self.rank_pattern)
        model = self.adapted
        model.spec = model.spec.replace(adapters={**model.spec.adapters, self.adapter: spec})
        self.spec = spec
        return ranks


def orth_regularization(adapted, adapter: str) -> torch.Tensor:
    """PEFT's AdaLoRA regulariser ``w · mean over A, B factors of ‖PPᵀ − I‖_F`` (``AAᵀ`` for A, ``BᵀB`` for B),
    ``w = orth_reg_weight``: add it to the training loss (PEFT adds it to ``outputs.loss`` in its forward)."""
    mods = _modules(adapted, adapter)
    terms = [t for m in mods.values() for t in m.orth_penalty()]
    return adapted.spec.adapters[adapter].orth_reg_weight * torch.stack(terms).sum() / len(terms)


__all__ = ["RankAllocator", "orth_regularization"]
