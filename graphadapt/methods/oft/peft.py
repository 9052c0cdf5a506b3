"""PEFT OFT checkpoints → graphadapt OFT: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.oft_R[.<adapter>].weight`` [r, b(b-1)/2]; ours:
``adapters.<name>.<module path>.oft_R`` (same shape).
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import OFT

peft_key = peft_key_reader({"oft_R": "oft_R"})


def peft_oft_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> OFT:
    # module_dropout: PEFT 0.22's Linear OFT builds the dropout layer but never applies it, so it changes nothing
    refuse_peft_options("OFT", cfg)
    try:
        return OFT(r=int(cfg.get("r") or 0), oft_block_size=int(cfg.get("oft_block_size") or 0), targets=targets,
                   coft=bool(cfg.get("coft")), eps=float(cfg.get("eps", 6e-5)),
                   block_share=bool(cfg.get("block_share")),
                   use_cayley_neumann=bool(cfg.get("use_cayley_neumann", False)),
                   num_cayley_neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)))
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT OFTConfig does not translate to a graphadapt OFT: {e}") from e


__all__ = ["peft_key", "peft_oft_spec"]
