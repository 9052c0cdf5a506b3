"""Bottleneck adapter spec and its presets, with AdapterHub's option set.

Sequential form: ``h → h + up(f(down(h)))`` inserted after the attention block
(``mh_adapter``) and/or the FFN (``output_adapter``); parallel form (``is_parallel``):
``x → block(x) + scaling · up(f(down(x)))``. Option names, defaults and allowed
values follow AdapterHub's ``BnConfig`` (adapters 1.3) so configs translate 1:1
(see :func:`adapterhub_config_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError

from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import (
    MethodSpec,
    check_bool,
    check_choice,
    check_int,
    check_layer_indices,
    check_real,
    is_int,
    is_real,
    override_default,
    register_method,
    spec_field,
)

from .module import ACTIVATIONS as _MODULE_ACTIVATIONS

# One source of truth: exactly the activations the module implements (AdapterHub's
# Activation_Function_Class names without learned parameters; matched lower-cased, as
# AdapterHub does). prelu/xielu carry parameters and are not offered.
ACTIVATIONS: tuple[str, ...] = tuple(sorted(_MODULE_ACTIVATIONS))
# AdapterHub v1 name for exact GELU (renamed when loading old checkpoints).
ACTIVATION_ALIASES: dict[str, str] = {"gelu_orig": "gelu"}

BN_INITS: tuple[str, ...] = ("bert", "mam_adapter", "houlsby")
SCALING_MODES: tuple[str, ...] = ("learned", "channel")
PHM_C_INITS: tuple[str, ...] = ("normal", "uniform")
PHM_W_INITS: tuple[str, ...] = ("phm", "glorot-normal", "glorot-uniform", "normal")

_RF_HELP = 'a number > 0, or a mapping of layer indices (as strings) to numbers > 0 with a required "default" key, e.g. {"0": 8, "default": 16}'


def _check_reduction(value: Any) -> float | FrozenMapping:
    if is_real(value) and math.isfinite(value) and value > 0:
        return float(value)
    if not isinstance(value, Mapping):
        raise SpecError(f"reduction_factor must be {_RF_HELP}; got {value!r}", field="reduction_factor")
    out: dict[str, float] = {}
    for key, factor in value.items():
        # YAML turns an unquoted `3: 8` into an int key; AdapterHub looks layers up as str(i).
        name = str(key) if is_int(key) else key
        if not (isinstance(name, str) and (name == "default" or (name.isdigit() and name.isascii()))):
            raise SpecError(
                f"reduction_factor key {key!r} is neither a layer index nor 'default'; must be {_RF_HELP}",
                field="reduction_factor",
            )
        if not is_real(factor) or not math.isfinite(factor) or factor <= 0:
            raise SpecError(
                f"reduction_factor[{key!r}] must be a number > 0, got {factor!r}", field="reduction_factor"
            )
        out[str(int(name)) if name != "default" else name] = float(factor)
    if "default" not in out:
        raise SpecError(
            f'reduction_factor mapping needs a "default" entry for unlisted layers; must be {_RF_HELP}',
            field="reduction_factor",
        )
    return FrozenMapping(out)


def _check_activation(value: Any) -> str:
    name = value.lower() if isinstance(value, str) else value
    name = ACTIVATION_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in ACTIVATIONS:
        raise SpecError(
            f"non_linearity must be one of {', '.join(ACTIVATIONS)} (case-insensitive; 'gelu_orig' = 'gelu'); got {value!r}",
            field="non_linearity",
        )
    return name


@register_method
@dataclass(frozen=True)
class Bottleneck(MethodSpec):
    """Bottleneck adapter (Houlsby et al., 2019; Pfeiffer et al., 2020; He et al., 2021).

    ``mh_adapter``, ``output_adapter``, ``reduction_factor`` and ``non_linearity`` are
    required, as in AdapterHub's ``BnConfig``; the presets (:class:`SeqBn`, …) give
    them defaults.
    """

    method: ClassVar[str] = "bottleneck"

    mh_adapter: bool = spec_field(help="Insert an adapter after the multi-head attention block of each layer.")
    output_adapter: bool = spec_field(help="Insert an adapter after the feed-forward block of each layer.")
    reduction_factor: float | Mapping[str, float] = spec_field(
        help="Hidden size / bottleneck size: " + _RF_HELP + ". Below 1 gives an up-projection."
    )
    non_linearity: str = spec_field(help="Bottleneck activation: " + ", ".join(ACTIVATIONS) + ".")
    original_ln_before: bool = spec_field(
        False, help="Apply the model's residual + layer norm before the adapter (sequential adapters only)."
    )
    original_ln_after: bool = spec_field(True, help="Apply the model's residual + layer norm after the adapter.")
    ln_before: bool = spec_field(False, help="Add a new layer norm before the down-projection.")
    ln_after: bool = spec_field(False, help="Add a new layer norm after the up-projection.")
    init_weights: str = spec_field(
        "bert",
        help="'bert' (normal std 0.02), 'mam_adapter' (Kaiming down, zero up) or 'houlsby' (truncated normal std 0.01).",
    )
    is_parallel: bool = spec_field(False, help="Run the adapter parallel to the block instead of after it.")
    scaling: float | str = spec_field(
        1.0, help="Output scale: a number, 'learned' (one learned scalar) or 'channel' (learned per channel)."
    )
    use_gating: bool = spec_field(False, help="Add a learned gate on the adapter output (UniPELT-style).")
    residual_before_ln: bool | str = spec_field(
        True,
        help="Take the adapter's residual before the model's layer norm (True), after it (False), "
        "or after the block's residual add ('post_add').",
    )
    adapter_residual_before_ln: bool = spec_field(
        False, help="Add the adapter's residual before its own ln_after (sequential adapters only)."
    )
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) that get no adapter.")
    dropout: float = spec_field(0.0, help="Dropout inside the adapter, in [0, 1).")
    phm_layer: bool = spec_field(False, help="Compacter: make down/up projections PHM (Kronecker-sum) layers.")
    phm_dim: int = spec_field(4, help="Compacter: number of Kronecker summands n (int > 0; must divide both widths).")
    factorized_phm_W: bool = spec_field(True, help="Compacter: factor each PHM weight W_i into a rank-phm_rank product.")
    shared_W_phm: bool = spec_field(False, help="Compacter: share the PHM weights W across layers.")
    shared_phm_rule: bool = spec_field(True, help="Compacter: share the PHM rule matrices A_i across layers.")
    factorized_phm_rule: bool = spec_field(False, help="Compacter: factor the rule matrices into left/right vectors.")
    phm_c_init: str = spec_field("normal", help="Compacter: rule-matrix init, 'normal' or 'uniform'.")
    phm_init_range: float = spec_field(0.0001, help="Compacter: std of the 'normal' rule/weight init (> 0).")
    learn_phm: bool = spec_field(True, help="Compacter: train the rule matrices.")
    hypercomplex_nonlinearity: str = spec_field(
        "glorot-uniform", help="Compacter: PHM weight init, 'phm', 'glorot-normal', 'glorot-uniform' or 'normal'."
    )
    phm_rank: int = spec_field(1, help="Compacter: rank of the factorised PHM weights (int > 0).")
    phm_bias: bool = spec_field(True, help="Compacter: give the PHM projections a bias.")
    stochastic_depth: float = spec_field(
        0.0, help="Probability of dropping the whole adapter per sample in training, in [0, 1) (AdapterPlus)."
    )
    layers: tuple[int, ...] | None = spec_field(
        None, help="Layer indices (0-based) to adapt; None means every layer (leave_out still applies)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for name in (
            "mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
            "ln_after", "is_parallel", "use_gating", "adapter_residual_before_ln", "phm_layer",
            "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule",
            "learn_phm", "phm_bias",
        ):
            check_bool(name, getattr(self, name))
        if not (self.mh_adapter or self.output_adapter):
            raise SpecError(
                "at least one of mh_adapter / output_adapter must be True, or the adapter is inserted nowhere",
                field="output_adapter",
            )
        set_("reduction_factor", _check_reduction(self.reduction_factor))
        set_("non_linearity", _check_activation(self.non_linearity))
        check_choice("init_weights", self.init_weights, BN_INITS)
        if isinstance(self.scaling, str):
            check_choice("scaling", self.scaling, SCALING_MODES)
        elif is_real(self.scaling) and math.isfinite(self.scaling):
            # AdapterHub tests isinstance(scaling, float): an int 4 would be rejected there.
            set_("scaling", float(self.scaling))
        else:
            raise SpecError(
                f"scaling must be a number, 'learned' or 'channel'; got {self.scaling!r}", field="scaling"
            )
        if self.residual_before_ln != "post_add" and not isinstance(self.residual_before_ln, bool):
            raise SpecError(
                f"residual_before_ln must be True, False or 'post_add'; got {self.residual_before_ln!r}",
                field="residual_before_ln",
            )
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("stochastic_depth", check_real("stochastic_depth", self.stochastic_depth, 0.0, 1.0))
        set_("phm_dim", check_int("phm_dim", self.phm_dim, minimum=1))
        set_("phm_rank", check_int("phm_rank", self.phm_rank, minimum=1))
        set_("phm_init_range", check_real("phm_init_range", self.phm_init_range, 0.0, None, low_open=True))
        check_choice("phm_c_init", self.phm_c_init, PHM_C_INITS)
        check_choice("hypercomplex_nonlinearity", self.hypercomplex_nonlinearity, PHM_W_INITS)

    def reduction_for(self, layer_index: int) -> float:
        """Reduction factor of layer ``layer_index`` (its own entry, else ``"default"``)."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            return rf.get(str(layer_index), rf["default"])
        return rf

    def bottleneck_size(self, hidden_size: int, layer_index: int) -> int:
        """Bottleneck width as AdapterHub computes it: ``max(1, int(hidden // reduction))``."""
        return max(1, int(hidden_size // self.reduction_for(layer_index)))


# Presets mirror AdapterHub 1.3's config classes field for field; only the
# defaults differ, so `SeqBn(reduction_factor=8)` is still a Bottleneck.
@register_method
@dataclass(frozen=True)
class SeqBn(Bottleneck):
    """Sequential adapter after the FFN (Pfeiffer et al., 2020); AdapterHub ``SeqBnConfig`` / "seq_bn"."""

    preset: ClassVar[str] = "seq_bn"
    mh_adapter: bool = override_default(Bottleneck, "mh_adapter", False)
    output_adapter: bool = override_default(Bottleneck, "output_adapter", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 16)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "relu")
    original_ln_before: bool = override_default(Bottleneck, "original_ln_before", True)
    original_ln_after: bool = override_default(Bottleneck, "original_ln_after", True)
    residual_before_ln: bool | str = override_default(Bottleneck, "residual_before_ln", True)
    adapter_residual_before_ln: bool = override_default(Bottleneck, "adapter_residual_before_ln", False)
    ln_before: bool = override_default(Bottleneck, "ln_before", False)
    ln_after: bool = override_default(Bottleneck, "ln_after", False)


@register_method
@dataclass(frozen=True)
class DoubleSeqBn(Bottleneck):
    """Sequential adapters after attention and FFN (Houlsby et al., 2019); AdapterHub ``DoubleSeqBnConfig``."""

    preset: ClassVar[str] = "double_seq_bn"
    mh_adapter: bool = override_default(Bottleneck, "mh_adapter", True)
    output_adapter: bool = override_default(Bottleneck, "output_adapter", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 16)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "swish")
    original_ln_before: bool = override_default(Bottleneck, "original_ln_before", False)
    original_ln_after: bool = override_default(Bottleneck, "original_ln_after", True)
    residual_before_ln: bool | str = override_default(Bottleneck, "residual_before_ln", True)
    adapter_residual_before_ln: bool = override_default(Bottleneck, "adapter_residual_before_ln", False)
    ln_before: bool = override_default(Bottleneck, "ln_before", False)
    ln_after: bool = override_default(Bottleneck, "ln_after", False)


