"""AdapterHub ``LoRAConfig`` with ``composition_mode="add"`` → graphadapt LoRA. The format (keys, weight loading,
the config's defaults) is shared with the IA3 plugin: :mod:`graphadapt.methods.adapterhub_loras`."""

from __future__ import annotations

from collections.abc import Mapping

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.adapterhub_loras import (IA3_DEFAULTS, LORA_DEFAULTS, checkpoint_spec, config_dict, leave_out,
                                                 load_weights, lora_variant, targets)

from .spec import LoRA


def lora_spec_from_config(config: Mapping | str):
    """AdapterHub ``LoRAConfig`` (``composition_mode="add"``, dict or ``"lora"``) → :class:`~graphadapt.LoRA`,
    None for other configs."""
    cfg = config_dict(config, "add")
    if cfg is None or lora_variant(cfg) != "lora":   # VeRA / DVoRA: the vera plugin's
        return None
    if cfg["use_dora"] and cfg["use_gating"]:
        raise CheckpointError("AdapterHub gated DoRA (use_dora with use_gating) is not supported by the importer")
    if cfg["init_weights"] not in ("lora", "bert"):
        raise CheckpointError(f"AdapterHub LoRA init_weights={cfg['init_weights']!r} has no graphadapt LoRA "
                              "equivalent (supported: 'lora', 'bert')")
    try:
        return LoRA(r=cfg["r"], alpha=cfg["alpha"], dropout=float(cfg["dropout"]), targets=targets(cfg),
                    leave_out=leave_out(cfg), init=cfg["init_weights"], use_gating=bool(cfg["use_gating"]),
                    use_dora=bool(cfg["use_dora"]),
                    dora_form="adapterhub" if cfg["use_dora"] else "peft")
    except SpecError as e:
        raise CheckpointError(f"AdapterHub LoRA config does not translate to a graphadapt LoRA: {e}") from e


__all__ = ["IA3_DEFAULTS", "LORA_DEFAULTS", "checkpoint_spec", "config_dict", "leave_out", "load_weights",
           "lora_spec_from_config", "targets"]
