"""Program cache: a captured program on disk, so capturing a known model again is a load, not a trace.

    capture(model, inputs, options) ─▶ key ──hit──▶ torch.export.load ─▶ the model's own tensors bound in
                                           └─miss─▶ torch.export.export ─▶ stored (weights left out)

What is stored is the ``ExportedProgram`` torch.export produced (``torch.export.save``), with every
parameter and buffer replaced by a one-element placeholder: an entry holds the graph, never weights.
On a hit the placeholders are replaced by the caller's own tensors (by name), so the loaded program
computes with the weights the model has now.

**Opt-in, where**: off unless asked for — ``$GRAPHADAPT_CACHE`` naming a directory turns it on there;
``graphadapt.apply(..., program_cache=True)`` turns it on for one call (in ``$GRAPHADAPT_CACHE``, else
``$XDG_CACHE_HOME/graphadapt/programs``, else ``~/.cache/graphadapt/programs``). ``GRAPHADAPT_CACHE=off`` (or
``0``/``false``/``no``/``none``) or ``program_cache=False`` keeps it off. Nothing is written outside that
directory. Clear it with :func:`clear` or by deleting the directory.

**Key** (:func:`program_key`): everything the trace depends on — graphadapt, torch, transformers and
Python versions; the model's class and the bytes of the source file of every module class in it;
the config (all fields, ``_attn_implementation`` included); every submodule's path, class and plain
attributes (``eps``, ``scaling``, flags); every parameter's and buffer's name, shape, dtype and
device; the example inputs' names, shapes and dtypes and the non-tensor values; the capture options
(dynamic axes, values bound into ``**kwargs``); torch's default dtype. Tensor *values* are not in the
key: torch.export traces with fake tensors and never reads them. The adapter spec is not in the key
either: the program is the base model's, before any adapter is inserted, so every spec shares it.

A model the key cannot describe is not cached (and traced as before): a module with forward hooks or an
instance-level ``forward`` (accelerate's dispatch hooks), a class without a source file (generated
code), parameters of another class than ``nn.Parameter`` (quantized weights).

**Never a wrong model**: an entry is a directory ``<key>/`` holding ``program.pt2`` and ``meta.json``
(the full key text and the SHA-256 of the program). A hit requires the key text to be equal and the
hash to match; after loading, every stored placeholder must be a name the model has, with the same
shape and dtype, and the program's inputs must be the ones asked for. Anything else — a truncated or
edited file, a torch that cannot read it, a stale entry — is discarded and the model is traced again
(and the entry rewritten).

**Concurrent writers**: an entry is written into a private temporary directory inside the cache and
renamed into place in one step; a writer that loses the race drops its copy. Readers hash what they
read, so a half-written file is never used.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .version import __version__

__all__ = ["ENV", "cache_root", "program_key", "load_program", "store_program", "clear", "stats"]

ENV = "GRAPHADAPT_CACHE"
FORMAT = 1
_OFF = ("off", "0", "false", "no", "none", "disabled")
_PROGRAM, _META = "program.pt2", "meta.json"
log = logging.getLogger("graphadapt.program_cache")

#: What happened since the process started (or the last ``stats.clear()``): ``traced`` (torch.export
#: ran), ``hit``, ``absent`` (no entry), ``stored``, ``rejected`` (an entry found but not used), ``uncacheable``.
stats: collections.Counter = collections.Counter()


def cache_root(flag: bool | None = None) -> Path | None:
    """The cache directory, or None when caching is off. Opt-in (graphadapt writes nowhere the caller did not
    name): on when ``GRAPHADAPT_CACHE`` names a directory, or for a call with ``program_cache=True`` (then
    ``$XDG_CACHE_HOME/graphadapt/programs`` or ``~/.cache/graphadapt/programs`` unless the variable names one);
    off with ``flag=False``, ``GRAPHADAPT_CACHE=off``, or neither set."""
    if flag is False:
        return None
    env = os.environ.get(ENV)
    if env is not None and env.strip().lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser()
    if flag is not True:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphadapt" / "programs"


def clear(root: str | os.PathLike | None = None) -> int:
    """Delete every entry of the cache (``root`` or :func:`cache_root`); returns how many were removed."""
    root = Path(root) if root is not None else cache_root()
    if root is None or not root.is_dir():
        return 0
    n = 0
    for p in root.iterdir():
        if p.is_dir() and (p / _META).exists() or p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


# --------------------------------------------------------------------------- key
_FILE_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    k = (path, st.st_mtime_ns, st.st_size)
    if k not in _FILE_DIGESTS:
        try:
            _FILE_DIGESTS[k] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return None
    return _FILE_DIGESTS[k]


def _class_source(cls: type) -> str | None:
    """Digest of the file defining ``cls`` and of its ``forward`` (None: generated code, not cacheable)."""
    files = []
    for c in cls.__mro__:
        if c in (nn.Module, object) or c.__module__.startswith("torch."):
            continue
        mod = sys.modules.get(c.__module__)
        f = getattr(mod, "__file__", None)
        if not f:
            return None
        files.append(f)
    fwd = getattr(cls, "forward", None)
    code = getattr(fwd, "__code__", None)
    if code is not None and not code.co_filename.startswith("<") and code.co_filename not in files:
        files.append(code.co_filename)
    elif code is not None and code.co_filename.startswith("<"):
        return None
    digests = [_file_digest(f) for f in dict.fromkeys(files)]
    if any(d is None for d in digests):
        return None
    if code is not None:  # a forward patched onto the class (same files, another function)
        digests.append(f"{getattr(fwd, '__qualname__', '')}@{code.co_firstlineno}:"
                       f"{hashlib.sha256(code.co_code).hexdigest()[:16]}")
    return ",".join(digests)


def _plain(v: Any, depth: int = 0) -> Any:
    """A JSON-able description of an attribute value (objects by class name only)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v if not isinstance(v, float) or v == v else "nan"
    if isinstance(v, (torch.dtype, torch.device, torch.Size)):
        return str(v)
    if isinstance(v, (tuple, list)) and depth < 2:
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, dict) and depth < 2 and all(isinstance(k, str) for k in v):
        return {k: _plain(x, depth + 1) for k, x in sorted(v.items())}
    if callable(v):
        return f"<{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__qualname__)}>"
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _config_text(cfg) -> Any:
    if cfg is None:
        return None
    try:
        d = cfg.to_dict()
    except Exception:  # noqa: BLE001 - a config without to_dict: its repr
        return repr(cfg)
    d = dict(d)
    d["_attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return json.loads(json.dumps(d, sort_keys=True, default=repr))


def _tensor_desc(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype), str(t.device), type(t).__name__]


