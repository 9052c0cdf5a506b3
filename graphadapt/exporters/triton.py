"""Triton model repository: ``model → <repo>/<name>/{config.pbtxt, <version>/model.onnx}``.

Types and shapes in ``config.pbtxt`` are read back from the exported ONNX graph,
never from the PyTorch side, so the config cannot drift from the file Triton loads.
With ``max_batch_size > 0`` Triton owns the batch axis: it is left out of ``dims``
and every input and output must have a symbolic first axis.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from graphadapt._io import check_writable, signals_as_exceptions
from graphadapt.errors import ExportError
from graphadapt.exporters.onnx import export_onnx
from graphadapt.exporters.verify import graph_io

# onnx.TensorProto element type → Triton data type
TRITON_TYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


def export_triton(
    model: Any,
    repo_dir: str | os.PathLike,
    name: str,
    max_batch_size: int = 8,
    dtype: str = "fp32",
    version: int = 1,
    dynamic_batching: bool | dict[str, Any] = False,
    instance_group: dict[str, Any] | None = None,
    return_report: bool = False,
    **export_kwargs: Any,
) -> Path:
    """Write ``<repo_dir>/<name>/<version>/model.onnx`` and ``<repo_dir>/<name>/config.pbtxt``.

    ``dynamic_batching``: True writes ``dynamic_batching { }`` (Triton groups requests up to
    ``max_batch_size``); a dict sets its fields, e.g. ``{"max_queue_delay_microseconds": 100,
    "preferred_batch_size": [4, 8]}``. ``instance_group``: e.g. ``{"count": 2, "kind": "KIND_CPU"}``
    (``kind``: KIND_AUTO, KIND_CPU, KIND_GPU) — how many copies of the model Triton runs, and where.
    ``export_kwargs`` go to :func:`export_onnx` (``example_inputs``, ``verify``, ``atol`` ...).
    Other versions already in ``<repo_dir>/<name>`` are kept; the same version is replaced.
    Returns the model directory ``<repo_dir>/<name>`` (with ``return_report``: and the
    :class:`ExportReport`, holding the verification figures).
    """
    check_model_name(name)
    check_scheduling(dynamic_batching, instance_group, max_batch_size)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"Triton model versions are integers from 1, got {version!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ExportError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    if max_batch_size > 0 and export_kwargs.get("dynamic") is False:
        raise ExportError("max_batch_size > 0 needs a dynamic batch axis; pass dynamic=True or max_batch_size=0")
    repo = Path(repo_dir)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the Triton repository {repo}: {e}") from e
    check_writable(repo, ExportError, "Triton repository")
    final = repo / name
    if final.resolve().parent != repo.resolve():  # a symlinked <name> pointing elsewhere, or a name escaping repo
        raise ExportError(f"{final} resolves outside the repository {repo}; refusing to write there")
    version_name = str(int(version))
    from graphadapt.writes import claim_triton  # never replace a model or config graphadapt did not write

    claim_triton(final, version_name, export_kwargs.get("overwrite", False), ExportError)

    with signals_as_exceptions():  # SIGTERM runs the finally below: no staging dir is left behind
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo))
        try:
            staged = stage / name
            (staged / version_name).mkdir(parents=True)
            report = export_onnx(model, staged / version_name / "model.onnx", dtype=dtype, **export_kwargs)
            config = triton_config(staged / version_name / "model.onnx", name, max_batch_size, dynamic_batching,
                                   instance_group)
            (staged / "config.pbtxt").write_text(config)
            _install(staged, final, version_name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return (final, report) if return_report else final


_BATCHING_FIELDS = {"max_queue_delay_microseconds": int, "preferred_batch_size": list, "preserve_ordering": bool}
_INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


def check_scheduling(dynamic_batching: Any, instance_group: Any, max_batch_size: int) -> None:
    if isinstance(dynamic_batching, dict):
        for k, v in dynamic_batching.items():
            if k not in _BATCHING_FIELDS or not isinstance(v, _BATCHING_FIELDS[k]) or isinstance(v, bool) != (
                    _BATCHING_FIELDS[k] is bool) or (isinstance(v, int) and not isinstance(v, bool) and v < 0):
                raise ExportError(f"dynamic_batching[{k!r}] = {v!r}: fields are max_queue_delay_microseconds (int "
                                  ">= 0), preferred_batch_size (list of ints), preserve_ordering (bool)")
        sizes = dynamic_batching.get("preferred_batch_size", [])
        if any(isinstance(b, bool) or not isinstance(b, int) or not 0 < b <= max(max_batch_size, 0) for b in sizes):
            raise ExportError(f"preferred_batch_size {sizes} must hold integers in 1..max_batch_size={max_batch_size}")
    elif not isinstance(dynamic_batching, bool):
        raise ExportError(f"dynamic_batching must be True/False or a dict of its fields, got {dynamic_batching!r}")
    if dynamic_batching is not False and max_batch_size <= 0:
        raise ExportError("dynamic_batching needs max_batch_size > 0 (Triton batches requests up to it)")
    if instance_group is not None:
        count, kind = instance_group.get("count", 1), instance_group.get("kind", "KIND_AUTO")
        unknown = set(instance_group) - {"count", "kind"}
        if unknown or isinstance(count, bool) or not isinstance(count, int) or count < 1 or kind not in _INSTANCE_KINDS:
            raise ExportError(f"instance_group {instance_group!r}: give count (an integer >= 1) and kind (one of "
                              f"{', '.join(_INSTANCE_KINDS)})")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_model_name(name: Any) -> str:
    """``name`` if it is a safe Triton model directory name, else :class:`ExportError`.

    One path component: letters, digits, ``_``, ``-``, ``.``, not starting with ``.`` or ``-``
    (so never ``.``, ``..``, a hidden or a nested directory), at most 255 characters.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 255:
        raise ExportError(
            f"Triton model name {name!r} must be one directory name: letters, digits, '_', '-', '.', "
            "not starting with '.' or '-' (no '/', '..' or hidden names), at most 255 characters")
    return name


