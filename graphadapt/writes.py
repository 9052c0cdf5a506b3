"""Write policy shared by every writer: a call never destroys a file that is not its own.

Before a writer touches a directory or a file it asks :func:`claim_directory` /
:func:`claim_file`:

* a file the call would replace (or delete) must be one graphadapt wrote for the same kind of
  output (an earlier ``save_adapters`` into the same folder, an earlier ``export_onnx`` of the
  same path); anything else — a Hugging Face model's ``config.json``/``model.safetensors``/
  ``pytorch_model.bin``, PEFT's ``adapter_config.json``, AdapterHub's ``pytorch_adapter.bin``,
  an ONNX file from another tool, any unrelated file — is refused with an error naming the file
  and ``overwrite=True``;
* a directory holding another tool's checkpoint is refused even where no file name collides
  (adapter files dropped into a model folder make both ambiguous to loaders);
* ``overwrite=True`` allows both.

graphadapt marks what it writes so a later call can tell its own files from a user's:
``spec.json`` and ``adapter_config.json`` carry ``graphadapt_version``, safetensors headers a
``graphadapt`` metadata entry, ONNX files ``graphadapt.version`` in ``metadata_props``.

Integrity: :func:`seal` adds ``graphadapt_sha256`` over a JSON object's other fields (canonical
form), :func:`check_seal` refuses a sealed object whose fields were edited (``alpha`` changed in a
saved ``spec.json``); the weights file is covered by the spec's own ``weights_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .errors import CheckpointError

SEAL_KEY = "graphadapt_sha256"
MARK_KEY = "graphadapt"

# file → which tool's checkpoint it belongs to, when graphadapt did not write it
_HF_MODEL = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "generation_config.json")
_PEFT = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_ADAPTERHUB = ("pytorch_adapter.bin", "pytorch_model_head.bin", "head_config.json", "adapter_fusion_config.json")
_OURS = ("spec.json", "adapters.safetensors")


def overwrite_hint(what: str = "") -> str:
    return f"; pass overwrite=True to replace it{what}, or choose another directory"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def safetensors_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors header (None when the file is not one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__")
    except (OSError, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else {}


def _onnx_is_ours(path: Path) -> bool:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file (or unreadable): not ours
        return False
    return any(p.key == "graphadapt.version" for p in proto.metadata_props)


def owner(path: Path) -> str | None:
    """Which kind of graphadapt output ``path`` is (``"adapters"``, ``"pretrained"``, ``"peft"``,
    ``"merged"``, ``"onnx"``, ``"triton"``), or None when graphadapt did not write it."""
    name = path.name
    if not path.is_file():
        return None
    if name == "spec.json":
        data = _json(path)
        return "adapters" if data is not None and "graphadapt_version" in data and "spec" in data else None
    if name == "adapter_config.json":
        data = _json(path)
        if data is None:
            return None
        if str(data.get("format", "")).startswith("graphadapt"):
            return "pretrained"
        # PEFT reads adapter_config.json strictly: graphadapt's PEFT export marks its weights file instead
        return "peft" if owner(path.parent / "adapter_model.safetensors") == "peft" else None
    if name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if name == "model.safetensors.index.json":
            data = _json(path) or {}
            if (data.get("metadata") or {}).get(MARK_KEY) == "merged":
                return "merged"
        for weights in ("model.safetensors", "model.safetensors.index.json"):
            if weights != name and (path.parent / weights).is_file() and owner(path.parent / weights) == "merged":
                return "merged"
        return None
    if name.endswith(".safetensors"):
        meta = safetensors_metadata(path) or {}
        if MARK_KEY in meta:
            return str(meta[MARK_KEY])
        if meta.get("format", "").startswith("graphadapt-adapters"):  # adapters.safetensors (its own mark)
            return "adapters"
        return None
    if name.endswith(".onnx"):
        return "onnx" if _onnx_is_ours(path) else None
    return None


def _foreign_checkpoint(directory: Path) -> tuple[Path, str] | None:
    """The first file of another tool's checkpoint in ``directory`` (and whose), or None."""
    for names, tool in ((_HF_MODEL, "a Hugging Face model"), (_PEFT, "a PEFT adapter"),
                        (_ADAPTERHUB, "an AdapterHub adapter"), (_OURS, "a graphadapt adapter checkpoint")):
        for n in names:
            p = directory / n
            if p.is_file() and owner(p) is None:
                return p, tool
    return None


def _dir_kinds(directory: Path) -> set[str]:
    kinds = set()
    for p in directory.iterdir():
        if p.is_file():
            k = owner(p)
            if k is not None:
                kinds.add(k)
    return kinds


