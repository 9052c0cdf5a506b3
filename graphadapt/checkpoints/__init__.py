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
    from .._io import signals_as_exceptions

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
    from ..errors import SpecError
    from ..spec.spec import unique_keys

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
            from safetensors.torch import load_file

            tensors = load_file(str(p))
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, OSError, ...: one clear error
        import pickle

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
    from .._io import check_writable

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d} is an existing file; adapters are saved to a directory "
                              f"({SPEC_FILE} + {WEIGHTS_FILE}). Give a directory path.")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {d}: {e.strerror or e}") from e
    check_writable(d, CheckpointError, "checkpoint directory")
    return d


def save_adapters(adapted, directory: str | os.PathLike, names=None, overwrite: bool = False) -> Path:
    """Save the adapters (weights + spec) of ``adapted`` to ``directory``.

    Files graphadapt did not write there (another tool's checkpoint) are refused unless
    ``overwrite=True`` (:mod:`graphadapt.writes`).

    Each file is written to a temp file and renamed into place; SIGTERM, Ctrl-C or a full
    disk leave any earlier checkpoint intact and no temp files behind.
    """
    from safetensors.torch import save_file

    from ..version import __version__

    from ..writes import check_overwrite_flag, claim_directory

    spec_obj = saved_spec(adapted, names)
    claim_directory(directory, "adapters", [SPEC_FILE, WEIGHTS_FILE], compatible=("pretrained",),
                    overwrite=check_overwrite_flag(overwrite))
    d = check_save_target(directory)
    prefixes = tuple(adapter_prefix(n) for n in spec_obj.module_owners)
    from .trainable import trainable_module_keys

    keep = set(trainable_module_keys(adapted))  # Spec.modules_to_save: saved with the adapters
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapted.state_dict().items()
               if k.startswith(prefixes) or k in keep}
    spec = spec_obj.to_dict()
    meta = {"graphadapt_version": __version__, "source_class": adapted.source_class,
            "format": "graphadapt-adapters/1"}
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=meta))
    # the spec names the weights file's hash: a save interrupted between the two renames leaves a
    # pair that load_adapter_weights refuses instead of mixing new weights with an old spec
    digest = _sha256(d / WEIGHTS_FILE)
    from .pretrained import structure_fingerprint, structure_paths

    where = {"structure_fingerprint": structure_fingerprint(adapted.structure_report),
             "structure_paths": structure_paths(adapted.structure_report)}
    from ..writes import seal

    _atomic_write(d / SPEC_FILE, lambda p: Path(p).write_text(
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


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_spec(directory: str | os.PathLike):
    from ..spec import Spec

    from ..errors import SpecError

    p = Path(directory) / SPEC_FILE
    if not p.exists():
        raise CheckpointError(f"{directory} is not a graphadapt adapter checkpoint (no {SPEC_FILE})")
    data = read_json(p)
    from ..writes import check_seal

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
        from .pretrained import check_structure

        info = read_json(spec_path)
        from ..writes import check_seal

        check_seal(info, spec_path)
        want = info.get("weights_sha256")
        if want is not None and want != _sha256(p):
            raise CheckpointError(f"{p} does not belong to {spec_path} (hash mismatch): the checkpoint was "
                                  "modified or a save was interrupted between its two files; save it again.")
        if "structure_fingerprint" in info:
            info.setdefault("base_model_class", info.get("source_class"))
            rule = check_structure(info, adapted, directory)
    saved = read_tensors(p)
    if rule is not None:
        from .pretrained import rewrite_key

        saved = {rewrite_key(k, rule): v for k, v in saved.items()}
    if skip_modules_to_save:
        saved = {k: v for k, v in saved.items() if k.startswith(adapter_prefix()) or k in adapted.state_dict()}
    own = adapted.state_dict()
    from .trainable import trainable_module_keys

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
