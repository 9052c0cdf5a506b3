"""Parameterized hypercomplex multiplication (PHM) layers, the projections of Compacter.

Transform: ``x → x @ H + bias`` with ``H = Σ_i kron(phm_rule[i], W[i])`` of shape
``(in_features, out_features)``, where ``phm_rule`` is ``(n, n, n)`` and ``W`` is
``(n, in/n, out/n)`` for ``n = phm_dim``. Either factor may be factorised
(``phm_rule = rule_left @ rule_right``, ``W = W_left @ W_right`` with rank
``phm_rank``) and either may be *shared* by every PHM layer of one adapter.

Mirrors AdapterHub ``adapters`` 1.3.0 (``methods/modeling.py``: ``PHMLayer``,
``init_shared_parameters``, ``init_W``) numerically; the differences are in
initialisation only and are listed in :func:`init_phm_weight`,
:func:`init_shared_phm_parameters` and :meth:`PHMLinear.reset_parameters`.

Shared parameters
-----------------
AdapterHub keeps the shared tensors of adapter ``a`` in a model-level
``shared_parameters[a]`` dict and fetches them from a thread-local forward
context. graphadapt passes them explicitly instead: the *caller* builds one
``nn.ParameterDict`` per adapter with :func:`init_shared_phm_parameters`,
registers it once in its own module tree (e.g. ``adapters.<name>.shared``) and
hands the same object to every :class:`PHMLinear` / ``BottleneckAdapter`` of
that adapter via ``shared=``. The layers keep an *unregistered* reference, so
the shared tensors appear once in ``state_dict()`` (under the owner), move with
the owner's ``.to()``, and torch.export resolves them by identity through the
owner. Keys are AdapterHub's: ``W_down``/``W_up`` or ``W_{down,up}_{left,right}``
(when ``shared_W_phm``), ``phm_rule`` or ``phm_rule_left``/``phm_rule_right``
(when ``shared_phm_rule``, the AdapterHub default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError

__all__ = [
    "PHMConfig",
    "PHMLinear",
    "init_shared_phm_parameters",
    "shared_phm_shapes",
    "kronecker_sum",
    "init_phm_weight",
]

_W_INITS = ("phm", "glorot-normal", "glorot-uniform", "normal")
_C_INITS = ("normal", "uniform")
_INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")


@dataclass(frozen=True)
class PHMConfig:
    """PHM options; names and defaults are AdapterHub ``BnConfig``'s."""

    phm_dim: int = 4
    phm_rank: int = 1
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    learn_phm: bool = True
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_bias: bool = True

    def __post_init__(self):
        if self.phm_dim < 1:
            raise SpecError(f"phm_dim must be >= 1, got {self.phm_dim}", field="phm_dim")
        if self.phm_rank < 1:
            raise SpecError(f"phm_rank must be >= 1, got {self.phm_rank}", field="phm_rank")
        if self.hypercomplex_nonlinearity not in _W_INITS:
            raise SpecError(
                f"hypercomplex_nonlinearity must be one of {_W_INITS}, got {self.hypercomplex_nonlinearity!r}",
                field="hypercomplex_nonlinearity",
            )
        if self.phm_c_init not in _C_INITS:
            raise SpecError(f"phm_c_init must be one of {_C_INITS}, got {self.phm_c_init!r}", field="phm_c_init")

    @property
    def uses_shared(self) -> bool:
        return bool(self.shared_W_phm or self.shared_phm_rule)


def kronecker_sum(phm_rule: Tensor, W: Tensor) -> Tensor:
    """``(n, n, n)``, ``(n, p, q)`` → ``Σ_i kron(phm_rule[i], W[i])`` of shape ``(n·p, n·q)``."""
    n, a, b = phm_rule.shape
    _, p, q = W.shape
    # prod[i, r, k, c, l] = rule[i, r, c] * W[i, k, l]; (r, k) and (c, l) flatten to kron's row/column index.
    prod = phm_rule[:, :, None, :, None] * W[:, None, :, None, :]
    return prod.sum(0).reshape(a * p, b * q)


