"""Adapter checkpoints: ``spec.json`` + ``adapters.safetensors`` in one directory.

(Loading onto a model — apply the saved spec, then these weights — is :func:`graphadapt.load`.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, SpecError
from ..spec import Spec
from ..version import __version__
from ..vocab import adapter_prefix
from ..writes import check_overwrite_flag, check_seal, claim_directory, seal
from .files import atomic_write, check_save_target, check_tensor, read_json, read_tensors, sha256_file
from .matching import RECORD_KEYS, check_structure, rewrite_key, structure_record
from .trainable import trainable_module_keys

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "adapters.safetensors"


def save_adapters(adapted, directory: str | os.PathLike, names=None, overwrite: bool = False) -> Path:
    """Save the adapters (weights + spec) of ``adapted`` to ``directory``.

    Files graphadapt did not write there (another tool's checkpoint) are refused unless
    ``overwrite=True`` (:mod:`graphadapt.writes`).

    Each file is written to a temp file and renamed into place; SIGTERM, Ctrl-C or a full
    disk leave any earlier checkpoint intact and no temp files behind.
    """
    spec_obj = saved_spec(adapted, names)
    claim_directory(directory, "adapters", [SPEC_FILE, WEIGHTS_FILE], compatible=("pretrained",),
                    overwrite=check_overwrite_flag(overwrite))
    where = structure_record(adapted.structure_report)
    d = check_save_target(directory)
    prefixes = tuple(adapter_prefix(n) for n in spec_obj.module_owners)
    keep = set(trainable_module_keys(adapted))  # Spec.modules_to_save: saved with the adapters
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapted.state_dict().items()
               if k.startswith(prefixes) or k in keep}
    spec = spec_obj.to_dict()
    meta = {"graphadapt_version": __version__, "source_class": adapted.source_class,
            "format": "graphadapt-adapters/1"}
    atomic_write(d / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=meta))
    # the spec names the weights file's hash: a save interrupted between the two renames leaves a
    # pair that load_adapter_weights refuses instead of mixing new weights with an old spec
    digest = sha256_file(d / WEIGHTS_FILE)
    atomic_write(d / SPEC_FILE, lambda p: Path(p).write_text(
        json.dumps(seal({"spec": spec, **meta, "weights_sha256": digest, **where}), indent=2)))
    return d


def saved_spec(adapted, names=None):
    """The spec a checkpoint of ``adapted`` holds: the adapters ``names`` (default: all; unknown names raise
    :class:`CheckpointError`), with the current activation (the active names, or the composition when
    every adapter it names is saved)."""
    spec = adapted.spec
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in spec.adapters]
        if unknown or not names:
            raise CheckpointError(f"cannot save adapter(s) {unknown or names}: this model has {list(spec.adapters)}")
    keep = list(spec.adapters) if names is None else [n for n in spec.adapters if n in names]
    comp = spec.composition
    if comp is not None and all(n in keep for n in comp.names()):
        active = comp
    else:
        now = adapted.active_adapters()
        active = tuple(n for n in now if n in keep)
        if comp is None and spec.active is None and len(active) == len(keep):
            active = None  # everything active: keep the spec's default
    return spec.replace(adapters={n: spec.adapters[n] for n in keep}, active=active)


def read_spec(directory: str | os.PathLike):
    p = Path(directory) / SPEC_FILE
    if not p.exists():
        raise CheckpointError(f"{directory} is not a graphadapt adapter checkpoint (no {SPEC_FILE})")
    data = read_json(p)
    check_seal(data, p)
    if not isinstance(data.get("spec"), dict):
        raise CheckpointError(f"{p} has no 'spec' object; is it a graphadapt adapter checkpoint's {SPEC_FILE}?")
    try:
        return Spec.from_dict(data["spec"])
    except SpecError as e:
        raise CheckpointError(f"{p} holds an invalid spec: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p} holds a malformed spec ({type(e).__name__}: {e}); re-save the adapters") from e


def load_adapter_weights(adapted, directory: str | os.PathLike, strict: bool = True,
                         skip_modules_to_save: bool = False) -> list[str]:
    """Copy saved adapter tensors into ``adapted``; returns the keys loaded.

    Every tensor is checked (readable, finite, same shape and dtype kind) before any is copied.
    A checkpoint saved on the same structure under other module paths (``BertForSequenceClassification``
    → ``BertModel``) is mapped through the recognised structure; a different structure is refused.
    ``skip_modules_to_save``: ignore saved whole-module tensors (``modules_to_save``) this model lacks.
    """
    p = Path(directory) / WEIGHTS_FILE
    if not p.exists():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
    spec_path = Path(directory) / SPEC_FILE
    rule = None
    if spec_path.exists():
        info = read_json(spec_path)
        check_seal(info, spec_path)
        want = info.get("weights_sha256")
        if want is not None and want != sha256_file(p):
            raise CheckpointError(f"{p} does not belong to {spec_path} (hash mismatch): the checkpoint was "
                                  "modified or a save was interrupted between its two files; save it again.")
        if any(k in info for k in RECORD_KEYS):
            info.setdefault("base_model_class", info.get("source_class"))
            rule = check_structure(info, adapted, directory)
    saved = read_tensors(p)
    if rule is not None:
        saved = {rewrite_key(k, rule): v for k, v in saved.items()}
    if skip_modules_to_save:
        saved = {k: v for k, v in saved.items() if k.startswith(adapter_prefix()) or k in adapted.state_dict()}
    own = adapted.state_dict()
    ours = {k for k in own if k.startswith(adapter_prefix())} | set(trainable_module_keys(adapted))
    unknown = sorted(set(saved) - ours)
    missing = sorted(ours - set(saved))
    if strict and (unknown or missing):
        raise CheckpointError(
            f"checkpoint {directory} does not match this model's adapters: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]}). "
            "Was it saved for the same base model and spec?")
    for k in saved:
        if k in own:
            check_tensor(k, saved[k], own[k], p)
    with torch.no_grad():
        for k, v in saved.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    return [k for k in saved if k in own]


__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "load_adapter_weights", "read_spec", "save_adapters", "saved_spec"]
