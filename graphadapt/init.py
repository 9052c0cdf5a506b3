"""Seeded, isolated, order-independent initialisation of adapter parameters.

Transform: ``zero-filled module → initialised module`` (in place), drawing only from a
per-site generator::

    g = adapter_generator(seed, adapter_name, site)   # hash(seed, name, site) → CPU generator
    new_W = init_lora_(module, "lora", g, base_weight=W)

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

from graphadapt.errors import SpecError

__all__ = [
    "LORA_INIT_SCHEMES",
    "adapter_generator",
    "derive_seed",
    "init_bert_",
    "init_lora_",
    "isolated_rng",
    "kaiming_uniform_",
    "linear_default_",
    "normal_",
    "ones_",
    "uniform_",
    "xavier_uniform_",
    "zeros_",
]

LORA_INIT_SCHEMES = ("lora", "gaussian", "bert", "pissa")


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
def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        # A None generator would silently fall back to the global RNG.
        raise TypeError(f"an explicit torch.Generator is required, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise TypeError(f"initialisers draw on CPU; got a generator on {generator.device}")


@torch.no_grad()
def _staged(tensor: Tensor, generator: torch.Generator, draw: Callable[[Tensor], object]) -> Tensor:
    """Run ``draw(cpu_float32_tensor)`` and copy the result into ``tensor`` (any device/dtype)."""
    _check_generator(generator)
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


# ---------------------------------------------------------------------- LoRA
@torch.no_grad()
def _pissa_(module, base_weight: Tensor) -> Tensor:
    """PiSSA (PEFT ``init_lora_weights="pissa"``, exact SVD): ``W = U S V^T`` on the module's
    rows; ``A = sqrt(S_r/s) V_r^T``, ``B = U_r sqrt(S_r/s)``, residual ``W - s·BA``."""
    rows = module._rows(base_weight).to(torch.float32)
    if module.r > min(rows.shape):
        raise SpecError(
            f"pissa needs r <= min(out, in) = {min(rows.shape)}, got r={module.r}", field="r"
        )
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    root = torch.sqrt(s[: module.r] / module.scaling)
    lora_a = root.unsqueeze(1) * vh[: module.r]  # diag(root) @ Vh_r
    lora_b = u[:, : module.r] * root.unsqueeze(0)  # U_r @ diag(root)
    module.lora_A.copy_(lora_a)
    module.lora_B.copy_(lora_b)
    new_weight = base_weight.detach().clone()
    module._rows(new_weight).copy_(rows - module.scaling * (lora_b @ lora_a))
    return new_weight


def init_lora_(
    module,
    scheme: str,
    generator: torch.Generator,
    base_weight: Tensor | None = None,
) -> Tensor | None:
    """Initialise a zero-filled :class:`~graphadapt.modules.lora.LoRAModule` in place.

    Schemes:

    * ``"lora"`` — A kaiming-uniform(a=sqrt(5)) (nn.Linear / PEFT default), B = 0;
    * ``"gaussian"`` — PEFT's: A ~ N(0, (1/r)²), B = 0;
    * ``"bert"`` — AdapterHub LoRA ``init_weights="bert"``: A, B ~ N(0, 0.02²) (PEFT has no
      "bert" LoRA init). Not a no-op at init: the adapted model differs from the base;
    * ``"pissa"`` — PEFT's PiSSA (exact SVD, no randomness): A, B from the top-r singular
      triplets of the module's rows of ``base_weight`` and the **base weight changes** to
      the residual ``W_res = W - s·BA`` (so ``W_res + s·BA = W``). The new base weight (full
      fused shape, base layout, other rows untouched) is returned for the caller to
      install; keep the original ``W`` to unmerge or to export a plain LoRA later.

    Draw order from ``generator``: A, then B, then (gated) gate weight ~ N(0, 0.02²) and gate
    bias ~ U(±1/sqrt(in)) — AdapterHub's gate: ``nn.Linear`` default bias, re-drawn weight.
    DoRA: the magnitude is then set to ``||W + s·BA||_row`` from the (new) base weight, so
    ``base_weight`` is required.

    Returns the new base weight for ``"pissa"``, else ``None``.
    """
    if scheme not in LORA_INIT_SCHEMES:
        raise SpecError(f"unknown LoRA init {scheme!r}; expected one of {LORA_INIT_SCHEMES}", field="init")
    _check_generator(generator)
    if (scheme == "pissa" or module.use_dora) and base_weight is None:
        raise SpecError(f"LoRA init {scheme!r}{' with DoRA' if module.use_dora else ''} needs base_weight", field="init")
    if scheme == "pissa" and module.use_gating:
        # The gate replaces s, so W_res + g·BA != W and the model would change at init.
        raise SpecError("pissa init cannot be combined with gated LoRA", field="init")

    new_weight = None
    if scheme == "lora":
        kaiming_uniform_(module.lora_A, math.sqrt(5), generator)
        zeros_(module.lora_B)
    elif scheme == "gaussian":
        normal_(module.lora_A, 1.0 / module.r, generator)
        zeros_(module.lora_B)
    elif scheme == "bert":
        init_bert_(module.lora_A, generator)
        init_bert_(module.lora_B, generator)
    else:
        new_weight = _pissa_(module, base_weight)

    if module.gate is not None:
        init_bert_(module.gate.weight, generator)
        bound = 1.0 / math.sqrt(module.in_features)
        uniform_(module.gate.bias, -bound, bound, generator)

    if module.use_dora:
        module.init_dora_magnitude_(new_weight if new_weight is not None else base_weight)
    return new_weight
