"""Seeded, isolated, order-independent initialisation of adapter parameters.

Transform: ``zero-filled module → initialised module`` (in place), drawing only from a
per-site generator::

    g = adapter_generator(seed, adapter_name, site)   # hash(seed, name, site) → CPU generator
    normal_(module.weight, 0.02, g)                    # method-specific schemes live in methods/<m>/

Why: the same ``(seed, adapter_name, site)`` must give bit-identical weights whatever
other adapters exist and in whatever order they are added, and adding an adapter must
never shift the user's global RNG stream (dropout masks, data shuffling). So every draw
goes through an explicit ``torch.Generator``; nothing here calls the global RNG. Draws are
made into a CPU float32 staging tensor and copied into the target, so the values do not
depend on the target's device, and its dtype only rounds them.

Helpers (``normal_``, ``uniform_``, ``kaiming_uniform_``, ``xavier_uniform_``,
``linear_default_``, ``init_bert_``, ``zeros_``, ``ones_``) are shared with the other
adapter modules. This file holds no graph code.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


__all__ = [
    "adapter_generator",
    "derive_seed",
    "init_bert_",
    "isolated_rng",
    "kaiming_uniform_",
    "linear_default_",
    "normal_",
    "ones_",
    "uniform_",
    "xavier_uniform_",
    "zeros_",
]

# ---------------------------------------------------------------------- generators
def derive_seed(seed: int, adapter_name: str, site: str) -> int:
    """``(seed, name, site) → 63-bit int`` via SHA-256 (stable across processes and
    Python versions, unlike ``hash()``, which is salted per process for str)."""
    payload = json.dumps([int(seed), str(adapter_name), str(site)]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little") & ((1 << 63) - 1)


def adapter_generator(seed: int, adapter_name: str, site: str) -> torch.Generator:
    """A fresh CPU generator seeded from :func:`derive_seed` ``(seed, adapter_name, site)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, adapter_name, site))
    return gen


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Fork the CPU and every visible CUDA RNG state for the block, restoring them after.

    Belt and braces around whole ``apply()`` calls: the init code already draws only from
    explicit generators, but third-party code run during capture might not.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---------------------------------------------------------------------- primitive initialisers
def check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        # A None generator would silently fall back to the global RNG.
        raise TypeError(f"an explicit torch.Generator is required, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise TypeError(f"initialisers draw on CPU; got a generator on {generator.device}")


@torch.no_grad()
def _staged(tensor: Tensor, generator: torch.Generator, draw: Callable[[Tensor], object]) -> Tensor:
    """Run ``draw(cpu_float32_tensor)`` and copy the result into ``tensor`` (any device/dtype)."""
    check_generator(generator)
    tmp = torch.empty(tuple(tensor.shape), dtype=torch.float32, device="cpu")
    draw(tmp)
    tensor.copy_(tmp)
    return tensor


def normal_(tensor: Tensor, std: float, generator: torch.Generator, mean: float = 0.0) -> Tensor:
    """``tensor ← N(mean, std²)``."""
    return _staged(tensor, generator, lambda t: nn.init.normal_(t, mean=mean, std=std, generator=generator))


def uniform_(tensor: Tensor, low: float, high: float, generator: torch.Generator) -> Tensor:
    """``tensor ← U(low, high)``."""
    return _staged(tensor, generator, lambda t: nn.init.uniform_(t, a=low, b=high, generator=generator))


def kaiming_uniform_(
    tensor: Tensor,
    a: float,
    generator: torch.Generator,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
) -> Tensor:
    """``tensor ← kaiming_uniform(a)`` (``a=sqrt(5)`` is nn.Linear's / PEFT's LoRA A init)."""
    return _staged(
        tensor,
        generator,
        lambda t: nn.init.kaiming_uniform_(t, a=a, mode=mode, nonlinearity=nonlinearity, generator=generator),
    )


def xavier_uniform_(tensor: Tensor, generator: torch.Generator, gain: float = 1.0) -> Tensor:
    """``tensor ← U(±gain·sqrt(6 / (fan_in + fan_out)))``."""
    return _staged(tensor, generator, lambda t: nn.init.xavier_uniform_(t, gain=gain, generator=generator))


def init_bert_(tensor: Tensor, generator: torch.Generator) -> Tensor:
    """``tensor ← N(0, 0.02²)``, BERT's ``initializer_range`` (AdapterHub's "bert" init)."""
    return normal_(tensor, 0.02, generator)


def linear_default_(weight: Tensor, bias: Tensor | None, generator: torch.Generator) -> None:
    """What ``nn.Linear.reset_parameters`` does, with an explicit generator: weight
    kaiming-uniform(a=sqrt(5)), bias ``U(±1/sqrt(fan_in))``. Weight first, then bias."""
    kaiming_uniform_(weight, math.sqrt(5), generator)
    if bias is not None:
        fan_in = weight.shape[1] if weight.dim() > 1 else weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, generator)


@torch.no_grad()
def zeros_(tensor: Tensor) -> Tensor:
    """``tensor ← 0`` (no RNG)."""
    return tensor.zero_()


@torch.no_grad()
def ones_(tensor: Tensor) -> Tensor:
    """``tensor ← 1`` (no RNG)."""
    return tensor.fill_(1.0)
