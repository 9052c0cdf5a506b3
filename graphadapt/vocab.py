"""One source of truth for the words graphadapt's layers share.

Structural roles (what recognition assigns and what specs target) and the module prefix
under which every adapter module lives in an adapted model. Everything else that names
these imports them from here.
"""

from __future__ import annotations

from enum import StrEnum

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down",
                          "router", "shared_expert_gate", "expert_up", "expert_gate", "expert_down",
                          "q_a", "q_b", "kv_a", "kv_b", "mixer_in", "mixer_inner", "mixer_out")
"""Linear-site roles found from dataflow: attention q/k/v/o, feed-forward up/gate/down (in a
mixture-of-experts block: the shared expert's), and the mixture-of-experts roles: the top-k
``router``, the shared expert's scalar ``shared_expert_gate``, and the fused expert weights
``expert_up``/``expert_gate``/``expert_down`` (one low-rank update per expert); multi-head latent attention's
low-rank projections ``q_a``/``q_b`` (query down/up) and ``kv_a``/``kv_b`` (key-value latent down/up); a token
mixer's (linear attention, state-space, convolution: ``structure.mixer``) ``mixer_in`` (reading the sub-block input),
``mixer_inner`` (inside the mixer) and ``mixer_out`` (closing the residual add) projections."""

ALL_LINEAR = "all-linear"
"""Target word meaning every role."""

ADAPTERS = "adapters"
"""Submodule under which adapter modules live: ``adapters.<adapter name>.<site>``."""


def adapter_target(adapter: str, site: str) -> str:
    """Qualified module name of ``adapter``'s module at ``site``."""
    return f"{ADAPTERS}.{adapter}.{site}"


def adapter_prefix(adapter: str | None = None) -> str:
    """State-dict prefix of one adapter's tensors (or of every adapter's, when ``adapter`` is None)."""
    return f"{ADAPTERS}." if adapter is None else f"{ADAPTERS}.{adapter}."


def adapter_of(target: str) -> str | None:
    """The adapter name in a qualified module/parameter name, or None when it is not an adapter's."""
    parts = target.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == ADAPTERS else None


class SiteKind(StrEnum):
    """Where an adapter module sits (the site-kind plugins: :mod:`graphadapt.sites`). A ``StrEnum``: it compares
    equal to, prints and serialises as its value (``SiteKind.LINEAR == "linear"``)."""

    LINEAR = "linear"
    """After a linear op (``linear``/``addmm``/a fused slice): module called ``(x, y, W, b) → y'``."""
    EXPERT = "expert"
    """After a grouped expert product (mixture of experts): ``(x, y, W, b, routing) → y'``."""
    RESIDUAL = "residual"
    """Replaces a sub-block's residual point: ``(h, r, ln_w, ln_b) → out``."""
    ATTENTION = "attention"
    """At an attention core: ``(prefix, k, v, x, q, masks) → (k', v', masks')``."""
    EMBEDDING = "embedding"
    """At the input embeddings: the inputs grow by the adapter's tokens."""
    PARAMETER = "parameter"
    """Replaces base parameters where the graph reads them (norm weights, embedding rows): ``(p, name) → p'``."""
    HIDDEN = "hidden"
    """The hidden states between layers (the embedding output, a layer's output): ``(h, attention_mask) → h'``."""


class CombinePolicy(StrEnum):
    """How a method's modules combine when several adapters share one site without a composition block."""

    CHAIN = "chain"
    """Each module reads the previous one's output, in plan order."""
    EXCLUSIVE = "exclusive"
    """Not defined: the plan refuses it unless a composition block (or a single active adapter) decides."""


__all__ = ["ADAPTERS", "CombinePolicy", "SiteKind", "ALL_LINEAR", "ROLES", "adapter_of", "adapter_prefix", "adapter_target"]
