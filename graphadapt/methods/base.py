"""What a method plugin is: one :class:`Method` subclass, registered once.

A method folder (``graphadapt/methods/<m>/``, or any package of yours) holds its spec (a
registered :class:`~graphadapt.spec.MethodSpec`), its module(s) — the math, called from
``call_module`` nodes — and one :class:`Method` subclass that says

* **where**: ``site_kind`` (a :class:`~graphadapt.vocab.SiteKind`; the kind's plugin in
  :mod:`graphadapt.sites` selects the sites, inserts the modules, orders the plan and defines composition);
  :class:`LinearSiteMethod` and :class:`ResidualSiteMethod` fix the two common kinds;
* **what**: :meth:`Method.prepare` (once per adapter: shared modules, checks → extra build kwargs) and
  :meth:`Method.build` (a seeded, initialised module for one site);
* **how adapters sharing a site combine**: ``combine`` (a :class:`~graphadapt.vocab.CombinePolicy`; None:
  the site kind's default — ``chain`` at linear sites, ``exclusive`` elsewhere);
* optionally, **checkpoint interop**: PEFT / AdapterHub config and key translation hooks.

The module a method builds implements its site kind's protocol: at linear sites
:class:`graphadapt.passes.modules.LinearSiteModule` (``(x, y, W, b) → y'``; ``mergeable``/``fold``/
``merge_refusal``/``reads_base_weight``, optionally ``low_rank_delta``), subclassing
:class:`graphadapt.methods.sliced.SlicedSiteModule` when it must own a fused projection's channels; at
residual points :class:`graphadapt.composition.site.ResidualSiteModule` (``pre``/``core``/``post``).

``apply``, ``merge``, ``set_active``, save/load and the importers only talk to these interfaces;
nothing outside a method's folder names a method or its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..passes import InsertContext, PassResult
from ..sites import SiteKindPlugin, get_site_kind
from ..spec.base import MethodSpec
from ..vocab import CombinePolicy, SiteKind

if TYPE_CHECKING:
    from ..structure.types import StructureMap


@dataclass(frozen=True)
class PhysicalSite:
    """One module position: site kind and key, the module's owner name, the site object, its combine policy."""

    kind: SiteKind
    key: str
    owner: str
    site: Any
    combine: CombinePolicy