def claim_directory(directory: str | os.PathLike, kind: str, files, *, overwrite: bool = False,
                    compatible=(), error: type[Exception] = CheckpointError) -> None:
    """Refuse (``error``) to write ``files`` (names) into ``directory`` as a ``kind`` output when that would
    replace a file graphadapt did not write for ``kind`` (or a ``compatible`` kind), or when the directory
    holds another tool's checkpoint; ``overwrite=True`` allows both."""
    d = Path(directory)
    if overwrite or not d.is_dir():
        return
    allowed = {kind, *compatible}
    for n in files:
        p = d / n
        if p.exists() or p.is_symlink():
            if not p.is_file() or p.is_symlink():
                raise error(f"{p} exists and is not a regular file; graphadapt will not replace it"
                            + overwrite_hint())
            k = owner(p)
            if k not in allowed:
                whose = f"a graphadapt {k} output" if k else "not written by graphadapt for this kind of output"
                raise error(f"{p} already exists ({whose}); writing here would overwrite it"
                            + overwrite_hint())
    foreign = _foreign_checkpoint(d)
    if foreign is not None:
        p, tool = foreign
        raise error(f"{d} holds {tool} ({p.name}); writing a {kind} checkpoint there would mix two "
                    f"checkpoints in one folder (and may replace {p.name})" + overwrite_hint(" anyway"))
    other = _dir_kinds(d) - allowed - {"onnx"}
    if other:
        raise error(f"{d} holds a graphadapt {sorted(other)[0]} checkpoint; writing a {kind} checkpoint there "
                    "would mix two checkpoints in one folder" + overwrite_hint(" anyway"))


def claim_file(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
               error: type[Exception] = CheckpointError) -> None:
    """Refuse to replace ``path`` unless graphadapt wrote it as a ``kind`` output (or ``overwrite=True``)."""
    p = Path(path)
    if overwrite or not (p.exists() or p.is_symlink()):
        return
    if not p.is_file() or p.is_symlink():
        raise error(f"{p} exists and is not a regular file; graphadapt will not replace it" + overwrite_hint())
    if owner(p) != kind:
        raise error(f"{p} already exists and was not written by graphadapt as a {kind} file; writing would "
                    "overwrite it" + overwrite_hint())


def claim_export(path: str | os.PathLike, overwrite, error: type[Exception] = CheckpointError) -> None:
    """An ONNX file (and its ``<path>.data`` weights) may be replaced only when graphadapt exported it."""
    p = Path(path)
    claim_file(p, "onnx", overwrite=check_overwrite_flag(overwrite, error), error=error)
    data = p.with_name(p.name + ".data")
    if not overwrite and data.exists() and owner(p) != "onnx":
        raise error(f"{data} already exists and does not belong to a graphadapt export at {p}; writing would "
                    "overwrite it" + overwrite_hint())


def claim_triton(final: str | os.PathLike, version: str, overwrite, error: type[Exception] = CheckpointError) -> None:
    """A Triton model folder may be updated only when graphadapt exported into it: the version folder that will
    be replaced holds only a graphadapt ``model.onnx`` (and its ``.data``), and an existing model folder holds at
    least one graphadapt export (its ``config.pbtxt`` is rewritten)."""
    final = Path(final)
    if check_overwrite_flag(overwrite, error) or not final.is_dir():
        return
    target = final / version
    if target.exists():
        ours = target.is_dir() and owner(target / "model.onnx") == "onnx"
        extra = [p.name for p in target.iterdir() if p.name not in ("model.onnx", "model.onnx.data")] \
            if target.is_dir() else [target.name]
        if not ours or extra:
            what = extra[0] if extra else "model.onnx"
            raise error(f"{target} holds {what}, which graphadapt did not export; writing version {version} would "
                        "replace that folder" + overwrite_hint(" (overwrite=True)"))
    has_ours = any(owner(v / "model.onnx") == "onnx" for v in final.iterdir() if v.is_dir())
    if any(final.iterdir()) and not has_ours:
        raise error(f"{final} is a Triton model folder graphadapt did not write; its config.pbtxt would be "
                    "replaced" + overwrite_hint(" (overwrite=True)"))


def writable_target(directory: str | os.PathLike, overwrite: bool, error: type[Exception] = CheckpointError) -> None:
    """Refuse up front (before any work) a target directory that cannot be written: the directory, or
    the parent it would be created in, is read-only, full or missing."""
    from ._io import check_writable

    d = Path(directory)
    if d.is_dir():
        check_writable(d, error, "output directory")
    elif d.parent.is_dir():
        check_writable(d.parent, error, "parent directory")


def check_overwrite_flag(overwrite, error: type[Exception] = CheckpointError) -> bool:
    if not isinstance(overwrite, bool):
        raise error(f"overwrite must be True or False, got {overwrite!r}")
    return overwrite


# ----------------------------------------------------------------------------- integrity
def _canonical(obj: dict) -> bytes:
    return json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def seal(obj: dict) -> dict:
    """``obj`` plus ``graphadapt_sha256``: the SHA-256 of its other fields in canonical JSON."""
    return {**obj, SEAL_KEY: hashlib.sha256(_canonical(obj)).hexdigest()}


def check_seal(obj: dict, path, error: type[Exception] = CheckpointError) -> None:
    """Refuse a sealed object whose fields no longer hash to its seal (an unsealed one is accepted:
    written by graphadapt before seals existed)."""
    want = obj.get(SEAL_KEY)
    if want is None:
        return
    if want != hashlib.sha256(_canonical(obj)).hexdigest():
        raise error(f"{path} was modified after graphadapt wrote it (its {SEAL_KEY} does not match its "
                    "contents, e.g. an edited alpha or target list): the adapter weights were trained for the "
                    "saved values. Save the checkpoint again from the model, or apply the changed spec and "
                    "retrain.")


__all__ = ["claim_directory", "claim_file", "claim_export", "claim_triton", "writable_target", "owner", "seal", "check_seal", "safetensors_metadata",
           "check_overwrite_flag", "SEAL_KEY"]