def program_key(model: nn.Module, kwargs: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, str] | str:
    """``(key, key text)`` for capturing ``model`` on ``kwargs`` with ``options``, or the reason it cannot be cached."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    modules, configs, sources = [], {}, {}
    for name, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return f"module {name or '<root>'} has forward hooks or its own forward"
        if cls not in sources:
            src = _class_source(cls)
            if src is None:
                return f"{cls.__qualname__} has no source file"
            sources[cls] = src
        attrs = {}
        for k, v in m.__dict__.items():
            if k.startswith("_") or k == "training":
                continue
            if hasattr(v, "to_dict") and hasattr(v, "model_type"):  # a (sub-)config: described once
                configs.setdefault(id(v), _config_text(v))
                v = "<config>"
            attrs[k] = _plain(v)
        modules.append([name, f"{cls.__module__}.{cls.__qualname__}", attrs])
    tensors = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if type(p) is not nn.Parameter:
            return f"parameter {name} is a {type(p).__name__}, not an nn.Parameter"
        tensors.append([name, *_tensor_desc(p), bool(p.requires_grad)])
    for name, b in model.named_buffers(remove_duplicate=False):
        if type(b) is not torch.Tensor:
            return f"buffer {name} is a {type(b).__name__}"
        tensors.append([name, *_tensor_desc(b)])
    inputs = [[k, _tensor_desc(v) if isinstance(v, torch.Tensor) else _plain(v)] for k, v in kwargs.items()]
    tf = sys.modules.get("transformers")
    material = {
        "format": FORMAT,
        "versions": {"graphadapt": __version__, "torch": torch.__version__,
                     "transformers": getattr(tf, "__version__", None),
                     "python": ".".join(map(str, sys.version_info[:3]))},
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sources": sorted(sources.values()),
        "config": _config_text(getattr(model, "config", None)),
        "sub_configs": sorted(json.dumps(c, sort_keys=True) for c in configs.values()),
        "modules": modules,
        "tensors": tensors,
        "inputs": inputs,
        "options": {k: _plain(v) for k, v in sorted(options.items())},
        "default_dtype": str(torch.get_default_dtype()),
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:40], text


# --------------------------------------------------------------------------- (de)serialising
# torch.export.save/load go through JSON and parse every symbolic size with sympy's parse_expr (which
# re-runs ``from sympy import *`` per expression): loading MiniLM's program took half as long as tracing it.
# The entry pickles torch's own serialised form (the ``torch._export.serde.schema`` dataclasses; read back
# by a restricted unpickler that builds nothing else), leaves the weights out (the model's own tensors are
# handed to the deserializer by name) and memoises ``sympify`` during the load on its full input.
_SCHEMA_MODULES = ("torch._export.serde.schema", "torch._export.serde.union")
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
                 ("copyreg", "_reconstructor"), ("builtins", "object"), ("torch.torch_version", "TorchVersion")}


class _SchemaUnpickler(__import__("pickle").Unpickler):
    def find_class(self, module: str, name: str):
        if module in _SCHEMA_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(f"unexpected global {module}.{name} in a cached program")


class _MemoSympy:
    """``sympy`` as seen by torch's deserializer, with ``sympify`` memoised on (text, locals): same key, same result."""

    def __init__(self, sympy):
        self._sympy, self._memo = sympy, {}

    def __getattr__(self, name):
        return getattr(self._sympy, name)

    def sympify(self, a, *args, **kwargs):
        if not isinstance(a, str) or args or set(kwargs) - {"locals"}:
            return self._sympy.sympify(a, *args, **kwargs)
        loc = kwargs.get("locals") or {}
        try:
            key = (a, frozenset(loc.items()))
        except TypeError:
            return self._sympy.sympify(a, **kwargs)
        if key not in self._memo:
            self._memo[key] = self._sympy.sympify(a, **kwargs)
        return self._memo[key]