class Method:
    """Base class of method plugins. Subclasses set the class attributes and implement :meth:`build`."""

    name: ClassVar[str] = ""
    """Registry key; equals ``spec_class.method``."""
    spec_class: ClassVar[type[MethodSpec]]
    site_kind: ClassVar[SiteKind | str] = SiteKind.LINEAR
    combine: ClassVar[CombinePolicy | None] = None
    """None: the site kind's default policy."""

    @property
    def sites(self) -> SiteKindPlugin:
        """The plugin of this method's site kind."""
        return get_site_kind(self.site_kind)

    @property
    def phase(self) -> int:
        """Plan order (the site kind's): passes that only add nodes (linear sites) run before passes that replace
        nodes. A method made of others (a union) sets it."""
        return self.sites.phase

    @property
    def label(self) -> str:
        """The method's name as messages write it (``prefix tuning``)."""
        return self.name.replace("_", " ")

    # -- where
    def select(self, sm: StructureMap, spec: MethodSpec, adapter: str) -> list:
        return self.sites.select(sm, spec, adapter, self)

    def site_key(self, site) -> str:
        return self.sites.key(site)

    def physical_sites(self, adapter: str, site) -> list[PhysicalSite]:
        """Where in the graph ``site`` puts a module, and who owns it (``adapters.<owner>.<key>``). A method
        made of others (a union) reports its members' sites, so the plan sees every real overlap."""
        kinds = self.sites
        return [PhysicalSite(kinds.physical_kind(site), kinds.key(site), adapter, site,
                             CombinePolicy(self.combine or kinds.combine))]

    # -- what
    def prepare(self, gm, adapter: str, spec: MethodSpec, sites: list, seed: int) -> dict:
        """Hook before insertion, once per adapter (e.g. parameters shared by every site — reuse them if already
        there, as re-planning after ``set_active`` does; checks that need the graph); returns extra ``build``
        kwargs. Every site kind calls it."""
        return {}

    def build(self, spec: MethodSpec, adapter: str, site, seed: int, **site_facts) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build() (the method plugin contract: docs/architecture.md)")

    def insert(self, gm, ctx: InsertContext, adapter: str, spec: MethodSpec, sites: list, seed: int) -> PassResult:
        """Insert this adapter's modules (the site kind does it: ``prepare`` once, then ``build`` per site)."""
        return self.sites.insert(gm, ctx, adapter, self, spec, sites, seed)

    def after_insert(self, gm, ctx: InsertContext, adapter: str, spec: MethodSpec, seed: int) -> list:
        """Optional hook of kinds that allow it (attention): modules outside the kind's sites; returns records."""
        return []

    # -- checkpoint interop (optional)
    peft_type: ClassVar[str | None] = None
    """PEFT ``peft_type`` this method imports (``"LORA"``, ``"IA3"``…), or None."""

    def peft_spec(self, config: Mapping[str, Any], targets: tuple[str, ...]) -> MethodSpec:
        """The spec equivalent to a PEFT adapter config applied at ``targets`` (module paths)."""
        raise NotImplementedError(f"{type(self).__name__} must implement peft_spec() (the method plugin contract: docs/architecture.md)")

    def peft_key(self, key: str) -> tuple[str, str] | None:
        """A PEFT state-dict key → ``(module path, tensor name in our module)``, or None if not ours."""
        return None

    def peft_read(self, model, config: Mapping[str, Any], weights: dict[str, torch.Tensor], name: str, directory):
        """Optional: ``(spec, fill(adapted))`` for a PEFT checkpoint whose tensors are not per-module
        (prefix tuning's ``prompt_embeddings``); None uses the per-module reader (``peft_key``/``peft_spec``)."""
        return None

    def peft_export(self, spec: MethodSpec, modules: Mapping[str, nn.Module], records: list
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Optional (``AdaptedModel.to_peft``): ``(PEFT adapter_config fields, {key: tensor})`` for one adapter
        whose modules sit at the base module paths in ``modules`` (keys without PEFT's ``base_model.model.``).
        Raise :class:`~graphadapt.errors.CheckpointError` for options PEFT cannot express. The default: this
        method has no PEFT format (a ``CheckpointError``)."""
        raise CheckpointError(f"{self.name} adapters have no PEFT format in graphadapt; save with save_adapters "
                              "instead")

    # -- adapter arithmetic (optional; AdaptedModel.add_weighted_adapter / to_low_rank, graphadapt.arithmetic)
    def weighted_adapter(self, sources: list[tuple[str, MethodSpec, dict[str, nn.Module]]], weights: list[float],
                         sites: list[str], options: Mapping[str, Any]):
        """Optional: combine adapters of this method into a new one. ``sources`` is ``[(adapter, spec, {site:
        module})]``, ``weights`` one number per source, ``sites`` the union of their sites in the base model's
        module order (the order random masks are drawn in), ``options`` the combination's keywords plus
        ``generator``. Returns ``(spec, fill)``: the new adapter's spec at exactly ``sites``, and
        ``fill({site: new module})`` writing its weights. The default: this method does not combine."""
        from ..errors import SpecError

        raise SpecError(f"{self.label} adapters cannot be combined by add_weighted_adapter (no weighted combination "
                        "is defined for this method); convert them first with to_low_rank(...)", field="method")

    represents_weight_deltas: ClassVar[bool] = False
    """True for the one method that :meth:`from_weight_deltas` can turn any folded change into (a low-rank update)."""

    def from_weight_deltas(self, deltas: dict[str, tuple[Any, torch.Tensor, torch.Tensor | None]], rank: int,
                           sites: list[str], options: Mapping[str, Any]):
        """Optional (with ``represents_weight_deltas``): ``(spec, fill)`` for an adapter of this method at ``sites``
        approximating ``deltas[site] = (site record, ΔW in the base layout and full shape, Δb or None)`` at
        ``rank``; ``fill({site: new module})`` writes its weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement from_weight_deltas() when "
                                  "represents_weight_deltas is True")

    adapterhub_architectures: ClassVar[tuple[str | None, ...]] = ()
    """AdapterHub config ``architecture`` values this method imports."""

    def adapterhub_spec(self, config: Mapping[str, Any] | str) -> MethodSpec | None:
        """The spec equivalent to an AdapterHub config dict (or preset name), or None if not ours."""
        return None

    def load_adapterhub(self, adapted, adapter: str, saved_name: str, state_dict: dict[str, torch.Tensor],
                        strict: bool, directory: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement load_adapterhub() (the method plugin contract: docs/architecture.md)")

    def load_adapterhub_fusion(self, adapted, fusion_name: str, saved_name: str, state_dict: dict[str, torch.Tensor],
                               strict: bool, directory: str) -> None:
        """Load an AdapterHub ``save_adapter_fusion`` state dict into the fusion layers over this method's sites."""
        raise NotImplementedError(f"AdapterHub fusion checkpoints over {self.name} adapters are not supported")

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {type(self).__qualname__}>"


class LinearSiteMethod(Method):
    """A method whose modules sit after linear ops and read ``(x, y, W, b)`` (site kind ``linear``; expert sites too).

    Its spec has the :class:`~graphadapt.spec.targets.LinearTargets` API. :meth:`build` gets the site (a
    :class:`~graphadapt.structure.types.LinearSite`: ``in_features``, ``out_features``, ``layout``, and for a
    fused projection's slice ``out_slice``/``out_rows`` + ``total_out``) and the base weight, and returns an
    initialised :class:`~graphadapt.passes.modules.LinearSiteModule` — subclass
    :class:`~graphadapt.methods.sliced.SlicedSiteModule` to own a slice of a fused output (GPT-2's ``c_attn``);
    returning ``(module, new_weight)`` installs a new base weight as a new Parameter (PiSSA).
    """

    site_kind = SiteKind.LINEAR

    def build(self, spec: MethodSpec, adapter: str, site, seed: int, weight: torch.Tensor | None = None,
              **extra) -> nn.Module | tuple[nn.Module, torch.Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement build() (the method plugin contract: docs/architecture.md)")


class ResidualSiteMethod(Method):
    """A method whose modules replace a residual point and read ``(h, r, ln_w, ln_b)`` (site kind ``residual``).

    Its spec says ``includes_layer``; :meth:`positions` says which points (``"mh"``/``"output"``). :meth:`build`
    gets the target, the hidden size, the model's norm after the add (or None) and a reference base parameter
    (dtype/device), plus what :meth:`prepare` returned; the module implements
    :class:`~graphadapt.composition.site.ResidualSiteModule` (``pre``/``core``/``post``) so composition blocks can
    drive it, and its ``forward`` is ``post(core(pre(…)))``.
    """

    site_kind = SiteKind.RESIDUAL

    def positions(self, spec) -> tuple[str, ...]:
        raise NotImplementedError(f"{type(self).__name__} must implement positions() (the method plugin contract: docs/architecture.md)")


def group_adapterhub_keys(state_dict: Mapping[str, torch.Tensor], pattern) -> tuple[dict, list[str]]:
    """AdapterHub keys grouped by site: ``pattern`` (a compiled regex) captures ``(site, tensor name)``;
    returns ``({site: {tensor name: tensor}}, keys it did not match)``. Shared by the plugins' readers."""
    sites: dict[str, dict[str, torch.Tensor]] = {}
    rest: list[str] = []
    for k, v in state_dict.items():
        m = pattern.match(k)
        if m:
            sites.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            rest.append(k)
    return sites, rest


__all__ = ["LinearSiteMethod", "Method", "PhysicalSite", "ResidualSiteMethod", "group_adapterhub_keys"]
