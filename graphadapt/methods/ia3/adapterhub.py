"""AdapterHub IA3 (``LoRAConfig`` with ``composition_mode="scale"``) → graphadapt IA3. Keys and weight loading
are AdapterHub's LoRA-family format, shared with the LoRA plugin (:mod:`graphadapt.methods.adapterhub_loras`)."""

from __future__ import annotations

from collections.abc import Mapping

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.adapterhub_loras import checkpoint_spec, config_dict, leave_out, load_weights, targets

from .spec import IA3


def ia3_spec_from_config(config: Mapping | str):
    """AdapterHub IA3 (``LoRAConfig`` with ``composition_mode="scale"``, dict or ``"ia3"``) →
    :class:`~graphadapt.IA3` with AdapterHub's semantics (output scaling ``alpha·l`` at every site, or
    ``g·l`` gated), None for other configs. ``init_weights`` other than ``"ia3"`` (ones) only matter
    at AdapterHub's initialisation; graphadapt starts at ones, and an import replaces them anyway."""
    cfg = config_dict(config, "scale")
    if cfg is None:
        return None
    if cfg["r"] != 1:
        raise CheckpointError(f"AdapterHub IA3 (composition_mode='scale') needs r=1, got r={cfg['r']}")
    if cfg["dropout"]:
        raise CheckpointError(f"AdapterHub IA3 does not support dropout, got {cfg['dropout']}")
    try:
        return IA3(targets=targets(cfg), feedforward=(), leave_out=leave_out(cfg), alpha=cfg["alpha"],
                   use_gating=bool(cfg["use_gating"]))
    except SpecError as e:
        raise CheckpointError(f"AdapterHub IA3 config does not translate to a graphadapt IA3: {e}") from e


__all__ = ["checkpoint_spec", "ia3_spec_from_config", "load_weights"]