@register_method
@dataclass(frozen=True)
class ParBn(Bottleneck):
    """Scaled parallel adapter on the FFN (He et al., 2021); AdapterHub ``ParBnConfig`` / "par_bn"."""

    preset: ClassVar[str] = "par_bn"
    mh_adapter: bool = override_default(Bottleneck, "mh_adapter", False)
    output_adapter: bool = override_default(Bottleneck, "output_adapter", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 2)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "relu")
    original_ln_before: bool = override_default(Bottleneck, "original_ln_before", False)
    original_ln_after: bool = override_default(Bottleneck, "original_ln_after", True)
    ln_before: bool = override_default(Bottleneck, "ln_before", False)
    ln_after: bool = override_default(Bottleneck, "ln_after", False)
    init_weights: str = override_default(Bottleneck, "init_weights", "mam_adapter")
    is_parallel: bool = override_default(Bottleneck, "is_parallel", True)
    scaling: float | str = override_default(Bottleneck, "scaling", 4.0)


@register_method
@dataclass(frozen=True)
class AdapterPlus(Bottleneck):
    """AdapterPlus (Steitz & Roth, 2024): channel scaling, Houlsby init, stochastic depth; AdapterHub ``AdapterPlusConfig``."""

    preset: ClassVar[str] = "adapter_plus"
    mh_adapter: bool = override_default(Bottleneck, "mh_adapter", False)
    output_adapter: bool = override_default(Bottleneck, "output_adapter", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 96)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "gelu")
    original_ln_after: bool = override_default(Bottleneck, "original_ln_after", False)
    original_ln_before: bool = override_default(Bottleneck, "original_ln_before", True)
    residual_before_ln: bool | str = override_default(Bottleneck, "residual_before_ln", False)
    stochastic_depth: float = override_default(Bottleneck, "stochastic_depth", 0.1)
    init_weights: str = override_default(Bottleneck, "init_weights", "houlsby")
    scaling: float | str = override_default(Bottleneck, "scaling", "channel")


