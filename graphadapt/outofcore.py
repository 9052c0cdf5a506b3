"""Out of core: merge (and export) a model larger than memory, streaming its weights from the checkpoint.

``checkpoint dir (sharded safetensors) + adapters → merged checkpoint dir`` with the same shard layout,
one tensor in memory at a time:

1. :func:`hollow_model` builds the Hugging Face model from the checkpoint's ``config.json`` with every
   large parameter an *untouched* allocation (the kernel maps its pages only when written, so it costs
   no resident memory) and the small ones (norms, biases: under :data:`SMALL` elements) read from the
   checkpoint. ``graphadapt.apply`` / ``load`` capture it as any model (capture reads shapes, not values).
2. :func:`save_merged_from_checkpoint` walks the checkpoint shard by shard, tensor by tensor: it reads
   one tensor with plain file reads (no memory map, so nothing of the checkpoint stays resident), folds
   the adapters of that weight into it (:func:`graphadapt.passes.merge.fold_chain` with ``weight=``: the
   same arithmetic as the in-memory ``save_merged``), writes it and drops it. Output shards have the
   input's file names, tensor names and order, and ``model.safetensors.index.json`` its weight map.

Memory: the adapters, the small tensors, one checkpoint tensor and its merged value.
The hollow model's forward computes garbage (its large weights read as zeros): it is for capture,
planning and export tracing, never for outputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import CheckpointError, MergeError

SMALL = 1 << 16
"""Parameters with at most this many elements are read into the hollow model (norm weights, biases):
the exporter may fold them into other constants, and they are a negligible part of a large model."""

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards + index), read one at a time.

    Only headers are read on construction. :meth:`read` reads one tensor with ``readinto`` into a fresh
    tensor (no memory map: after it is dropped nothing of the file is resident in this process)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory; give the folder of a safetensors "
                                  "checkpoint (model.safetensors or shards with model.safetensors.index.json)")
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from None
            files = sorted(set(weight_map.values()))  # shard file order (index keys may be sorted by tensor)
        elif (self.directory / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise CheckpointError(f"{self.directory} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}; out-of-core "
                                  "merge reads safetensors checkpoints (convert .bin checkpoints first)")
        self.sharded = index.is_file()
        self.shards: dict[str, list[TensorEntry]] = {}
        self.entries: dict[str, TensorEntry] = {}
        for fname in files:
            entries = _read_header(self.directory / fname)
            self.shards[fname] = entries
            for e in entries:
                self.entries[e.name] = e
        self.reads = 0  # tensors read so far (tests count them)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self.read_into(name, torch.empty(e.shape, dtype=e.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` into ``out`` (a contiguous CPU tensor of its shape and dtype, e.g. a hollow
        parameter: its pages are mapped as they are written, no second copy); returns ``out``."""
        e = self.entries[name]
        if tuple(out.shape) != tuple(e.shape) or out.dtype != e.dtype or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise CheckpointError(f"{name} is {tuple(e.shape)} {e.dtype} in {e.file.name}; cannot read it into a "
                                  f"{tuple(out.shape)} {out.dtype} tensor on {out.device}")
        if e.nbytes:
            with open(e.file, "rb") as f:
                f.seek(e.start)
                view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
                got = f.readinto(view)
            if got != e.nbytes:
                raise CheckpointError(f"{e.file.name}: {name} is truncated ({got} of {e.nbytes} bytes)")
        self.reads += 1
        return out


def _read_header(path: Path) -> list[TensorEntry]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    out = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if v.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path.name}: {name} has dtype {v.get('dtype')}, which out-of-core merge does "
                                  f"not read (supported: {sorted(_DTYPES)})")
        a, b = v["data_offsets"]
        out.append(TensorEntry(name, path, _DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + a, b - a))
    out.sort(key=lambda e: e.start)
    return out


