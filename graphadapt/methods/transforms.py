"""Shared pieces of the weight-transform methods (OFT, BOFT, HRA, MiSS, DeLoRA, RoAd); not a method.

* :class:`WeightUpdateModule` — a linear-site module whose effect is a new weight ``W' = f(W0)`` on the rows it
  owns, computed as ``y' = y + x (f(W0) - W0)ᵀ`` so that what earlier adapters on the same site added to ``y`` is
  kept (the forward reads ``W0``: ``reads_base_weight``). ``fold`` adds the same ``f(W0) - W0``.
* :class:`InputTransformModule` — the case ``f(W) = W Aᵀ`` where ``A`` is a linear map of the layer input
  (``x ↦ x A``: OFT's block rotation, BOFT's butterfly, HRA's reflections); the forward maps ``x`` instead of
  forming ``f(W)``: ``y' = y + (x A - x) W0ᵀ``.
* Cayley maps of skew-symmetric blocks without ``torch.linalg`` (so they export to ONNX): the exact Cayley
  transform ``(I - S)(I + S)⁻¹`` by Gauss–Jordan elimination (no pivoting needed: ``I ± S`` has a positive
  definite symmetric part) and PEFT's truncated Neumann series.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphadapt.errors import SpecError

from .sliced import SlicedSiteModule

__all__ = ["InputTransformModule", "WeightUpdateModule", "cayley", "cayley_neumann", "check_plain_site", "peft_key_reader",
           "refuse_peft_options",
           "skew_from_upper", "upper_selector"]


def check_plain_site(method: str, adapter: str, site) -> None:
    """Expert (3-d) weights are not supported by these methods: say so naming the site."""
    if getattr(site, "num_experts", None):
        raise SpecError(f"adapter {adapter!r}: {method} is not available on the expert weights of {site.name}; "
                        "target attention/dense roles with it, or drop the expert roles", field="targets")


class WeightUpdateModule(SlicedSiteModule):
    """Base: ``y' = y + x Δᵀ`` with ``Δ = f(W0) - W0`` on the owned rows; ``fold`` adds ``Δ``.

    Subclasses implement :meth:`delta_weight` (``[out_features, in]`` from the owned rows of ``W0``), or override
    :meth:`forward` with a cheaper equivalent.
    """

    mergeable = True
    merge_refusal = None
    reads_base_weight: str | None = None

    def delta_weight(self, rows: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight()")

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        dt = self._param_dtype()
        delta = self.delta_weight(self._rows(weight).to(dt))
        return self._replace_slice(y, self._own(y) + F.linear(x.to(dt), delta))

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, *,
             base_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        w0 = weight if base_weight is None else base_weight
        new = weight.detach().clone()
        rows = self._rows(new)
        dt = self._param_dtype()
        delta = self.delta_weight(self._rows(w0.detach()).to(device=weight.device, dtype=dt))
        rows.add_(delta.to(rows.dtype))
        self._commit_rows(new, rows)
        return new, None if bias is None else bias.detach().clone()


class InputTransformModule(WeightUpdateModule):
    """Base of ``x ↦ x A`` methods: ``y' = y + (x A - x) W0ᵀ``; ``W' = W + W0 (Aᵀ - I)``.

    Subclasses implement :meth:`transform_input` (``x [..., in] ↦ x A``, in the parameters' dtype)."""

    def transform_input(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement transform_input()")

    def input_matrix(self) -> Tensor:
        """``A`` [in, in] (``transform_input`` applied to the identity's rows)."""
        p = next(self.parameters())
        return self.transform_input(torch.eye(self.in_features, dtype=p.dtype, device=p.device))

    def delta_weight(self, rows: Tensor) -> Tensor:
        a = self.input_matrix()
        return rows @ (a - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)).t()

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        dt = self._param_dtype()
        x = x.to(dt)
        moved = self.transform_input(x) - x
        return self._replace_slice(y, self._own(y) + F.linear(moved, self._rows(weight).to(dt)))


# ---------------------------------------------------------------------------------------------- Cayley maps
def upper_selector(size: int) -> Tensor:
    """``E`` [size·(size-1)/2, size²]: ``vec @ E`` puts a strict-upper-triangle vector (row-major, as
    ``torch.triu_indices(size, size, 1)``) into a flattened ``[size, size]`` matrix (exact: one 1 per column)."""
    rows, cols = torch.triu_indices(size, size, 1)
    sel = torch.zeros(rows.numel(), size * size)
    sel[torch.arange(rows.numel()), rows * size + cols] = 1.0
    return sel


def skew_from_upper(vec: Tensor, selector: Tensor, size: int) -> Tensor:
    """``vec [n, size·(size-1)/2] → S [n, size, size]`` with ``S = U - Uᵀ`` (``U``: vec in the upper triangle)."""
    u = (vec @ selector.to(vec.dtype)).reshape(vec.shape[0], size, size)
    return u - u.transpose(-2, -1)


def _gauss_jordan_solve(m: Tensor, b: Tensor) -> Tensor:
    """``X`` with ``m X = b`` for a batch ``m [n, k, k]``, ``b [n, k, c]`` (unrolled, without pivoting: for
    matrices whose symmetric part is positive definite, every leading minor is non-zero)."""
    k = m.shape[-1]
    a = torch.cat([m, b], dim=-1)
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    for i in range(k):
        pivot_row = a[:, i:i + 1, :] / a[:, i:i + 1, i:i + 1]
        a = a - a[:, :, i:i + 1] * pivot_row + eye[:, i:i + 1] * pivot_row
    return a[:, :, k:]


def cayley(skew: Tensor) -> Tensor:
    """``(I - S)(I + S)⁻¹`` for a batch of skew-symmetric ``S`` — what ``torch.linalg.solve(I + S, I - S,
    left=False)`` gives (PEFT's BOFT, and OFT with ``use_cayley_neumann=False``), as plain tensor ops.
    ``X (I + S) = I - S`` ⇔ ``(I - S) Xᵀ = I + S`` (``Sᵀ = -S``)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return _gauss_jordan_solve(eye - skew, eye + skew).transpose(-2, -1)


def cayley_neumann(skew: Tensor, terms: int) -> Tensor:
    """PEFT OFT's Cayley–Neumann approximation ``I + 2S + 2S² + … + S^(terms-1)`` (the same terms, in the same
    order: ``I + 2S + 2S² + 2S³ + S⁴`` for 5 terms)."""
    r = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    if terms > 1:
        r = r + 2.0 * skew
        if terms > 2:
            power = skew @ skew
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ skew
                r = r + 2.0 * power
            power = power @ skew
            r = r + power
    return r


# ---------------------------------------------------------------------------------------------- PEFT keys
def peft_key_reader(names: dict[str, str]):
    """``peft_key`` for PEFT's per-module formats: ``[base_model.model.]<path>.<name>[.<adapter>][.weight]`` →
    ``(path, names[name])``, or None for keys of other methods."""
    import re

    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>{alt})"
                         r"(?:\.(?P<adapter>[A-Za-z_][\w]*))?(?:\.weight)?$")

    def peft_key(key: str) -> tuple[str, str] | None:
        m = pattern.match(key)
        return None if m is None else (m["path"], names[m["kind"]])

    return peft_key


def refuse_peft_options(method: str, cfg, allowed_bias=("none", None), **unsupported) -> None:
    """Raise a :class:`~graphadapt.errors.CheckpointError` for PEFT options the importer cannot honour."""
    from graphadapt.errors import CheckpointError

    bad = {k: cfg.get(k) for k in ("rank_pattern", "alpha_pattern", "lambda_pattern", "layer_replication",
                                   "trainable_token_indices") if cfg.get(k)}
    if cfg.get("bias", "none") not in allowed_bias:
        bad["bias"] = cfg["bias"]
    bad.update({k: v for k, v in unsupported.items() if v})
    if bad:
        raise CheckpointError(f"PEFT {method} options not supported by the importer: {bad}; re-train without "
                              "them or merge the adapter with PEFT (merge_and_unload) instead.")
