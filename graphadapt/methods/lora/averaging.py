"""AdapterHub's LoRA-only ``average_adapter`` strategies (the generic ``linear`` one is
:mod:`graphadapt.averaging`).

- ``lora_linear_only_negate_b`` (Zhang et al., 2023): ``A = Σ |wᵢ| Aᵢ``, ``B = Σ wᵢ Bᵢ`` — a negative
  weight negates only B, so the update is subtracted instead of A and B both flipping sign.
- ``lora_delta_w_svd``: ``ΔW = Σ wᵢ Bᵢ Aᵢ`` (unscaled, as AdapterHub's ``delta_w``), then the rank-``svd_rank``
  truncated SVD ``U S Vᵀ``: ``A = Vᵀ[:r]``, ``B = U[:, :r] diag(S[:r])``; the new adapter's rank is
  ``svd_rank`` (its scaling ``alpha / svd_rank``, from the first adapter's alpha).
"""

from __future__ import annotations

import torch

from graphadapt.errors import SpecError

STRATEGIES = ("lora_linear_only_negate_b", "lora_delta_w_svd")


def average_spec(spec, strategy: str, svd_rank):
    if strategy == "lora_delta_w_svd":
        if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0:
            raise SpecError(f"combine_strategy 'lora_delta_w_svd' needs svd_rank, a positive int; got {svd_rank!r}",
                            field="svd_rank")
    if svd_rank is not None:
        return spec.replace(r=svd_rank)
    return spec


def _plain(module, what: str) -> None:
    if module.use_dora or module.use_gating:
        raise SpecError(f"combine_strategy {what!r} averages LoRA's A and B only; this LoRA has "
                        f"{'DoRA magnitudes' if module.use_dora else 'a gate'} too (AdapterHub refuses it as well); "
                        "use combine_strategy='linear'", field="combine_strategy")


@torch.no_grad()
def average_modules(new, sources, strategy: str, svd_rank) -> None:
    """Write ``new``'s A and B from ``sources`` (``[(module, weight)]``) by ``strategy``."""
    for m, _ in sources:
        _plain(m, strategy)
    if strategy == "lora_linear_only_negate_b":
        new.lora_A.copy_(sum(abs(w) * m.lora_A for m, w in sources))
        new.lora_B.copy_(sum(w * m.lora_B for m, w in sources))
        return
    if strategy != "lora_delta_w_svd":
        raise SpecError(f"unknown LoRA combine_strategy {strategy!r}; choose one of {STRATEGIES}",
                        field="combine_strategy")
    if new.fan_in_fan_out:
        raise SpecError("combine_strategy 'lora_delta_w_svd' is not defined on a transposed ([in, out], GPT-2 Conv1D) "
                        "weight: AdapterHub's transposed SVD gives A and B the wrong shapes there; use 'linear' or "
                        "'lora_linear_only_negate_b'", field="combine_strategy")
    delta = sum(w * (m.lora_B.double() @ m.lora_A.double()) for m, w in sources)
    u, s, vh = torch.linalg.svd(delta.to(new.lora_A.dtype), full_matrices=True)
    r = new.lora_A.shape[0]
    if r > s.shape[0]:
        raise SpecError(f"svd_rank {r} exceeds the rank the update can have here ({s.shape[0]} = min(out, in))",
                        field="svd_rank")
    new.lora_A.copy_(vh[:r, :])
    new.lora_B.copy_(u[:, :r] @ torch.diag(s[:r]))
