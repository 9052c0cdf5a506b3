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


def newly_initialised_heads(model: nn.Module) -> list[str]:
    """Module paths whose parameters transformers initialised at random in ``from_pretrained`` (the
    checkpoint lacked them: a new classifier head), outermost first. transformers >= 5 marks every
    parameter it loaded with ``_is_hf_initialized``; a model with no marked parameter (built from a
    config, or an older transformers) reports nothing."""
    if not any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
        return []

    def fresh(m: nn.Module) -> bool:
        ps = list(m.parameters())
        return bool(ps) and not any(getattr(p, "_is_hf_initialized", False) for p in ps)

    mods = dict(model.named_modules())
    return [n for n, m in mods.items() if n and fresh(m) and not fresh(mods[n.rpartition(".")[0]])]


def with_task_heads(model: nn.Module, spec):
    """``spec`` with the heads of its ``task_type`` that ``model`` has added to ``modules_to_save`` (as
    PEFT's ``task_type`` does; absent names are skipped). Without a ``task_type``, heads transformers
    newly initialised that stay frozen are named in a warning with the fix."""
    import warnings

    from ..spec.spec import TASK_HEADS

    names = list(spec.modules_to_save)
    if spec.task_type is not None:
        names += [n for n in TASK_HEADS[spec.task_type]
                  if n not in names and resolve_modules_to_save(model, [n], strict=False)]
        return spec.replace(modules_to_save=tuple(names)) if tuple(names) != spec.modules_to_save else spec
    covered = resolve_modules_to_save(model, names, strict=False)
    frozen = [h for h in newly_initialised_heads(model)
              if not any(h == c or h.startswith(c + ".") for c in covered)]
    if frozen:
        kind = ("QUESTION_ANS" if any(h.endswith("qa_outputs") for h in frozen) else
                "TOKEN_CLS" if "TokenClassification" in type(model).__name__ else "SEQ_CLS")
        warnings.warn(f"{type(model).__name__}: {', '.join(frozen)} {'was' if len(frozen) == 1 else 'were'} newly "
                      "initialised by transformers (random, not in the checkpoint) and would stay frozen; train "
                      f"{'it' if len(frozen) == 1 else 'them'} with Spec(..., task_type={kind!r}) as PEFT does, or "
                      f"modules_to_save={frozen!r}", UserWarning, stacklevel=3)
    return spec


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


__all__ = ["install_trainable_copies", "newly_initialised_heads", "with_task_heads", "resolve_modules_to_save", "trainable_module_keys",
           "trainable_module_tensors"]