def _install(staged: Path, final: Path, version_name: str) -> None:
    """Move the staged model dir (or just its version + config) into the repository."""
    if not final.exists():
        os.replace(staged, final)
        return
    target = final / version_name
    parked = staged.parent / "old-version"  # inside the stage dir, so it is removed with it
    if target.exists():
        os.replace(target, parked)
    moved = False
    try:
        os.replace(staged / version_name, target)
        moved = True
        os.replace(staged / "config.pbtxt", final / "config.pbtxt")
    except BaseException:
        if moved:
            shutil.rmtree(target, ignore_errors=True)
        if parked.exists():
            os.replace(parked, target)
        raise


def triton_config(onnx_path: str | os.PathLike, name: str, max_batch_size: int,
                  dynamic_batching: bool | dict[str, Any] = False, instance_group: dict[str, Any] | None = None) -> str:
    """``config.pbtxt`` text for the ONNX file at ``onnx_path`` (onnxruntime backend)."""
    inputs, outputs = graph_io(onnx_path)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    for section, values in (("input", inputs), ("output", outputs)):
        lines.append(f"{section} [")
        entries = []
        for v in values:
            dims = _triton_dims(v, max_batch_size)
            dtype = TRITON_TYPES.get(v["elem_type"])
            if dtype is None:
                raise ExportError(f"{section} '{v['name']}' has ONNX element type {v['elem_type']} that Triton lacks")
            # a per-example scalar ([batch] only) is declared [1] and reshaped back to []
            reshape = "    reshape: { shape: [ ] }\n" if max_batch_size > 0 and len(v["dims"]) == 1 else ""
            entries.append(
                "  {\n"
                f'    name: "{v["name"]}"\n'
                f"    data_type: {dtype}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                f"{reshape}"
                "  }"
            )
        lines.append(",\n".join(entries))
        lines.append("]")
    if dynamic_batching is not False and max_batch_size > 0:
        fields = dynamic_batching if isinstance(dynamic_batching, dict) else {}
        body = " ".join(f"{k}: {_pbtxt(v)}" for k, v in fields.items())
        lines.append(f"dynamic_batching {{ {body} }}" if body else "dynamic_batching { }")
    if instance_group is not None:
        lines.append(f"instance_group [ {{ count: {instance_group.get('count', 1)} "
                     f"kind: {instance_group.get('kind', 'KIND_AUTO')} }} ]")
    return "\n".join(lines) + "\n"


def _pbtxt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[ " + ", ".join(str(x) for x in v) + " ]"
    return str(v)


def _triton_dims(v: dict[str, Any], max_batch_size: int) -> list[int]:
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in v["dims"]]
    if max_batch_size <= 0:
        return dims
    if not v["dims"] or isinstance(v["dims"][0], int) and v["dims"][0] > 0:
        raise ExportError(
            f"'{v['name']}' has no dynamic batch axis (dims {v['dims']}), but max_batch_size={max_batch_size} "
            "makes Triton add one; export with dynamic=True or use max_batch_size=0"
        )
    return dims[1:] or [1]  # Triton needs a dim besides the implicit batch axis


def parse_config(text: str) -> dict[str, Any]:
    """A small reader for the config.pbtxt subset this module writes (for tests and ``graphadapt inspect``)."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            return block("}")
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        pos += 1
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            return tok

    def block(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out[key] = value()
        pos += 1
        return out

    return block(None)
