"""AdapterHub's ``average_adapter``: a new adapter as the weighted average of existing ones.

before: an adapted model with adapters ``a``, ``b`` of one method and configuration
after:  the same model with a new adapter ``name`` (inactive unless ``set_active``) whose tensors are

- ``linear`` (every method): ``Σ wᵢ tᵢ`` for every tensor of the adapter (each site module's parameters
  and floating buffers, shared parameters included) — for LoRA this averages A and B separately, as
  AdapterHub does;
- any strategy a method plugin lists in ``average_strategies`` (LoRA: ``lora_linear_only_negate_b``,
  ``lora_delta_w_svd``): the plugin's ``average_modules(new, [(module, wᵢ)], strategy, svd_rank)`` per site,
  its ``average_spec(spec, strategy, svd_rank)`` for the new adapter's spec (e.g. the SVD rank).

Weights: ``weights`` (or the values of a ``{name: weight}`` dict), divided by their sum when
``normalize_weights``; none given: ``1/n`` each. Adapters must share one configuration up to
``dropout``, ``init`` and ``seed`` (AdapterHub ignores ``dropout`` and ``init_weights``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from .errors import SpecError
from .methods import get_method
from .vocab import ADAPTERS

STRATEGY = "linear"
_IGNORED = ("dropout", "init", "seed")

__all__ = ["average_adapter"]


def _weights(adapter_list, weights, normalize: bool) -> tuple[list[str], list[float]]:
    if isinstance(adapter_list, Mapping):
        names = list(adapter_list)
        if weights is None:
            weights = [float(adapter_list[n]) for n in names]
    elif isinstance(adapter_list, Sequence) and not isinstance(adapter_list, str):
        names = list(adapter_list)
    else:
        raise SpecError(f"adapter_list must be a list of adapter names or a {{name: weight}} dict, got {adapter_list!r}",
                        field="adapter_list")
    if not names:
        raise SpecError("no adapters to average: adapter_list is empty", field="adapter_list")
    if len(set(names)) != len(names):
        raise SpecError(f"adapter_list names an adapter twice: {names}", field="adapter_list")
    if weights is None:
        return names, [1.0 / len(names)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise SpecError(f"{len(weights)} weights for {len(names)} adapters ({names})", field="weights")
    total = sum(weights) if normalize else 1.0
    if total == 0.0:
        raise SpecError(f"weights {weights} sum to 0 and cannot be normalised; pass normalize_weights=False",
                        field="weights")
    return names, [w / total for w in weights]


def _comparable(spec) -> dict:
    return {k: v for k, v in spec.to_dict().items() if k not in _IGNORED}


def _holder(adapted, name: str):
    return adapted.get_submodule(f"{ADAPTERS}.{name}")


@torch.no_grad()
def average_adapter(adapted, name: str, adapter_list, weights=None, combine_strategy: str = STRATEGY,
                    normalize_weights: bool = True, overwrite_ok: bool = False, set_active: bool = False,
                    svd_rank: int | None = None) -> None:
    """Add adapter ``name`` to ``adapted`` as the weighted average of ``adapter_list`` (module docstring).
    A refused average leaves the model as it was."""
    names, ws = _weights(adapter_list, weights, normalize_weights)
    have = adapted.spec.adapters
    unknown = [n for n in names if n not in have]
    if unknown:
        raise SpecError(f"cannot average unknown adapter(s) {unknown}; this model has {list(have)}", field="adapter_list")
    specs = [have[n] for n in names]
    first = _comparable(specs[0])
    for n, s in zip(names[1:], specs[1:]):
        if _comparable(s) != first:
            diff = sorted(k for k in set(first) | set(_comparable(s)) if first.get(k) != _comparable(s).get(k))
            raise SpecError(f"cannot average adapters with different configurations: {names[0]!r} and {n!r} differ "
                            f"in {diff}", field="adapter_list")
    plugin = get_method(specs[0])
    strategies = (STRATEGY, *getattr(plugin, "average_strategies", ()))
    if combine_strategy not in strategies:
        raise SpecError(f"combine_strategy {combine_strategy!r} is not available for {plugin.name} adapters; "
                        f"choose one of {list(strategies)}", field="combine_strategy")
    spec = specs[0]
    hook = getattr(plugin, "average_spec", None)
    if hook is not None:
        spec = hook(spec, combine_strategy, svd_rank)
    elif svd_rank is not None:
        warnings.warn(f"svd_rank applies to LoRA-style SVD averaging only; ignored for {plugin.name} adapters",
                      UserWarning, stacklevel=2)
    if name in have:
        if not overwrite_ok:
            raise SpecError(f"adapter {name!r} already exists; pass overwrite_ok=True to replace it", field="name")
        if name in names:
            raise SpecError(f"adapter {name!r} cannot be both the result and an input of the average", field="name")
        adapted.delete_adapter(name)
    adapted.add_adapter(name, spec)
    try:
        if combine_strategy == STRATEGY:
            _linear(adapted, name, names, ws)
        else:
            _per_site(adapted, plugin, name, names, ws, combine_strategy, svd_rank)
    except BaseException:
        adapted.delete_adapter(name)
        raise
    if set_active:
        adapted.set_active(name)


def _linear(adapted, name: str, names: list[str], ws: list[float]) -> None:
    new = _holder(adapted, name).state_dict(keep_vars=True)
    srcs = [_holder(adapted, n).state_dict(keep_vars=True) for n in names]
    for key, t in new.items():
        missing = [n for n, sd in zip(names, srcs) if key not in sd or sd[key].shape != t.shape]
        if missing:
            raise SpecError(f"adapter(s) {missing} have no tensor {key!r} of shape {tuple(t.shape)} to average "
                            f"into {name!r}", field="adapter_list")
        if not t.is_floating_point():
            t.copy_(srcs[0][key])
            continue
        t.copy_(sum(w * sd[key] for sd, w in zip(srcs, ws)))  # in the tensors' dtype, as AdapterHub


def _per_site(adapted, plugin, name: str, names: list[str], ws: list[float], strategy: str, svd_rank) -> None:
    prefix = f"{ADAPTERS}.{name}."
    targets = [r.target for r in adapted.adapter_records if r.adapter == name]
    for target in dict.fromkeys(targets):
        rest = target[len(prefix):]
        sources = [(adapted.get_submodule(f"{ADAPTERS}.{n}.{rest}"), w) for n, w in zip(names, ws)]
        plugin.average_modules(adapted.get_submodule(target), sources, strategy, svd_rank)
