"""Parameter-free activations by AdapterHub/transformers name, shared by the method modules that take a
``non_linearity`` (bottleneck adapters, prefix tuning's reparametrisation MLP). Not a method: a building block."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from graphadapt.errors import SpecError

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Parameter-free activations by AdapterHub/transformers name (AdapterHub lower-cases the name first).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_accurate": lambda x: 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "swish": F.silu,
    "silu": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "relu2": lambda x: torch.square(F.relu(x)),
    "leakyrelu": F.leaky_relu,
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """AdapterHub ``Activation_Function_Class(name.lower())`` as a plain function."""
    key = name.lower()
    if key not in ACTIVATIONS:
        raise SpecError(
            f"non_linearity {name!r} is not supported; choose one of {sorted(ACTIVATIONS)} "
            "(activations with parameters, e.g. prelu, are not)",
            field="non_linearity",
        )
    return ACTIVATIONS[key]


__all__ = ["ACTIVATIONS", "get_activation"]
