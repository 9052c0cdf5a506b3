"""Recognise normalisations in ATen graphs.

LayerNorm: ``aten.layer_norm(x, shape, w, b, eps)``.
RMSNorm (decomposed by every HF model we capture):
``[to] → pow(·,2) → mean(-1, keepdim) → add(eps) → rsqrt → mul(x, ·) → [to] → mul(w, ·)``;
also ``aten.rms_norm(x, shape, w, eps)``. The patterns are ``layer_norm``, ``rms_norm`` and
``rms_norm_decomposed`` in :mod:`graphadapt.structure.patterns`.
"""

from __future__ import annotations

import torch.fx as fx

from .ops import PASSTHROUGH, strip
from .patterns import Matcher, norm_consuming, norm_match
from .types import NormSite

__all__ = ["PASSTHROUGH", "strip", "norm_at_output", "norm_consuming"]


def norm_at_output(node: fx.Node, matcher: Matcher | None = None) -> NormSite | None:
    """If ``node`` is the output of a norm, describe it."""
    r = norm_match(node, matcher)
    return r.value if r else None