@register_method
@dataclass(frozen=True)
class Compacter(DoubleSeqBn):
    """Compacter (Mahabadi et al., 2021): Houlsby placement with PHM layers; AdapterHub ``CompacterConfig``."""

    preset: ClassVar[str] = "compacter"
    phm_layer: bool = override_default(Bottleneck, "phm_layer", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 32)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "gelu")


@register_method
@dataclass(frozen=True)
class CompacterPlusPlus(SeqBn):
    """Compacter++ (Mahabadi et al., 2021): Pfeiffer placement with PHM layers; AdapterHub ``CompacterPlusPlusConfig``."""

    preset: ClassVar[str] = "compacter++"
    phm_layer: bool = override_default(Bottleneck, "phm_layer", True)
    reduction_factor: float | Mapping[str, float] = override_default(Bottleneck, "reduction_factor", 32)
    non_linearity: str = override_default(Bottleneck, "non_linearity", "gelu")


PRESETS: dict[str, type[Bottleneck]] = {
    c.preset: c for c in (SeqBn, DoubleSeqBn, ParBn, AdapterPlus, Compacter, CompacterPlusPlus)  # type: ignore[misc]
}

# Bottleneck fields with no AdapterHub counterpart (handled in adapterhub_config_dict).
_NOT_IN_ADAPTERHUB = ("seed", "layers")


