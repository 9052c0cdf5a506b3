"""Checkpoint file primitives: atomic writes, validated JSON and tensor reads, tensor compatibility.

Writes are atomic (temp files, then ``os.replace``): an interrupted save leaves any earlier
file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .._io import check_writable, signals_as_exceptions
from ..errors import CheckpointError, SpecError
from ..spec.spec import unique_keys

def atomic_write(path: Path, write) -> None:
    with signals_as_exceptions():  # SIGTERM → exception, so the temp file is removed below
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, Exception) and not isinstance(e, CheckpointError):  # ENOSPC, EROFS, ...
                why = getattr(e, "strerror", None) or e
                raise CheckpointError(f"writing {path} failed ({why}); any earlier {path.name} is unchanged") from e
            raise


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; :class:`CheckpointError` if it is unreadable or not a JSON object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SpecError) as e:
        raise CheckpointError(f"cannot read {p}: {type(e).__name__}: {e}. Is the file truncated or "
                              "hand-edited? Re-create it.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` (or, with ``allow_pickle=True``, a ``.bin``) file, validated.

    Raises :class:`CheckpointError` for an unreadable, truncated or empty file, a non-tensor
    entry, or a float tensor holding NaN/inf (corrupted bytes), naming the file and the key.
    ``.bin`` files are pickles: refused unless ``allow_pickle=True``, and even then read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
    """
    p = Path(path)
    if p.suffix == ".bin" and not allow_pickle:
        raise CheckpointError(
            f"{p} is a pickle (.bin) checkpoint; graphadapt reads .safetensors by default. Convert it "
            "(safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')) or, "
            "if you trust its origin, pass allow_pickle=True (read with torch.load(weights_only=True)).")
    try:
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p} is empty (0 bytes): an interrupted download or save? Re-create it.")
        if p.suffix == ".bin":
            tensors = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(p))
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, OSError, ...: one clear error
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):  # torch's advice is not ours to relay
            raise CheckpointError(
                f"refusing {p}: the pickle holds Python objects other than tensors and plain containers, which "
                "would run code when loaded (a malicious or non-checkpoint file). Nothing was executed. Ask for "
                "the adapter as .safetensors, or re-create it from a source you trust.") from None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"cannot read {p}: {type(e).__name__}: {first}. The file is truncated, corrupted "
                              "or not a tensor file; re-create it.") from e
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{p} holds a {type(tensors).__name__}, not a dict of named tensors")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{p}: tensor {k!r} holds NaN or inf values (corrupted bytes or a diverged "
                                  "training run); refusing to load it.")
    return tensors


def check_tensor(key: str, value: torch.Tensor, target: torch.Tensor, source) -> None:
    """A saved ``value`` may be copied into ``target``: same shape, same dtype kind (float/int/bool)."""
    def kind(t):
        return "float" if t.is_floating_point() else "complex" if t.is_complex() else \
            "bool" if t.dtype == torch.bool else "integer"

    if kind(value) != kind(target):
        raise CheckpointError(f"{source}: tensor {key!r} is {value.dtype} but the model expects a {kind(target)} "
                              f"tensor ({target.dtype}); refusing to cast it. Is this the right checkpoint?")
    if value.shape != target.shape:
        raise CheckpointError(f"{source}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model "
                              f"{tuple(target.shape)}")


def check_save_target(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path if adapters can be saved there (created if missing), else CheckpointError."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d} is an existing file; a checkpoint is saved to a directory. "
                              "Give a directory path.")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {d}: {e.strerror or e}") from e
    check_writable(d, CheckpointError, "checkpoint directory")
    return d




def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_write", "check_save_target", "check_tensor", "read_json", "read_tensors", "sha256_file"]
