"""Streaming merged checkpoint: ``AdaptedModel → <dir>/{config.json, model*.safetensors}``.

Writes a Hugging Face checkpoint of the source model with every selected adapter folded
in, loadable by ``from_pretrained`` of the source class. One tensor at a time: each
safetensors header is computed from shapes and dtypes alone, then each tensor is folded
(when an adapter merges into it), written straight from its memory and dropped, so the
extra memory is one merged weight (plus one dtype-converted tensor with ``dtype=``); the
model itself is never changed.

Tied weights (``lm_head`` ↔ ``embed_tokens``) are written once under the name transformers
keeps on save. Files are written into a temporary folder inside ``directory`` and moved
into place only when complete; weight files of an earlier save that the new one does
not replace are then removed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..dtypes import parse_dtype
from ..errors import CheckpointError, MergeError
from ..hollow import refuse as refuse_hollow
from ..quantized import dense_base, has_quantized_weights
from ..passes import merge as merge_pass   # attributes read at call time (tests instrument fold_chain)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5_000_000`` / ``"5GB"`` / ``"500MiB"`` → bytes."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"max_shard_size must be a positive number of bytes or a string like '5GB', "
                              f"got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def save_merged(adapted, directory: str | os.PathLike, names: Iterable[str] | None = None, *,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | str | None = None,
                safe: bool = True, overwrite: bool = False) -> list[Path]:
    """Write the merged model as a Hugging Face checkpoint into ``directory``; returns the files written.

    ``names``: adapters to fold (default: all); every selected, active adapter must fold
    (raises :class:`MergeError` like :meth:`AdaptedModel.to_base_model` otherwise).
    ``max_shard_size``: above it, ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json``. ``dtype``: convert floating tensors (``"fp16"``,
    ``torch.bfloat16``) as they are written; default each tensor's own dtype.
    Memory: one merged weight at a time (the model is not changed, nothing else is copied).
    ``overwrite``: replace files graphadapt did not write (a Hugging Face model folder's weights);
    without it such a folder is refused (:mod:`graphadapt.writes`).
    """
    if has_quantized_weights(adapted):  # a packed 4-bit base: fold into its dequantized (dense) weights
        with dense_base(adapted):
            return save_merged(adapted, directory, names, max_shard_size=max_shard_size, dtype=dtype, safe=safe,
                               overwrite=overwrite)
    src = adapted.__dict__.get("_source_model")
    refuse_hollow(adapted, "save_merged()", src)  # graphadapt.outofcore: unread weights live in a checkpoint
    config = getattr(src, "config", None)
    if src is None or config is None or not hasattr(config, "save_pretrained"):
        raise CheckpointError("save_merged needs the source Hugging Face model (with a config) that "
                              "graphadapt.apply was given; use to_base_model() or export_onnx otherwise")
    try:
        tdtype = None if dtype is None else parse_dtype(dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    shard_bytes = parse_size(max_shard_size)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory; give a directory to write the checkpoint into")
    if not directory.parent.is_dir():
        raise CheckpointError(f"{directory.parent} does not exist; create it first")

    from ..writes import check_overwrite_flag, claim_directory, writable_target

    writable_target(directory, check_overwrite_flag(overwrite))
    items = _plan_items(adapted, src, names, safe, tdtype)
    shards = _split(items, shard_bytes)
    claim_directory(directory, "merged", [WEIGHTS_NAME, INDEX_NAME, "config.json", "generation_config.json"]
                    + [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))],
                    overwrite=overwrite)

    created = not directory.exists()
    directory.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphadapt-save-", dir=directory))
    try:
        cfg = copy.deepcopy(config)
        saved_dtype = tdtype or _dominant_dtype(items)
        if saved_dtype is not None:
            try:  # transformers 5 calls it dtype, 4.x torch_dtype
                setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", saved_dtype)
            except Exception:  # noqa: BLE001 - a config without a settable dtype keeps its own
                pass
        cfg.save_pretrained(tmp)
        gen = getattr(src, "generation_config", None)
        if gen is not None and getattr(src, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        written = [p.name for p in tmp.iterdir()]
        if len(shards) == 1:
            _write_safetensors(tmp / WEIGHTS_NAME, shards[0])
            written.append(WEIGHTS_NAME)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard)
                written.append(fname)
                for name, shape, dt, _ in shard:
                    weight_map[name] = fname
                    total += _nbytes(shape, dt)
            written.append(write_index(tmp, weight_map, total))
        publish(tmp, directory, written, STALE_WEIGHTS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return [directory / n for n in written]


#: weight files an earlier merged save may have left (safetensors and .bin, sharded or not)
STALE_WEIGHTS = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                           r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)")


def write_index(tmp: Path, weight_map: dict[str, str], total: int) -> str:
    """Write the shards' ``model.safetensors.index.json`` into ``tmp``; returns its file name."""
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total, "graphadapt": "merged"},
                                              "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return INDEX_NAME