# ----------------------------------------------------------------------------- the hollow model
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters (no memory, no init work); buffers stay real (rotary
    frequencies are computed at construction and are in no checkpoint)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def hollow_model(checkpoint_dir: str | os.PathLike, model_class=None, *, small: int = SMALL) -> nn.Module:
    """The checkpoint's Hugging Face model with its large weights unread (see the module docstring).

    ``model_class``: the transformers class to build (default: ``config.architectures[0]``, else
    ``AutoModelForCausalLM``). ``small``: parameters of at most this many elements are read (:data:`SMALL`).
    The model remembers its checkpoint (``graphadapt_checkpoint``) and which parameters are hollow
    (``graphadapt_hollow``: names)."""
    import transformers

    ckpt = Checkpoint(checkpoint_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(ckpt.directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt.directory}: cannot read config.json ({e}); out-of-core merge builds the model "
                              "from the checkpoint's config") from None
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            model_class = transformers.AutoModelForCausalLM
    with _parameters_on_meta():
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    done: dict[int, nn.Parameter] = {}
    missing = []
    hollow: set[str] = set()
    reads = ckpt.reads
    with torch.no_grad():
        for mname, mod in model.named_modules(remove_duplicate=False):
            for leaf, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{mname}.{leaf}" if mname else leaf
                if id(p) not in done:
                    entry = ckpt.entries.get(full)
                    if entry is None:  # tied (its twin is in the checkpoint) or absent: settled below
                        missing.append((full, mod, leaf, p))
                        continue
                    if tuple(entry.shape) != tuple(p.shape):
                        raise CheckpointError(f"{full}: checkpoint shape {entry.shape} != model shape "
                                              f"{tuple(p.shape)} ({model_class.__name__} from config.json)")
                    value = ckpt.read(full) if entry.nbytes // max(1, entry.dtype.itemsize) <= small \
                        else torch.empty(entry.shape, dtype=entry.dtype)  # untouched: no resident pages
                    done[id(p)] = nn.Parameter(value, requires_grad=False)
                    if ckpt.reads == reads:
                        hollow.add(full)
                    reads = ckpt.reads
                mod._parameters[leaf] = done[id(p)]
    for full, mod, leaf, p in missing:  # a tied parameter met before its twin
        if id(p) in done:
            mod._parameters[leaf] = done[id(p)]
    unresolved = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if unresolved:
        raise CheckpointError(f"the checkpoint in {ckpt.directory} lacks {unresolved[:5]} "
                              f"({len(unresolved)} parameter(s) of {model_class.__name__})")
    model.eval().requires_grad_(False)
    model.graphadapt_checkpoint = ckpt
    model.graphadapt_hollow = frozenset(hollow)
    return model


# ----------------------------------------------------------------------------- streamed merge
def _resolve(adapted, checkpoint: Checkpoint | str | os.PathLike | None):
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if checkpoint is None:
        src = adapted.__dict__.get("_source_model")
        ckpt = getattr(src, "graphadapt_checkpoint", None)
        if ckpt is None:
            raise CheckpointError("give the checkpoint directory the base weights are read from")
        return ckpt
    return Checkpoint(checkpoint)


def _adapted(checkpoint: Checkpoint, adapters):
    """An adapted model, or a graphadapt adapter folder loaded onto the hollow model of ``checkpoint``."""
    if isinstance(adapters, (str, os.PathLike)):
        from .api import load

        return load(hollow_model(checkpoint.directory), adapters)
    return adapters


def merge_chains(adapted, checkpoint: Checkpoint, names=None, safe: bool = True) -> dict:
    """``{checkpoint tensor name: FoldChain}`` of every weight (and bias) an adapter folds into; refuses
    adapters that cannot fold and weights the checkpoint does not hold under the model's name."""
    from .passes import merge as merge_pass

    names = None if names is None else ([names] if isinstance(names, str) else list(names))
    if names is not None:
        unknown = set(names) - set(adapted.spec.adapters)
        if unknown:
            raise MergeError(f"unknown adapter(s) {sorted(unknown)}; this model has {list(adapted.spec.adapters)}")
    if adapted.is_merged:
        raise MergeError("the model is merged: its base weights are not read from the checkpoint any more; "
                         "unmerge() first (the streamed merge folds the adapters itself)")
    plan = merge_pass.plan_merge(adapted, names, safe=False, compute=False)
    if plan.kept:
        raise MergeError("cannot write a merged checkpoint: these adapters do not fold into the base weights; "
                         "nothing was written:\n" + "\n".join(f"  {t}: {why}" for t, why in plan.kept.items())
                         + "\nSelect foldable ones with names=[...]")
    if safe:
        merge_pass.check_factors(adapted, plan)
    src = adapted.__dict__.get("_source_model")
    tied = _tied_names(src) if src is not None else {}
    out = {}
    for chain in plan.chains.values():
        for pname in (chain.weight, chain.bias):
            if pname is None:
                continue
            if len(tied.get(pname, ())) > 1:
                raise MergeError(f"an adapter folds into {pname}, which is tied to "
                                 f"{[t for t in tied[pname] if t != pname]}: merging would change both. Leave that "
                                 "layer out of the adapter targets")
            if pname not in checkpoint.entries:
                raise MergeError(f"an adapter folds into {pname}, which the checkpoint in {checkpoint.directory} "
                                 "does not hold under that name; out-of-core merge needs the model's own parameter "
                                 "names in the checkpoint (save it with this transformers version first)")
            out[pname] = chain
    return out