def adapterhub_config_dict(spec: Bottleneck, num_layers: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``adapters.BnConfig(**kwargs)`` equivalent to ``spec``.

    Fields that map differently:

    * ``seed`` is not passed. AdapterHub's ``init_weights_seed`` re-seeds before
      *every* adapter module (all layers get identical weights); graphadapt's seed
      gives each site its own derived, order-independent stream.
    * ``layers`` has no AdapterHub field; it is folded into ``leave_out``, which
      needs ``num_layers`` (SpecError otherwise).
    * ``reduction_factor`` mappings become plain dicts with string keys; numbers
      and ``scaling`` are floats (AdapterHub tests ``isinstance(scaling, float)``).
    * ``non_linearity`` is the canonical lower-case name (``gelu_orig`` → ``gelu``).
    * AdapterHub-only options (``inv_adapter``, ``inv_adapter_reduction_factor``,
      ``cross_adapter``, ``init_weights_seed``) are left at BnConfig's defaults.
    """
    if not isinstance(spec, Bottleneck):
        raise SpecError(f"adapterhub_config_dict needs a Bottleneck spec, got {type(spec).__name__}", field="method")
    d = spec.to_dict()
    for key in ("method", "preset", *_NOT_IN_ADAPTERHUB):
        d.pop(key, None)
    leave_out = set(spec.leave_out)
    if spec.layers is not None:
        if num_layers is None:
            raise SpecError(
                "layers has no AdapterHub equivalent; pass num_layers so it can be turned into leave_out",
                field="layers",
            )
        leave_out |= set(range(num_layers)) - set(spec.layers)
    d["leave_out"] = sorted(leave_out)
    return d


__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_ALIASES",
    "AdapterPlus",
    "BN_INITS",
    "Bottleneck",
    "Compacter",
    "CompacterPlusPlus",
    "DoubleSeqBn",
    "PRESETS",
    "ParBn",
    "SeqBn",
    "adapterhub_config_dict",
]