def publish(tmp: Path, directory: Path, written: list[str], stale: re.Pattern) -> None:
    """Move the files ``written`` from ``tmp`` into ``directory`` (one rename each), then remove the weight files
    matching ``stale`` that this save did not write (an earlier save's other shard layout)."""
    for name in written:
        os.replace(tmp / name, directory / name)
    for old in directory.iterdir():
        if old.is_file() and stale.fullmatch(old.name) and old.name not in written:
            old.unlink()


# ----------------------------------------------------------------------------- planning
_Item = tuple  # (name, shape, dtype, produce: () -> contiguous CPU tensor)


def _plan_items(adapted, src, names, safe: bool, tdtype) -> list[_Item]:
    """Every tensor to write, in state-dict order, with a function producing its value."""
    names = None if names is None else ([names] if isinstance(names, str) else list(names))
    if names is not None:
        unknown = set(names) - set(adapted.spec.adapters)
        if unknown:
            raise MergeError(f"unknown adapter(s) {sorted(unknown)}; this model has {list(adapted.spec.adapters)}")
    merged_already = adapted.is_merged
    chains = {}
    if not merged_already:
        plan = merge_pass.plan_merge(adapted, names, safe=False, compute=False)
        if plan.kept:
            raise MergeError("cannot write a merged checkpoint: these adapters do not fold into the base weights; "
                             "nothing was written:\n" + "\n".join(f"  {t}: {why}" for t, why in plan.kept.items())
                             + "\nExport with export_onnx(merge=False), or select foldable ones with names=[...]")
        if safe:
            merge_pass.check_factors(adapted, plan)
        chains = {c.weight: c for c in plan.chains.values()}
    elif adapted._merge_state["report"].kept:
        raise MergeError("cannot write a merged checkpoint: the model is merged but keeps unfoldable adapters "
                         f"in its graph ({list(adapted._merge_state['report'].kept)})")

    state = src.state_dict()  # views over the source's storage: no copy
    for key in getattr(src, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    aliases = _aliases(state)
    try:
        # here, not at module level: transformers.modeling_utils takes seconds to import and only this path needs it
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        kept = remove_tied_weights_from_state_dict(dict(state), src)
    except ImportError:  # transformers without the helper: keep the first name of each tied group
        seen, kept = set(), {}
        for k, v in state.items():
            if _storage_key(v) not in seen:
                seen.add(_storage_key(v))
                kept[k] = v
    own = dict(adapted.named_parameters(remove_duplicate=False))
    own.update(dict(adapted.named_buffers(remove_duplicate=False)))
    for w, chain in chains.items():
        tied = [a for a in aliases.get(w, ()) if a != w]
        if tied:
            raise MergeError(f"an adapter folds into {w}, which is tied to {tied}: merging would change both. "
                             "Leave that layer out of the adapter targets, or untie the weights "
                             "(config.tie_word_embeddings=False) before graphadapt.apply")

    items: list[_Item] = []
    for key in kept:
        value = next((own[a] for a in [key, *aliases.get(key, ())] if a in own), state[key])
        name_in_model = next((a for a in [key, *aliases.get(key, ())] if a in chains), None)
        dt = value.dtype if (tdtype is None or not value.is_floating_point()) else tdtype
        shape = tuple(value.shape)
        if name_in_model is not None:
            chain = chains[name_in_model]
            produce = _folder(adapted, chain, safe, dt, merge_pass.fold_chain)
        else:
            produce = _converter(value, dt)
        items.append((key, shape, dt, produce))
    return items


def _folder(adapted, chain, safe, dt, fold_chain) -> Callable[[], torch.Tensor]:
    def produce():
        w2, _ = fold_chain(adapted, chain, safe=safe)
        return w2.to(dt).contiguous()
    return produce


def _converter(value: torch.Tensor, dt) -> Callable[[], torch.Tensor]:
    return lambda: value.detach().to(device="cpu", dtype=dt).contiguous()


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    groups: dict = {}
    for k, v in state.items():
        groups.setdefault(_storage_key(v), []).append(k)
    return {k: g for g in groups.values() if len(g) > 1 for k in g}


def _dominant_dtype(items: list[_Item]):
    counts: dict = {}
    for _, shape, dt, _ in items:
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + _nbytes(shape, dt)
    return max(counts, key=counts.get) if counts else None


def _nbytes(shape, dt) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dt).element_size()


def _split(items: list[_Item], limit: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        nb = _nbytes(it[1], it[2])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += nb
    return shards


# ----------------------------------------------------------------------------- safetensors
def _write_safetensors(path: Path, items: list[_Item]) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data),
    header first from shapes alone, then each tensor's bytes straight from its memory."""
    if any(dt not in _ST_DTYPES for _, _, dt, _ in items):
        bad = sorted({str(dt) for _, _, dt, _ in items if dt not in _ST_DTYPES})
        raise CheckpointError(f"safetensors cannot hold tensors of dtype {bad}")
    header: dict = {"__metadata__": {"format": "pt", "graphadapt": "merged"}}
    offset = 0
    for name, shape, dt, _ in items:
        nb = _nbytes(shape, dt)
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt, produce in items:
            t = produce()
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise CheckpointError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dt}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