def _sample(shape, generator: torch.Generator, fill) -> Tensor:
    # Sample in fp32 on the generator's device, then the caller copies into the parameter: the same seed gives the
    # same weights on every device/dtype and the global RNG is never consumed.
    t = torch.empty(shape, dtype=torch.float32, device=generator.device)
    fill(t)
    return t


@torch.no_grad()
def _copy_(param: Tensor, value: Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


def init_phm_weight(
    weights: list[Tensor], config: PHMConfig, generator: torch.Generator, init_weights: str = "bert"
) -> None:
    """Initialise PHM weight factors (``[W]`` or ``[W_left, W_right]``) in place.

    ``hypercomplex_nonlinearity`` is honoured per slice ``W[i]``: glorot-uniform → xavier_uniform,
    glorot-normal/phm → xavier_normal, normal → N(0, phm_init_range). AdapterHub 1.3.0 tests
    ``if config["hypercomplex_nonlinearity"]:`` (always true for a non-empty string) and so uses
    xavier_normal for every value, including its own default "glorot-uniform"; same variance, other
    distribution. ``init_weights="houlsby"`` instead draws every factor from trunc_normal(0, 1e-2, ±2e-2),
    AdapterHub's Houlsby init for Linear weights (AdapterHub itself crashes on PHM + houlsby).
    """
    if init_weights == "houlsby":
        fill = lambda t: nn.init.trunc_normal_(t, 0.0, 1e-2, -2e-2, 2e-2, generator=generator)  # noqa: E731
    elif config.hypercomplex_nonlinearity == "glorot-uniform":
        fill = lambda t: nn.init.xavier_uniform_(t, generator=generator)  # noqa: E731
    elif config.hypercomplex_nonlinearity == "normal":
        fill = lambda t: nn.init.normal_(t, 0.0, config.phm_init_range, generator=generator)  # noqa: E731
    else:  # "glorot-normal", and "phm", which AdapterHub accepts and effectively treats as glorot-normal
        fill = lambda t: nn.init.xavier_normal_(t, generator=generator)  # noqa: E731
    for w in weights:
        # Per slice W[i], so Glorot fans are those of one (in/n, out/n) block, as in AdapterHub.
        _copy_(w, torch.stack([_sample(tuple(w.shape[1:]), generator, fill) for _ in range(w.shape[0])]))


def _init_rule(rules: list[Tensor], config: PHMConfig, generator: torch.Generator, *, shared: bool) -> None:
    # AdapterHub draws per-layer rules from N(0, 0.01) / U(-0.01, 0.01) but shared rules from
    # N(0, phm_init_range) / U(-1, 1); mirrored as is.
    for r in rules:
        if config.phm_c_init == "uniform":
            lo = 1.0 if shared else 0.01
            fill = lambda t: nn.init.uniform_(t, -lo, lo, generator=generator)  # noqa: E731
        else:
            std = config.phm_init_range if shared else 0.01
            fill = lambda t: nn.init.normal_(t, 0.0, std, generator=generator)  # noqa: E731
        _copy_(r, _sample(tuple(r.shape), generator, fill))


def _w_shapes(in_features: int, out_features: int, config: PHMConfig) -> dict[str, tuple[int, ...]]:
    n = config.phm_dim
    p, q = in_features // n, out_features // n
    if config.factorized_phm_W:
        return {"W_left": (n, p, config.phm_rank), "W_right": (n, config.phm_rank, q)}
    return {"W": (n, p, q)}


def _rule_shapes(config: PHMConfig) -> dict[str, tuple[int, ...]]:
    n = config.phm_dim
    if config.factorized_phm_rule:
        return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
    return {"phm_rule": (n, n, n)}


def shared_phm_shapes(hidden_size: int, bottleneck_size: int, config: PHMConfig) -> dict[str, tuple[int, ...]]:
    """Key → shape of the shared dict a bottleneck adapter of this size needs (empty if nothing is shared)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config.shared_W_phm:
        for pos, (i, o) in (("down", (hidden_size, bottleneck_size)), ("up", (bottleneck_size, hidden_size))):
            for k, s in _w_shapes(i, o, config).items():
                shapes[k.replace("W", f"W_{pos}", 1)] = s
    if config.shared_phm_rule:
        shapes.update(_rule_shapes(config))
    return shapes


def init_shared_phm_parameters(
    hidden_size: int,
    bottleneck_size: int,
    config: PHMConfig,
    *,
    generator: torch.Generator | None = None,
    init_weights: str = "bert",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.ParameterDict:
    """Build the caller-owned dict of PHM tensors shared by all layers of one adapter.

    ``bottleneck_size`` is ``BottleneckAdapter.bottleneck_size`` (``int(hidden // reduction_factor)``).
    Differences from AdapterHub ``init_shared_parameters``: the non-factorised shared ``W`` works (AdapterHub
    raises UnboundLocalError), a float reduction factor works, ``init_weights="mam_adapter"`` zeroes
    ``W_up`` / ``W_up_right`` so the adapter is the identity at init, ``"houlsby"`` uses trunc_normal factors.
    """
    if init_weights not in _INIT_SCHEMES:
        raise SpecError(f"init_weights must be one of {_INIT_SCHEMES}, got {init_weights!r}", field="init_weights")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    shapes = shared_phm_shapes(hidden_size, bottleneck_size, config)
    params = nn.ParameterDict()
    for key, shape in shapes.items():
        is_rule = key.startswith("phm_rule")
        params[key] = nn.Parameter(
            torch.empty(shape, dtype=dtype, device=device), requires_grad=config.learn_phm if is_rule else True
        )
    for pos in ("down", "up"):
        ws = [params[k] for k in (f"W_{pos}", f"W_{pos}_left", f"W_{pos}_right") if k in params]
        if ws:
            init_phm_weight(ws, config, generator, init_weights)
            if pos == "up" and init_weights == "mam_adapter":
                with torch.no_grad():
                    ws[-1].zero_()
    rules = [params[k] for k in ("phm_rule", "phm_rule_left", "phm_rule_right") if k in params]
    _init_rule(rules, config, generator, shared=True)
    return params


class PHMLinear(nn.Module):
    """PHM projection ``(…, in_features) → (…, out_features)``: ``x @ Σ_i kron(phm_rule[i], W[i]) + bias``.

    Own parameters (state-dict keys): ``W`` or ``W_left``/``W_right`` unless ``shared_W_phm``;
    ``phm_rule`` or ``phm_rule_left``/``phm_rule_right`` unless ``shared_phm_rule``; ``bias`` if ``phm_bias``
    (AdapterHub: ``b``). Shared tensors come from ``shared`` (see module docstring), keyed
    ``W_{position}[_left|_right]`` and ``phm_rule[_left|_right]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        position: Literal["down", "up"],
        config: PHMConfig | None = None,
        shared: nn.ParameterDict | None = None,
        init_weights: str = "bert",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        config = config if config is not None else PHMConfig()
        n = config.phm_dim
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % n:
                raise SpecError(f"PHM {position} projection: {name}={size} is not divisible by phm_dim={n}", "phm_dim")
        if position not in ("down", "up"):
            raise SpecError(f"position must be 'down' or 'up', got {position!r}", field="position")
        if init_weights not in _INIT_SCHEMES:
            raise SpecError(f"init_weights must be one of {_INIT_SCHEMES}, got {init_weights!r}", field="init_weights")
        self.in_features, self.out_features = in_features, out_features
        self.position, self.config, self.init_weights = position, config, init_weights
        if config.uses_shared:
            self._check_shared(shared)
        # Plain attribute, not a submodule: the caller owns (registers, saves, moves) the shared tensors once.
        object.__setattr__(self, "shared", shared if config.uses_shared else None)

        factory = {"dtype": dtype, "device": device}
        if not config.shared_W_phm:
            for key, shape in _w_shapes(in_features, out_features, config).items():
                self.register_parameter(key, nn.Parameter(torch.empty(shape, **factory)))
        if not config.shared_phm_rule:
            for key, shape in _rule_shapes(config).items():
                self.register_parameter(
                    key, nn.Parameter(torch.empty(shape, **factory), requires_grad=config.learn_phm)
                )
        if config.phm_bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    def _check_shared(self, shared: nn.ParameterDict | None) -> None:
        need = {}
        c = self.config
        if c.shared_W_phm:
            for k, s in _w_shapes(self.in_features, self.out_features, c).items():
                need[k.replace("W", f"W_{self.position}", 1)] = s
        if c.shared_phm_rule:
            need.update(_rule_shapes(c))
        if shared is None:
            raise SpecError(
                f"PHM layer shares {sorted(need)} (shared_W_phm={c.shared_W_phm}, shared_phm_rule="
                f"{c.shared_phm_rule}) but shared=None; build one dict per adapter with "
                "graphadapt.methods.phm.init_shared_phm_parameters(...) and pass it to every layer",
                field="shared",
            )
        for k, s in need.items():
            if k not in shared:
                raise SpecError(f"shared PHM parameters lack {k!r} (have {sorted(shared.keys())})", field="shared")
            if tuple(shared[k].shape) != s:
                raise SpecError(f"shared PHM parameter {k!r} has shape {tuple(shared[k].shape)}, need {s}", "shared")

    def own_weight_factors(self) -> list[Tensor]:
        return [getattr(self, k) for k in ("W", "W_left", "W_right") if k in self._parameters]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Initialise this layer's own tensors from ``generator`` (shared ones belong to their owner).

        bert (AdapterHub leaves PHM layers at their own init): W per ``hypercomplex_nonlinearity``, bias 0, rule
        N(0, 0.01) or U(±0.01). mam_adapter: as bert, except the up projection's ``W`` (``W_right`` when
        factorised) is zero, so the adapter branch outputs zero at init yet still gets gradients — AdapterHub
        raises AttributeError (``PHMLayer.weight``) here. houlsby: W factors trunc_normal(0, 1e-2, ±2e-2), bias 0
        (AdapterHub: same AttributeError).
        """
        ws = self.own_weight_factors()
        if ws:
            init_phm_weight(ws, self.config, generator, self.init_weights)
            if self.position == "up" and self.init_weights == "mam_adapter":
                ws[-1].zero_()
        if self.bias is not None:
            self.bias.zero_()
        rules = [getattr(self, k) for k in ("phm_rule", "phm_rule_left", "phm_rule_right") if k in self._parameters]
        _init_rule(rules, self.config, generator, shared=False)

    def _get(self, key: str, shared_key: str, is_shared: bool) -> Tensor:
        return self.shared[shared_key] if is_shared else getattr(self, key)

    def phm_weight(self) -> Tensor:
        """The effective ``(in_features, out_features)`` matrix ``H`` (note: transposed vs ``nn.Linear.weight``)."""
        c, pos = self.config, self.position
        if c.factorized_phm_W:
            W = torch.bmm(
                self._get("W_left", f"W_{pos}_left", c.shared_W_phm),
                self._get("W_right", f"W_{pos}_right", c.shared_W_phm),
            )
        else:
            W = self._get("W", f"W_{pos}", c.shared_W_phm)
        if c.factorized_phm_rule:
            rule = torch.bmm(
                self._get("phm_rule_left", "phm_rule_left", c.shared_phm_rule),
                self._get("phm_rule_right", "phm_rule_right", c.shared_phm_rule),
            )
        else:
            rule = self._get("phm_rule", "phm_rule", c.shared_phm_rule)
        return kronecker_sum(rule, W)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.phm_weight())
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, position={self.position!r}, "
            f"phm_dim={c.phm_dim}, phm_rank={c.phm_rank}, factorized_W={c.factorized_phm_W}, "
            f"shared_W={c.shared_W_phm}, shared_rule={c.shared_phm_rule}, bias={c.phm_bias}"
        )