@contextlib.contextmanager
def _fast_sympify(serde):
    real = serde.sympy
    serde.sympy = _MemoSympy(real)
    try:
        yield
    finally:
        serde.sympy = real


def _serialize_program(ep):
    """torch's schema form of ``ep`` (what ``torch.export.save`` writes as JSON), weights left out; None when it
    holds script objects. ``ExportedProgramSerializer.serialize`` does the same plus a ``canonicalize`` check
    that deep-copies the whole program (two thirds of its time on MiniLM); its steps without that check are
    done here, and any change of torch's private API falls back to it."""
    from torch._export.serde import serialize as serde

    try:
        gms = serde.GraphModuleSerializer(ep.graph_signature, ep.module_call_graph)
        graph_module = gms.serialize(ep.graph_module)
        if gms.custom_objs:
            return None
        return serde.ExportedProgram(
            graph_module=graph_module, opset_version=serde.ExportedProgramSerializer().opset_version,
            range_constraints=serde.serialize_range_constraints(ep.range_constraints),
            schema_version=serde.SchemaVersion(major=serde.SCHEMA_VERSION[0], minor=serde.SCHEMA_VERSION[1]),
            verifiers=[v.dialect for v in ep.verifiers], torch_version=torch.__version__,
            guards_code=ep._guards_code)
    except (AttributeError, TypeError, ImportError):
        ser = serde.ExportedProgramSerializer().serialize(ep, serialize_state_dict=False, serialize_constants=False,
                                                          serialize_example_inputs=False)
        return ser.exported_program


