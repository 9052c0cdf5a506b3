"""The compiled path: ``torch.compile`` on the captured graph, kept correct while the graph changes.

Transform (per call, after the input contract has run eagerly)::

    before:  model(**inputs) → hooks → forward (the FX-generated Python of the current graph)
    after:   model(**inputs) → hooks → compiled[forward code](**inputs)

The graph's generated ``forward`` is compiled, not the model's ``__call__``: the input contract, the
call-signature router and the model's locks stay eager Python, so the compiled region is exactly the
captured graph — one graph, no breaks (``fullgraph=True`` by default). One compiled callable is kept per
distinct graph, keyed by the graph's generated code: ``merge``/``unmerge``, a composition ``set_active``,
``train``/``eval`` (they flip the captured dropout nodes) produce a new graph and compile it once; going
back to a graph seen before (``unmerge`` after ``merge``) reuses its compiled code. Flipping plain
adapters on and off (``set_active`` without a block) keeps the graph; torch's guards on the adapter
modules' ``active`` flag recompile once per combination seen (``torch._dynamo`` keeps them side by side).

Batch and sequence axes that were dynamic at capture are marked dynamic on every call
(``maybe_mark_dynamic``), so new lengths do not recompile.

Static-cache decoding (``generate(..., cache_implementation="static")`` on a compiled cached LM) compiles a
second callable per graph: the fixed-shape decode step (:func:`graphadapt.kvcache.decode_graph` with
``static=True``), with the model's options and ``dynamic=False`` — one compile per graph, batch and cache length,
reused for every token (its cache buffers are updated in place, so ``mode="reduce-overhead"`` can replay it as a
CUDA graph).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import GraphAdaptError

__all__ = ["CompiledForward", "compile_module", "uncompile_module", "compiled_options", "static_step"]

_DEFAULTS = {"fullgraph": True}


class CompiledForward:
    """Installed as ``module.forward``: dispatches each call to the compiled code of the current graph."""

    def __init__(self, module, options: dict[str, Any]):
        self.module = module
        self.options = {**_DEFAULTS, **options}
        self.by_code: dict[str, Any] = {}
        self.static_by_code: dict[str, Any] = {}
        self._dynamic = [(name, axis) for name, axes in (getattr(module, "dynamic_dims", None) or {}).items()
                         for axis in axes]

    def __deepcopy__(self, memo):  # a copy of the model runs eagerly until compiled itself
        return None

    def compiled(self):
        """The compiled callable for the module's current graph (compiled lazily, on first call)."""
        m = self.module
        key = m._code
        fn = self.by_code.get(key)
        if fn is None:
            fn = torch.compile(type(m).forward.__get__(m), **self.options)
            self.by_code[key] = fn
        return fn

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # traced by torch.export / torch.onnx.export / an outer torch.compile: hand them the plain graph
            return type(self.module).forward(self.module, *args, **kwargs)
        for name, axis in self._dynamic:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() > axis:
                torch._dynamo.maybe_mark_dynamic(t, axis)
        return self.compiled()(*args, **kwargs)


def static_step(module, build):
    """The compiled static-cache decode step of ``module``'s current graph (``fn(**inputs) -> logits``), compiled
    on first use from ``build(module)`` (a plain function of the inputs returning ``(logits,)``; generation builds
    it from :func:`graphadapt.kvcache.decode_graph`); None when ``module`` runs eagerly."""
    fwd = module.__dict__.get("forward")
    if not isinstance(fwd, CompiledForward):
        return None
    key = module._code
    fn = fwd.static_by_code.get(key)
    if fn is None:
        raw = build(module)

        def step(**inputs):
            return raw(**inputs)[0]
        fn = torch.compile(step, **{**fwd.options, "dynamic": False})
        fwd.static_by_code[key] = fn
    return fn


def compile_module(module, **options):
    """Compile ``module``'s graph in place (``torch.compile`` keyword arguments: ``backend``, ``mode``,
    ``dynamic``, ``fullgraph`` (default True), ``options``…). Returns the module.

    A second call replaces the options and drops the compiled code held so far."""
    if not hasattr(type(module), "forward") or not hasattr(module, "_code"):
        raise GraphAdaptError(f"compile needs a graphadapt model (a captured GraphModule), got {type(module).__name__}")
    bad = sorted(set(options) - {"backend", "mode", "dynamic", "fullgraph", "options", "disable"})
    if bad:
        raise GraphAdaptError(f"unknown compile option(s) {bad}; graphadapt passes these to torch.compile: "
                              "backend, mode, dynamic, fullgraph, options, disable")
    module.__dict__["forward"] = CompiledForward(module, options)
    return module


def uncompile_module(module):
    """Back to the eager graph (drops the compiled code)."""
    module.__dict__.pop("forward", None)
    return module


def compiled_options(module) -> dict[str, Any] | None:
    """The ``torch.compile`` options ``module`` runs under, or None when it runs eagerly."""
    fwd = module.__dict__.get("forward")
    return dict(fwd.options) if isinstance(fwd, CompiledForward) else None
