"""PEFT BOFT checkpoints → graphadapt BOFT: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.boft_R[.<adapter>]`` [N, D, H, H] and ``…boft_s`` [out, 1]; ours:
``adapters.<name>.<module path>.boft_R`` / ``.boft_s`` (same shapes).
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import BOFT

peft_key = peft_key_reader({"boft_R": "boft_R", "boft_s": "boft_s"})


def saved_factors(cfg: dict, weights: Mapping[str, Any]) -> None:
    """PEFT builds one butterfly factor whatever ``boft_n_butterfly_factor`` says when its CUDA extension
    cannot load (every CPU run): the saved ``boft_R`` [N, …] says how many factors were trained; write it into
    ``cfg`` (the importer's own copy of the config) before the spec is made from it."""
    shapes = {tuple(v.shape)[0] for k, v in weights.items() if (hit := peft_key(k)) and hit[1] == "boft_R"}
    if len(shapes) == 1:
        cfg["boft_n_butterfly_factor"] = shapes.pop()


def peft_boft_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> BOFT:
    # boft_dropout: PEFT 0.22's multiplicative dropout acts in training only (and fails on its 4-d input); an
    # imported adapter in eval mode is unaffected
    refuse_peft_options("BOFT", cfg)
    try:
        return BOFT(boft_block_size=int(cfg.get("boft_block_size") or 0),
                    boft_block_num=int(cfg.get("boft_block_num") or 0),
                    boft_n_butterfly_factor=int(cfg.get("boft_n_butterfly_factor") or 1), targets=targets)
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT BOFTConfig does not translate to a graphadapt BOFT: {e}") from e


__all__ = ["peft_boft_spec", "peft_key", "saved_factors"]