def _dumps(ep, model: nn.Module) -> bytes | None:
    import pickle

    mine = _model_tensors(model)
    if any(not isinstance(v, torch.Tensor) for v in ep.constants.values()):
        return None  # script objects: not cached
    missing = [k for k in ep.state_dict if k not in mine]
    if missing:
        return None
    program = _serialize_program(ep)
    if program is None:
        return None
    own = {k: v.detach().clone() for k, v in ep.constants.items() if k not in mine}
    buf = io.BytesIO()
    torch.save(own, buf)
    payload = {"program": program,
               "state_dict": [[k, isinstance(v, nn.Parameter)] for k, v in ep.state_dict.items()],
               "bound_constants": sorted(k for k in ep.constants if k in mine),
               "own_constants": buf.getvalue()}
    return pickle.dumps(payload, protocol=4)


def _loads(data: bytes, model: nn.Module, example_inputs):
    from torch._export.serde import serialize as serde

    payload = _SchemaUnpickler(io.BytesIO(data)).load()
    mine = _model_tensors(model)
    state_dict = {}
    for k, is_param in payload["state_dict"]:
        t = mine[k]  # KeyError: rejected by the caller
        state_dict[k] = t if isinstance(t, nn.Parameter) or not is_param else nn.Parameter(t, requires_grad=False)
    constants = {k: mine[k] for k in payload["bound_constants"]}
    constants.update(torch.load(io.BytesIO(payload["own_constants"]), weights_only=True))
    with _fast_sympify(serde):
        return serde.ExportedProgramDeserializer().deserialize(payload["program"], state_dict, constants,
                                                                 example_inputs)


# --------------------------------------------------------------------------- tensors of the model
def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    out.update(model.named_parameters(remove_duplicate=False))
    return out


# --------------------------------------------------------------------------- store / load
def store_program(root: Path, key: str, text: str, ep, model: nn.Module) -> bool:
    """Write ``ep`` (weights left out) as entry ``key``; False when it could not be written (never raises)."""
    tmp = None
    try:
        data = _dumps(ep, model)
        if data is None:
            stats["uncacheable"] += 1
            return False
        root.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "graphadapt_version": __version__, "key": key,
                "sha256": hashlib.sha256(data).hexdigest(), "key_text": text}
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        (tmp / _PROGRAM).write_bytes(data)
        (tmp / _META).write_text(json.dumps(meta), encoding="utf-8")
        final = root / key
        if final.exists():  # a stale entry we rejected: move it aside first (a rename, atomic)
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=root))
            with contextlib.suppress(OSError):
                os.replace(final, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another writer put the same entry in place first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        tmp = None
        stats["stored"] += 1
        return True
    except Exception as e:  # noqa: BLE001 - a cache that cannot write must not break a capture
        log.info("graphadapt program cache: could not store %s in %s: %s", key, root, e)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _reject(entry: Path, why: str) -> None:
    stats["rejected"] += 1
    log.info("graphadapt program cache: entry %s not used (%s); capturing again", entry, why)


def load_program(root: Path, key: str, text: str, model: nn.Module, kwargs: Mapping[str, Any]) -> Any | None:
    """The cached program for ``key`` with the model's own tensors bound in, or None (miss or rejected entry).

    ``kwargs`` are the example inputs the program would have been traced on (``ep.example_inputs``: the
    unlifted module's input guards are generated from them, as after a trace)."""
    entry = root / key
    try:
        meta = json.loads((entry / _META).read_text(encoding="utf-8"))
        data = (entry / _PROGRAM).read_bytes()
    except (OSError, ValueError):
        stats["absent"] += 1
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key_text") != text:
        _reject(entry, "key text differs")
        return None
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        _reject(entry, "checksum mismatch")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = _loads(data, model, ((), dict(kwargs)))
    except Exception as e:  # noqa: BLE001 - an unreadable program is recaptured
        _reject(entry, f"could not load: {type(e).__name__}: {e}")
        return None
    mine = _model_tensors(model)
    sig = ep.graph_signature
    for k in list(sig.parameters) + list(sig.buffers):  # every weight is the model's own tensor, same shape
        t, got = mine.get(k), ep.state_dict.get(k, ep.constants.get(k))
        if t is None or got is None or got.data_ptr() != t.data_ptr() or tuple(got.shape) != tuple(t.shape):
            _reject(entry, f"weight {k} is not the model's")
            return None
    stats["hit"] += 1
    return ep
