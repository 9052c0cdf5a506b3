"""Write one adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable
by ``peft.PeftModel.from_pretrained(base, dir)`` and back by :func:`graphadapt.import_peft`.

Generic over methods: the adapter's plugin translates its spec and tensors (``Method.peft_export``);
methods without it (or options PEFT cannot express) raise :class:`CheckpointError`.
A key the plugin returns under ``base_model.`` is an adapter-wide tensor and is written as is (PEFT's
``base_model.vera_A``); the others are module paths and get PEFT's ``base_model.model.`` prefix.
``modules_to_save`` go along under PEFT's keys (``base_model.model.<path>.<tensor>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CheckpointError
from ..methods import get_method, registered
from ..methods.base import Method
from ..writes import MARK_KEY, check_overwrite_flag, claim_directory
from .files import atomic_write, check_save_target
from .trainable import trainable_module_tensors


SHARED_PREFIX = "base_model."


def write_peft(adapted, directory: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
    spec = adapted.spec
    if adapted.is_merged:
        raise CheckpointError("unmerge() before to_peft (merged weights live in the base)")
    if name is None:
        if len(spec.adapters) != 1:
            raise CheckpointError(f"to_peft writes one adapter; name it: to_peft(dir, name=...) with one of "
                                  f"{list(spec.adapters)}")
        name = next(iter(spec.adapters))
    if name not in spec.adapters:
        raise CheckpointError(f"unknown adapter {name!r}; this model has {list(spec.adapters)}")
    method = get_method(spec.adapters[name])
    records = [r for r in adapted.adapter_records if r.adapter == name]
    modules = {r.site: adapted.get_submodule(r.target) for r in records}
    if type(method).peft_export is Method.peft_export:
        can = sorted(m.name for m in registered() if type(m).peft_export is not Method.peft_export)
        raise CheckpointError(f"{method.name} adapters have no PEFT format in graphadapt (supported: "
                              f"{', '.join(can)}); save with save_adapters instead")
    fields, tensors = method.peft_export(spec.adapters[name], modules, records)
    cls = adapted.source_class
    cfg = {"base_model_name_or_path": None, "revision": None, "task_type": None, "inference_mode": True,
           "auto_mapping": {"base_model_class": cls.rsplit(".", 1)[-1], "parent_library": cls.rsplit(".", 1)[0]},
           "modules_to_save": list(spec.modules_to_save) or None, **fields}
    # keys of adapter-wide tensors (VeRA's projections, a VB-LoRA bank) come as PEFT writes them ("base_model.<x>")
    out = {(k if k.startswith(SHARED_PREFIX) else f"base_model.model.{k}"): v.detach().contiguous().cpu()
           for k, v in tensors.items()}
    out.update({f"base_model.model.{k}": v.detach().contiguous().cpu()
                for k, v in trainable_module_tensors(adapted).items()})
    claim_directory(directory, "peft", ["adapter_model.safetensors", "adapter_config.json"],
                    overwrite=check_overwrite_flag(overwrite))
    d = check_save_target(directory)
    atomic_write(d / "adapter_model.safetensors",
                 lambda p: save_file(out, p, metadata={"format": "pt", MARK_KEY: "peft"}))
    atomic_write(d / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    return d


__all__ = ["write_peft"]
