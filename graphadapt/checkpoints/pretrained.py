"""``save_pretrained`` / ``from_pretrained``: an adapter checkpoint that names its base model.

Directory: ``spec.json`` + ``adapters.safetensors`` (as :func:`save_adapters`; only the adapters,
the active set and ``modules_to_save`` — never the base weights) plus ``adapter_config.json``::

    {"format": "graphadapt-pretrained/1", "base_model_class": "transformers....BertForSequenceClassification",
     "structure_signature": {"version": 1, "digest": ..., ...}, "structure_fingerprint": "<v0 sha256>",
     "structure_paths": [[layer, block, role, module path], ...], ...}

The structure record and the module-path mapping are :mod:`graphadapt.checkpoints.matching`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError
from ..version import __version__
from ..writes import check_overwrite_flag, check_seal, claim_directory, seal
from .adapters import SPEC_FILE, WEIGHTS_FILE, save_adapters, saved_spec
from .files import atomic_write, read_json
from .matching import structure_record

CONFIG_FILE = "adapter_config.json"
FORMAT = "graphadapt-pretrained/1"


def pretrained_config(adapted) -> dict:
    return {"format": FORMAT, "base_model_class": adapted.source_class,
            **structure_record(adapted.structure_report),
            "adapters": list(adapted.spec.adapters), "modules_to_save": list(adapted.spec.modules_to_save),
            "graphadapt_version": __version__}


def write_pretrained(adapted, directory: str | os.PathLike, names=None, overwrite: bool = False) -> Path:
    cfg = pretrained_config(adapted)
    cfg["adapters"] = list(saved_spec(adapted, names).adapters)
    claim_directory(directory, "pretrained", [CONFIG_FILE, SPEC_FILE, WEIGHTS_FILE], compatible=("adapters",),
                    overwrite=check_overwrite_flag(overwrite))
    d = save_adapters(adapted, directory, names, overwrite=True)  # claimed just above
    atomic_write(d / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(seal(cfg), indent=2)))
    return d


def read_pretrained_config(directory: str | os.PathLike) -> dict | None:
    """The graphadapt ``adapter_config.json`` of ``directory`` (None when there is none, e.g. a plain
    ``save_adapters`` directory); a PEFT ``adapter_config.json`` raises, naming ``import_peft``."""
    p = Path(directory) / CONFIG_FILE
    if not p.exists():
        return None
    cfg = read_json(p)
    if cfg.get("format") == FORMAT:
        check_seal(cfg, p)
    if cfg.get("format") != FORMAT:
        if "peft_type" in cfg:
            raise CheckpointError(f"{directory} is a PEFT checkpoint; load it with graphadapt.import_peft(model, dir)")
        raise CheckpointError(f"{p} is not a graphadapt adapter config (format {cfg.get('format')!r})")
    return cfg


__all__ = ["CONFIG_FILE", "FORMAT", "pretrained_config", "read_pretrained_config", "write_pretrained"]
