"""Trainable copies of whole base modules (``Spec.modules_to_save``: a classifier, ``score``, ``lm_head``).

before: an adapted model whose base parameters are frozen ``Parameter`` objects over the
        caller's storage
after:  the parameters of every listed module are replaced by trainable *copies* (new storage)
        owned by the adapted model; the caller's model is never written. The graph reads the
        module's parameters by path, so the copies are what the forward pass, merge,
        ``to_base_model`` and ONNX export use.

Tied weights: GPT-2's ``lm_head.weight`` is the input embedding's tensor. The copy is taken
from it, so outputs are identical at init; training then changes the head only (the
embedding stays frozen) — the tie is broken from then on, as in PEFT's ``modules_to_save``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecError
from ..vocab import ADAPTERS


def _candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if n and n.split(".")[0] != ADAPTERS and next(m.parameters(), None) is not None]


def resolve_modules_to_save(model: nn.Module, names, strict: bool = True) -> list[str]:
    """Module paths of ``model`` named by ``names`` (exact path or a path ending in ``.<name>``; the
    outermost match wins). Unknown names raise :class:`SpecError` (``strict``) or are skipped."""
    mods = _candidates(model)
    out: list[str] = []
    for name in names:
        hits = [p for p in mods if p == name or p.endswith("." + name)]
        hits = [h for h in hits if not any(h != o and h.startswith(o + ".") for o in hits)]
        if not hits:
            if not strict:
                continue
            heads = [p for p in mods if "." not in p]
            raise SpecError(f"modules_to_save names {name!r}, which is no module with parameters in "
                            f"{getattr(model, 'source_class', type(model).__name__).rsplit('.', 1)[-1]}; "
                            f"top-level modules: {heads}", field="modules_to_save")
        out += [h for h in hits if h not in out]
    return out


def install_trainable_copies(model: nn.Module, paths) -> None:
    """Replace the parameters under each module path by trainable copies (new storage)."""
    for path in paths:
        for sub in model.get_submodule(path).modules():
            for leaf, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=True)


def trainable_module_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``"<path>."`` of every trainable module copy of an adapted model (``spec.modules_to_save``)."""
    names = getattr(getattr(model, "spec", None), "modules_to_save", ())
    return tuple(p + "." for p in resolve_modules_to_save(model, names, strict=False)) if names else ()


def trainable_module_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the trainable module copies of an adapted model (``spec.modules_to_save``)."""
    prefixes = trainable_module_prefixes(model)
    return [k for k in model.state_dict() if k.startswith(prefixes)] if prefixes else []


def trainable_module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k] for k in trainable_module_keys(model)}


__all__ = ["install_trainable_copies", "resolve_modules_to_save", "trainable_module_keys",
           "trainable_module_tensors"]
