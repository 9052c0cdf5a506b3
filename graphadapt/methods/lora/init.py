"""LoRA initialisation schemes (seeded, isolated: every draw from an explicit generator).

    g = adapter_generator(seed, adapter_name, site)
    new_W = init_lora_(module, "lora", g, base_weight=W)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphadapt.errors import SpecError
from graphadapt.init import check_generator, init_bert_, kaiming_uniform_, normal_, uniform_, zeros_

LORA_INIT_SCHEMES = ("lora", "gaussian", "bert", "pissa", "olora", "orthogonal")
CHANGES_BASE = ("pissa", "olora")
"""Schemes that move part of the base weight into the adapter (the base weight becomes a residual)."""

@torch.no_grad()
def _pissa_(module, base_weight: Tensor) -> Tensor:
    """PiSSA (PEFT ``init_lora_weights="pissa"``, exact SVD): ``W = U S V^T`` on the module's
    rows; ``A = sqrt(S_r/s) V_r^T``, ``B = U_r sqrt(S_r/s)``, residual ``W - s·BA``."""
    rows = module._rows(base_weight).to(torch.float32)
    if module.r > min(rows.shape):
        raise SpecError(
            f"pissa needs r <= min(out, in) = {min(rows.shape)}, got r={module.r}", field="r"
        )
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    root = torch.sqrt(s[: module.r] / module.scaling)
    lora_a = root.unsqueeze(1) * vh[: module.r]  # diag(root) @ Vh_r
    lora_b = u[:, : module.r] * root.unsqueeze(0)  # U_r @ diag(root)
    module.lora_A.copy_(lora_a)
    module.lora_B.copy_(lora_b)
    new_weight = base_weight.detach().clone()
    own = module._rows(new_weight)
    own.copy_(rows - module.scaling * (lora_b @ lora_a))
    module._commit_rows(new_weight, own)
    return new_weight


@torch.no_grad()
def _olora_(module, base_weight: Tensor) -> Tensor:
    """OLoRA (PEFT ``init_lora_weights="olora"``, no randomness): ``W = QR`` on the module's rows (fp32);
    ``A = R_r`` (first r rows), ``B = Q_r`` (first r columns), residual ``W - s·BA``."""
    rows = module._rows(base_weight).to(torch.float32)
    if module.r > min(rows.shape):
        raise SpecError(f"olora needs r <= min(out, in) = {min(rows.shape)}, got r={module.r}", field="r")
    q, r = torch.linalg.qr(rows)
    module.lora_A.copy_(r[: module.r])
    module.lora_B.copy_(q[:, : module.r])
    new_weight = base_weight.detach().clone()
    own = module._rows(new_weight)
    residual = rows - module.scaling * (module.lora_B.to(torch.float32) @ module.lora_A.to(torch.float32))
    own.copy_(residual.to(new_weight.dtype))
    module._commit_rows(new_weight, own)
    return new_weight


@torch.no_grad()
def orthogonal_(module, generator: torch.Generator) -> None:
    """PEFT's ``init_lora_weights="orthogonal"`` (even r): ``Q`` from the QR of an r×r normal draw; ``A =
    (N_in×r/2 · Q[0::2])ᵀ / 10``, ``B = N_out×r/2 · Q[1::2] / 10`` — ``BA = 0`` (distinct rows of ``Q`` are
    orthogonal) with both factors non-zero. Draws, in PEFT's order, from ``generator``: r×r, in×r/2, r/2×out."""
    rank = module.r
    if rank % 2:
        raise SpecError(f"orthogonal init needs an even rank, got r={rank}", field="r")
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator))
    a = torch.randn(module.in_features, rank // 2, generator=generator).mm(q[0::2, :]).T / 10.0
    b = torch.randn(rank // 2, module.out_features, generator=generator).T.mm(q[1::2, :]) / 10.0
    module.lora_A.copy_(a)
    module.lora_B.copy_(b)


def init_lora_(
    module,
    scheme: str,
    generator: torch.Generator,
    base_weight: Tensor | None = None,
) -> Tensor | None:
    """Initialise a zero-filled :class:`~graphadapt.methods.lora.module.LoRAModule` in place.

    Schemes:

    * ``"lora"`` — A kaiming-uniform(a=sqrt(5)) (nn.Linear / PEFT default), B = 0;
    * ``"gaussian"`` — PEFT's: A ~ N(0, (1/r)²), B = 0;
    * ``"bert"`` — AdapterHub LoRA ``init_weights="bert"``: A, B ~ N(0, 0.02²) (PEFT has no
      "bert" LoRA init). Not a no-op at init: the adapted model differs from the base;
    * ``"pissa"`` — PEFT's PiSSA (exact SVD, no randomness): A, B from the top-r singular
      triplets of the module's rows of ``base_weight`` and the **base weight changes** to
      the residual ``W_res = W - s·BA`` (so ``W_res + s·BA = W``). The new base weight (full
      fused shape, base layout, other rows untouched) is returned for the caller to
      install; keep the original ``W`` to unmerge or to export a plain LoRA later;
    * ``"olora"`` — PEFT's OLoRA (QR, no randomness): like ``"pissa"`` with ``A = R_r``, ``B = Q_r``;
    * ``"orthogonal"`` — PEFT's (even r): non-zero A and B with ``BA = 0`` (see :func:`orthogonal_`).

    Draw order from ``generator``: A, then B, then (gated) gate weight ~ N(0, 0.02²) and gate
    bias ~ U(±1/sqrt(in)) — AdapterHub's gate: ``nn.Linear`` default bias, re-drawn weight.
    DoRA: the magnitude is then set to ``||W + s·BA||_row`` from the (new) base weight, so
    ``base_weight`` is required.

    Returns the new base weight for ``"pissa"``/``"olora"``, else ``None``.
    """
    if scheme not in LORA_INIT_SCHEMES:
        raise SpecError(f"unknown LoRA init {scheme!r}; expected one of {LORA_INIT_SCHEMES}", field="init")
    check_generator(generator)
    if (scheme in CHANGES_BASE or module.use_dora) and base_weight is None:
        raise SpecError(f"LoRA init {scheme!r}{' with DoRA' if module.use_dora else ''} needs base_weight", field="init")
    if scheme in CHANGES_BASE and module.use_gating:
        # The gate replaces s, so W_res + g·BA != W and the model would change at init.
        raise SpecError(f"{scheme} init cannot be combined with gated LoRA", field="init")

    new_weight = None
    if scheme == "lora":
        kaiming_uniform_(module.lora_A, math.sqrt(5), generator)
        zeros_(module.lora_B)
    elif scheme == "gaussian":
        normal_(module.lora_A, 1.0 / module.r, generator)
        zeros_(module.lora_B)
    elif scheme == "bert":
        init_bert_(module.lora_A, generator)
        init_bert_(module.lora_B, generator)
    elif scheme == "orthogonal":
        orthogonal_(module, generator)
    elif scheme == "olora":
        new_weight = _olora_(module, base_weight)
    else:
        new_weight = _pissa_(module, base_weight)

    if module.gate is not None:
        init_bert_(module.gate.weight, generator)
        bound = 1.0 / math.sqrt(module.in_features)
        uniform_(module.gate.bias, -bound, bound, generator)

    if module.use_dora:
        module.init_dora_magnitude_(new_weight if new_weight is not None else base_weight)
    return new_weight


__all__ = ["CHANGES_BASE", "LORA_INIT_SCHEMES", "init_lora_", "orthogonal_"]