def _tied_names(model) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {n: g for g in groups.values() for n in g}


def merged_tensor(adapted, checkpoint: Checkpoint, chains: dict, name: str, dtype=None, safe: bool = True):
    """The tensor ``name`` of the merged model: read from the checkpoint, folded when an adapter changes it,
    converted to ``dtype`` (floating tensors only)."""
    from .passes import merge as merge_pass

    chain = chains.get(name)
    if chain is None:
        t = checkpoint.read(name)
    else:
        w = checkpoint.read(chain.weight)
        b = checkpoint.read(chain.bias) if chain.bias is not None and chain.part is None else None
        w2, b2 = merge_pass.fold_chain(adapted, chain, safe=safe, weight=w, bias=b)
        t = w2 if name == chain.weight else b2
        del w, b, w2, b2
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def save_merged_from_checkpoint(checkpoint_dir: str | os.PathLike, adapters, directory: str | os.PathLike,
                                names: Iterable[str] | None = None, *, dtype: torch.dtype | str | None = None,
                                safe: bool = True, overwrite: bool = False) -> list[Path]:
    """Write the merged model into ``directory`` streaming base weights from ``checkpoint_dir``.

    ``adapters``: an adapted model (built on :func:`hollow_model` of the checkpoint, or on any model of the
    same parameter names: its own base values are never read) or a graphadapt adapter folder, loaded onto
    the checkpoint's hollow model. The output has the checkpoint's shard files, tensor order and index
    (``model.safetensors.index.json`` marked as graphadapt's), its ``config.json`` (dtype updated) and
    ``generation_config.json``. ``names``/``safe``/``overwrite`` as in :func:`graphadapt.save_merged`;
    ``dtype`` converts floating tensors as they are written. Returns the files written.
    Memory: one checkpoint tensor and its merged value (plus the adapters); never the model."""
    from .checkpoints.merged import _write_safetensors, publish, write_index
    from .dtypes import parse_dtype
    from .writes import check_overwrite_flag, claim_directory, writable_target

    ckpt = Checkpoint(checkpoint_dir)
    adapted = _adapted(ckpt, adapters)
    try:
        tdtype = None if dtype is None else parse_dtype(dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    directory = Path(directory)
    if directory.resolve() == ckpt.directory.resolve():
        raise CheckpointError(f"{directory} is the checkpoint being read; write the merged model elsewhere")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory; give a directory to write into")
    if not directory.parent.is_dir():
        raise CheckpointError(f"{directory.parent} does not exist; create it first")
    writable_target(directory, check_overwrite_flag(overwrite))
    chains = merge_chains(adapted, ckpt, names, safe)
    files = list(ckpt.shards)
    claim_directory(directory, "merged", [WEIGHTS_NAME, INDEX_NAME, "config.json", "generation_config.json",
                                          *files], overwrite=overwrite)

    def dt_of(e: TensorEntry):
        return tdtype if tdtype is not None and e.dtype.is_floating_point else e.dtype

    created = not directory.exists()
    directory.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphadapt-save-", dir=directory))
    try:
        written = _write_config(ckpt, tmp, tdtype)
        weight_map, total = {}, 0
        for fname, entries in ckpt.shards.items():
            items = [(e.name, e.shape, dt_of(e),
                      (lambda n=e.name, d=dt_of(e): merged_tensor(adapted, ckpt, chains, n, d, safe)))
                     for e in entries]
            _write_safetensors(tmp / fname, items)
            written.append(fname)
            for e in entries:
                weight_map[e.name] = fname
                total += e.nbytes if dt_of(e) == e.dtype else e.nbytes // e.dtype.itemsize * dt_of(e).itemsize
        if ckpt.sharded:
            written.append(write_index(tmp, weight_map, total))
        publish(tmp, directory, written, _STALE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return [directory / n for n in written]


_STALE = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)")


def _write_config(ckpt: Checkpoint, tmp: Path, tdtype) -> list[str]:
    written = []
    src = ckpt.directory / "config.json"
    if src.is_file():
        cfg = json.loads(src.read_text())
        dominant = {}
        for e in ckpt.entries.values():
            if e.dtype.is_floating_point:
                dominant[e.dtype] = dominant.get(e.dtype, 0) + e.nbytes
        saved = tdtype or (max(dominant, key=dominant.get) if dominant else None)
        if saved is not None:
            key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
            cfg[key] = str(saved).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
    gen = ckpt.directory / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / "generation_config.json")
        written.append("generation_config.json")
    return written


