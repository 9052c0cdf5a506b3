"""Adapter checkpoints: ``spec.json`` + ``adapters.safetensors`` in one directory.

(Loading onto a model — apply the saved spec, then these weights — is :func:`graphadapt.load`.)

Writes are atomic (temp files, then ``os.replace``): an interrupted save leaves any earlier
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..vocab import adapter_prefix

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "adapters.safetensors"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapters(adapted, directory: str | os.PathLike, names=None) -> Path:
    """Save the adapters (weights + spec) of ``adapted`` to ``directory``."""
    from safetensors.torch import save_file

    from ..version import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    prefixes = tuple(adapter_prefix(n) for n in (names or adapted.spec.module_owners))
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapted.state_dict().items() if k.startswith(prefixes)}
    spec = adapted.spec.to_dict()
    meta = {"graphadapt_version": __version__, "source_class": adapted.source_class,
            "format": "graphadapt-adapters/1"}
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=meta))
    _atomic_write(d / SPEC_FILE, lambda p: Path(p).write_text(json.dumps({"spec": spec, **meta}, indent=2)))
    return d


def read_spec(directory: str | os.PathLike):
    from ..spec import Spec

    p = Path(directory) / SPEC_FILE
    if not p.exists():
        raise CheckpointError(f"{directory} is not a graphadapt adapter checkpoint (no {SPEC_FILE})")
    return Spec.from_dict(json.loads(p.read_text())["spec"])


def load_adapter_weights(adapted, directory: str | os.PathLike, strict: bool = True) -> list[str]:
    """Copy saved adapter tensors into ``adapted``; returns the keys loaded."""
    from safetensors.torch import load_file

    p = Path(directory) / WEIGHTS_FILE
    if not p.exists():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
    saved = load_file(str(p))
    own = adapted.state_dict()
    ours = {k for k in own if k.startswith(adapter_prefix())}
    unknown = sorted(set(saved) - ours)
    missing = sorted(ours - set(saved))
    if strict and (unknown or missing):
        raise CheckpointError(
            f"checkpoint {directory} does not match this model's adapters: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]}). "
            "Was it saved for the same base model and spec?")
    bad = [k for k in saved if k in own and own[k].shape != saved[k].shape]
    if bad:
        raise CheckpointError(f"shape mismatch for {bad[:3]}: checkpoint {tuple(saved[bad[0]].shape)} vs "
                              f"model {tuple(own[bad[0]].shape)}")
    with torch.no_grad():
        for k, v in saved.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    return [k for k in saved if k in own]
