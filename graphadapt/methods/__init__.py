"""Method plugins: one folder per method, one registry entry each.

    graphadapt/methods/lora/        LoRA, rsLoRA, DoRA, gated LoRA
    graphadapt/methods/ia3/         IA3
    graphadapt/methods/adalora/     AdaLoRA (rank allocator for training)
    graphadapt/methods/bottleneck/  bottleneck adapters and presets (SeqBn, ParBn, Compacter, …)
    graphadapt/methods/prefix/      prefix tuning (attention-core site kind)
    graphadapt/methods/union/       unions of methods as one adapter (Union, UniPELT, MAM)
    graphadapt/methods/prompt/      prompt tuning (soft tokens at the input embeddings)
    graphadapt/methods/{loha,lokr,vera,fourierft,shira,c3a,randlora,vblora,gralora,waveft}/
                                    weight-delta methods (y + x ΔWᵀ; shared base: methods/delta.py)
    graphadapt/methods/invertible/  invertible adapters (MAD-X's NICE block on the embedding output)
    graphadapt/methods/mtl_lora/    MTL-LoRA (one task's adapter; AdapterHub's form)
    graphadapt/methods/vera_hub/    VeRA / DVoRA (AdapterHub's form: shared frozen projections, per-site scalings)
    graphadapt/methods/reft/        ReFT: LoReFT, NoReFT, DiReFT (interventions on layer outputs)

A third-party method is a package of the same shape that calls :func:`register` — see
``docs/architecture.md`` ("Adding a method").
"""

from __future__ import annotations

from .base import LinearSiteMethod, Method, ResidualSiteMethod
from .registry import get_method, register, registered, unregister

# the built-in plugins register themselves on import
from . import adalora, bottleneck, ia3, invertible, lora, mtl_lora, prefix, prompt, reft, union, vera_hub  # noqa: E402,F401  isort: skip
from . import boft, delora, hra, ln_tuning, miss, oft, road, trainable_tokens  # noqa: E402,F401  isort: skip  (wave 4: weight-transform methods)
from . import c3a, fourierft, gralora, loha, lokr, randlora, shira, vblora, vera, waveft  # noqa: E402,F401  isort: skip  (wave 4 weight-delta methods)

__all__ = ["LinearSiteMethod", "Method", "ResidualSiteMethod", "get_method", "register", "registered", "unregister"]
