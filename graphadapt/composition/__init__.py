"""Composition at one site: the active block, pruned to the adapters present there, evaluated by
one module that calls the adapters' own modules (and the fusion layers) in a fixed order.

before: ``y' = m_a(x, y, W, b)`` / ``out = m_a(h, r, ln_w, ln_b)`` for a single adapter
after:  ``call_module(adapters._compose.<site>)(…)`` evaluating e.g. ``Stack(a, Fuse(b, c))`` at that site

The tree is static (no data-dependent branch), so tracing the module — ONNX export — yields
plain graph operators. Semantics follow AdapterHub 1.3's ``compose_*`` methods (see
docs/composition.md for the definitions at linear sites, which AdapterHub does not have).
"""

from .fusion import FusionLayer
from .site import LinearComposition, ResidualComposition, prune

__all__ = ["FusionLayer", "LinearComposition", "ResidualComposition", "prune"]
