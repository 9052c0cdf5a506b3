"""Portability: the capture-time dtype/device pins of a graph, made movable.

``make_portable`` (a pass, run by capture) removes ``_assert_tensor_metadata`` and annotates
every argument that pins the capture dtype/device (``to(float32)``, ``arange(device=cpu)``,
the ``finfo(float32).min`` mask fill); ``retarget`` rewrites the annotated arguments when the
module moves (``CapturedModule._apply``); ``drop_dtype_pins`` hands dtype decisions to the
exporter's :mod:`graphadapt.passes.retarget_dtype`. Casts of integer positions and float
buffers (rotary angles) are never re-targeted: HF keeps them in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import PassResult

aten = torch.ops.aten
_F32_MIN = float(torch.finfo(torch.float32).min)
_PIN_KEY = "graphadapt_pin"


def _float_dtype(d: Any) -> bool:
    return isinstance(d, torch.dtype) and d.is_floating_point


def _fp32_island(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A cast whose *input* is an integer tensor (positions) or a float buffer (``inv_freq``)
    computes something HF keeps in fp32 whatever the model dtype (rotary angles): never re-target it."""
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if src is None:
        return False
    val = src.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.is_floating_point():
        return True
    while src.op == "call_function" and src.target in (aten.unsqueeze.default, aten.expand.default,
                                                        aten.slice.Tensor, aten.view.default):
        src = src.args[0]
    if src.op == "get_attr":
        try:
            gm.get_buffer(src.target)
            return True
        except AttributeError:
            return False
    return False


def make_portable(gm: fx.GraphModule, capture_dtype: torch.dtype, capture_device: torch.device) -> PassResult:
    """Remove capture-time pins; record where dtype/device/fill constants must follow the module.

    before: ``_assert_tensor_metadata(x, dtype=f32, device=cpu)``; ``to(x, f32)``; ``arange(n, device=cpu)``
    after:  assertion gone; each pinned argument annotated in ``node.meta`` so :func:`retarget`
            can rewrite it for the dtype/device the module is moved to.
    """
    g = gm.graph
    modified = False
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target in (aten._assert_tensor_metadata.default,) or str(n.target).startswith(
                "aten._assert_tensor_metadata"):
            if not n.users:
                g.erase_node(n)
                modified = True
            continue
        pins: dict[Any, str] = {}
        island = _fp32_island(gm, n)
        for key, val in n.kwargs.items():
            if key == "device" and isinstance(val, torch.device):
                pins[("kw", key)] = "device"
            elif key == "dtype" and val == capture_dtype and _float_dtype(val) and not island:
                pins[("kw", key)] = "dtype"
        for i, val in enumerate(n.args):
            if isinstance(val, torch.dtype) and val == capture_dtype and _float_dtype(val) and not island:
                pins[("arg", i)] = "dtype"
            elif isinstance(val, torch.device):
                pins[("arg", i)] = "device"
            elif isinstance(val, float) and val == _F32_MIN and capture_dtype == torch.float32:
                pins[("arg", i)] = "fmin"
        if pins:
            n.meta[_PIN_KEY] = pins
            modified = True
    return PassResult(gm, modified, {"pins": sum(1 for n in g.nodes if n.meta.get(_PIN_KEY))})


def drop_dtype_pins(gm: fx.GraphModule) -> None:
    """Forget the dtype pins (keep device pins): for a copy whose dtype another pass decides
    (the exporter's :func:`graphadapt.passes.retarget_dtype.retarget_graph_dtype`)."""
    for n in gm.graph.nodes:
        pins = n.meta.get(_PIN_KEY)
        if pins:
            n.meta[_PIN_KEY] = {k: v for k, v in pins.items() if v == "device"}


def retarget(gm: fx.GraphModule, device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Rewrite pinned arguments for a new device/float dtype. Idempotent."""
    changed = False
    for n in gm.graph.nodes:
        pins = n.meta.get(_PIN_KEY)
        if not pins:
            continue
        args, kwargs = list(n.args), dict(n.kwargs)
        for (where, key), kind in pins.items():
            if kind == "device":
                if device is None:
                    continue
                new = device
            elif kind == "dtype":
                if dtype is None:
                    continue
                new = dtype
            else:  # fmin: a mask fill of finfo(f32).min overflows to -inf in half precision
                if dtype is None:
                    continue
                new = float(torch.finfo(dtype).min)
            if where == "kw":
                if kwargs.get(key) != new:
                    kwargs[key] = new
                    changed = True
            else:
                if args[key] != new:
                    args[key] = new
                    changed = True
        n.args, n.kwargs = tuple(args), kwargs
    if changed:
        gm.recompile()
    return changed


__all__ = ["drop_dtype_pins", "make_portable", "retarget"]