# ----------------------------------------------------------------------------- export support
class WeightSource:
    """Where a hollow model's base tensors are: its checkpoint. ``read_hollow(name)`` reads a hollow tensor
    (None for the tensors the model holds itself); the exporter writes placeholders for the hollow ones and
    reads each when the ONNX file's external data is written."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, names: Iterable[str] | None = None):
        self.checkpoint = checkpoint
        self.hollow = frozenset(model.graphadapt_hollow if names is None else names)
        params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if n in self.hollow]
        self.storages = {p.untyped_storage().data_ptr(): n for n, p in params}
        for n, p in params:
            e = checkpoint.entries.get(n)
            if e is None or tuple(e.shape) != tuple(p.shape) or e.dtype != p.dtype:
                got = "absent" if e is None else f"{e.shape} {e.dtype}"
                raise CheckpointError(f"{checkpoint.directory}: {n} is {got}, the hollow model's is "
                                      f"{tuple(p.shape)} {p.dtype}; give the checkpoint the model was built from")

    def is_hollow(self, name: str) -> bool:
        return name in self.hollow

    def read_hollow(self, name: str) -> torch.Tensor | None:
        return self.checkpoint.read(name) if name in self.hollow else None


def weight_source(model, weights_from=None) -> WeightSource | None:
    """The :class:`WeightSource` of an adapted model built on :func:`hollow_model` (None for an ordinary
    model). ``weights_from`` (a checkpoint directory) overrides the checkpoint the hollow model remembers;
    given for a model that is not hollow it is refused (its weights are in memory already)."""
    from .hollow import held_hollow

    src = model.__dict__.get("_source_model", model) if hasattr(model, "__dict__") else model
    hollow = getattr(src, "graphadapt_hollow", None)
    # only the hollow tensors ``model`` itself holds: a base quantized from the checkpoint (apply(...,
    # quantize=)) holds packed weights and read values, whatever its source still leaves unread
    held = set(held_hollow(model, src).values()) if hollow and model is not src else hollow
    if not held:
        if weights_from is not None:
            raise CheckpointError("weights_from reads the base weights of a model built by "
                                  "graphadapt.outofcore.hollow_model(checkpoint); this model holds its weights "
                                  "in memory (or quantized from the checkpoint): export it without weights_from")
        return None
    ckpt = src.graphadapt_checkpoint if weights_from is None else _resolve(model, weights_from)
    return WeightSource(ckpt, src, held)


class _LoadHollow:
    """A dispatch mode giving every op that reads a hollow tensor (or a view of one) the checkpoint's value
    instead, read just before the op; the two most recent are kept (a linear and its adapter read the same
    weight), the rest freed."""

    def __new__(cls, source: WeightSource):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_map

        from .hollow import CheckpointReads

        reads = CheckpointReads(source.storages, source.checkpoint.read)

        class Mode(TorchDispatchMode):
            graphadapt_loads_hollow = True  # an adapted hollow model's forward may run under it

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*tree_map(reads.sub, args), **tree_map(reads.sub, kwargs or {}))

        return Mode()


class StreamedReference(nn.Module):
    """``model`` (an adapted hollow model) computing real outputs: each hollow weight is read from the
    checkpoint right before the op that uses it and dropped soon after, so a forward holds a couple of
    weights, never the model. Slow (every weight read from disk per forward): it is the PyTorch reference
    of a verified out-of-core export."""

    def __init__(self, model: nn.Module, source: WeightSource):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: its hollow parameters are not ours
        self._source = source

    def forward(self, *args, **kwargs):
        with _LoadHollow(self._source):
            return self._model(*args, **kwargs)


# ----------------------------------------------------------------------------- check
def check_merged_against_in_memory(checkpoint_dir, adapted, merged_dir) -> dict:
    """Compare a streamed merged checkpoint with an in-memory merge, one input shard at a time
    (:func:`check_merged_shard` for each); returns counts. Raises :class:`MergeError` on a mismatch."""
    ckpt = Checkpoint(checkpoint_dir)
    out = Checkpoint(merged_dir)
    if list(out.shards) != list(ckpt.shards):
        raise MergeError(f"{merged_dir} has shards {list(out.shards)}, the checkpoint {list(ckpt.shards)}")
    counts = {"shards": 0, "tensors": 0, "folded": 0}
    for fname in ckpt.shards:
        for k, v in check_merged_shard(ckpt, adapted, out.directory / fname).items():
            counts[k] += v
    return counts


def check_merged_shard(checkpoint: Checkpoint, adapted, merged_file) -> dict:
    """One shard of a streamed merged checkpoint against an in-memory merge of the same input shard.

    The input shard's tensors are loaded into ``adapted``'s base parameters (that shard only), each weight an
    adapter folds into is merged by the ordinary in-memory path (:func:`graphadapt.passes.merge.fold_chain`
    reading the model's own parameter), and every tensor of ``merged_file`` (same name as the input shard)
    must be bit-identical to it; a folded weight must differ from its base. The parameters are put back
    afterwards. Memory: one input shard."""
    from .passes import merge as merge_pass

    merged_file = Path(merged_file)
    ckpt = checkpoint
    chains = merge_chains(adapted, ckpt)
    entries = ckpt.shards[merged_file.name]
    out = {e.name: e for e in _read_header(merged_file)}
    if list(out) != [e.name for e in entries]:
        raise MergeError(f"{merged_file.name}: merged tensors differ in names or order from the checkpoint's")

    def read_out(name):
        e = out[name]
        t = torch.empty(e.shape, dtype=e.dtype)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t

    owners = {}
    for n, _ in adapted.named_parameters(remove_duplicate=False):
        owner, _, leaf = n.rpartition(".")
        owners[n] = (adapted.get_submodule(owner) if owner else adapted, leaf)
    counts = {"shards": 1, "tensors": 0, "folded": 0}
    saved = {}
    try:
        for e in entries:  # this shard, in memory, in the model
            if e.name in owners:
                mod, leaf = owners[e.name]
                saved[e.name] = mod._parameters[leaf]
                mod._parameters[leaf] = nn.Parameter(ckpt.read(e.name), requires_grad=False)
        for e in entries:
            got = read_out(e.name)
            chain = chains.get(e.name)
            if chain is not None and chain.weight in saved and (chain.bias is None or chain.bias in saved
                                                                or chain.part is not None):
                w2, b2 = merge_pass.fold_chain(adapted, chain, safe=True)
                want = w2 if e.name == chain.weight else b2
                if e.name == chain.weight:
                    if torch.equal(want, adapted.get_parameter(e.name)):
                        raise MergeError(f"{e.name}: the in-memory merge left it unchanged (adapter is zero?)")
                    counts["folded"] += 1
            elif chain is not None:  # its weight/bias lives in another shard: the streamed reader is the reference
                want = merged_tensor(adapted, ckpt, chains, e.name)
            else:
                want = adapted.get_parameter(e.name) if e.name in saved else ckpt.read(e.name)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise MergeError(f"{merged_file.name}: {e.name} of the streamed merge differs from the in-memory merge")
            counts["tensors"] += 1
            del got, want
    finally:
        for name, p in saved.items():
            mod, leaf = owners[name]
            mod._parameters[leaf] = p
    return counts


__all__ = ["Checkpoint", "StreamedReference", "WeightSource", "weight_source", "hollow_model", "save_merged_from_checkpoint", "merged_tensor", "merge_chains",
           "check_merged_against_in_memory", "check_merged_shard"]
