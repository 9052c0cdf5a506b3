"""OFT as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = OFTModule(x, y, W, b) = linear(x R, W, b)`` with ``R`` a
block-diagonal rotation. Mergeable (``W' = W Rᵀ``).

Init: ``init_weights=True``: zero skew parameters (identity); ``False``: N(0, 0.1²) (PEFT's), drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import torch

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import OFTModule, adjust_blocks
from .peft import peft_key, peft_oft_spec
from .spec import OFT


@register
class OFTMethod(LinearSiteMethod):
    name = "oft"
    spec_class = OFT
    peft_type = "OFT"

    def build(self, spec: OFT, adapter, site, seed, weight=None):
        check_plain_site("OFT", adapter, site)
        n_in = site.in_features
        if spec.r:
            blocks = adjust_blocks(n_in, spec.r) if n_in % spec.r or spec.r > n_in else spec.r
            size = n_in // blocks
        else:
            size = spec.oft_block_size
            size = adjust_blocks(n_in, size) if n_in % size or size > n_in else size
            blocks = n_in // size
        if size < 2:
            raise SpecError(f"adapter {adapter!r}: OFT at {site.name} (in_features={n_in}) gives blocks of {size} "
                            "channel(s), which cannot rotate; choose a smaller r or a larger oft_block_size",
                            field="r" if spec.r else "oft_block_size")
        mod = OFTModule(n_in, site.out_features, blocks=blocks, block_size=size, coft=spec.coft, eps=spec.eps,
                        block_share=spec.block_share, use_cayley_neumann=spec.use_cayley_neumann,
                        num_cayley_neumann_terms=spec.num_cayley_neumann_terms,
                        fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice, total_out=site.total_out,
                        out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)
        if not spec.init_weights:
            with torch.no_grad():
                normal_(mod.oft_R, 0.1, adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        return peft_oft_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["OFT", "OFTMethod", "OFTModule"]
