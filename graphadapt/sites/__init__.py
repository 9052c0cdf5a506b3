"""Site kinds as plugins: where adapter modules sit, one :class:`SiteKindPlugin` per kind.

    linear     (:mod:`.linear`)     after a linear op / fused slice          ``(x, y, W, b) → y'``
    expert     (:mod:`.linear`)     after a grouped expert product           ``(x, y, W, b, routing) → y'``
    residual   (:mod:`.residual`)   replaces a sub-block's residual point    ``(h, r, ln_w, ln_b) → out``
    attention  (:mod:`.attention`)  at attention cores (keys/values/masks)   ``(kv, k, v, x, q, masks) → …``
    embedding  (:mod:`.embedding`)  at the input embeddings (grows inputs)   ``(t, what) → t'``
    parameter  (:mod:`.parameter`)  stands in for base parameters where read ``(p, name) → p'``
    hidden     (:mod:`.hidden`)     hidden states between layers             ``(h, attention_mask) → h'``

Each owns selection, insertion (calling the method's ``prepare`` then ``build``), the node annotation,
plan order, default combine policy and composition semantics (:mod:`.base`). A method declares its kind
(``Method.site_kind``); :func:`register_site_kind` adds a new one.
"""

from __future__ import annotations

from .base import SiteKindPlugin, get_site_kind, register_site_kind, site_kinds
from .attention import AttentionKind
from .embedding import EmbeddingKind
from .hidden import HiddenKind
from .linear import ExpertKind, LinearKind
from .parameter import ParameterKind, ParameterSite
from .residual import ResidualKind

__all__ = ["AttentionKind", "EmbeddingKind", "ExpertKind", "HiddenKind", "LinearKind", "ParameterKind", "ParameterSite", "ResidualKind",
           "SiteKindPlugin",
           "get_site_kind", "register_site_kind", "site_kinds"]
