"""What a method plugin is: one :class:`Method` subclass, registered once.

A method folder (``graphadapt/methods/<m>/``, or any package of yours) holds its spec (a
registered :class:`~graphadapt.spec.MethodSpec`), its module(s) — the math, called from
``call_module`` nodes — and one :class:`Method` subclass that says

* **where**: ``site_kind`` (``"linear"``: after a linear op, module called ``(x, y, W, b) → y'``;
  ``"residual"``: at a sub-block's residual point, ``(h, r, ln_w, ln_b) → out``) and
  :meth:`Method.select` (spec + structure map → sites);
* **what**: :meth:`Method.build` (a seeded, initialised module for one site);
* **how adapters sharing a site combine**: ``combine`` (``"chain"``: each reads the previous
  one's output; ``None``: not combinable yet, the plan refuses it);
* optionally, **checkpoint interop**: PEFT / AdapterHub config and key translation hooks.

``apply``, ``merge``, ``set_active``, save/load and the importers only talk to this interface;
nothing outside a method's folder names a method. Merge asks the *module*: ``mergeable`` and
``fold(W, b[, base_weight])`` (and ``reads_base_weight`` if its forward reads ``W``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from ..passes import InsertContext, PassResult
from ..passes import linear as linear_pass
from ..passes import residual as residual_pass
from ..passes.select import select_linear_sites
from ..spec.base import MethodSpec

if TYPE_CHECKING:
    from ..structure.types import StructureMap


@dataclass(frozen=True)
class PhysicalSite:
    """One module position: site kind and key, the module's owner name, the site object, its combine policy."""

    kind: str
    key: str
    owner: str
    site: Any
    combine: str | None


class Method:
    """Base class of method plugins. Subclasses set the class attributes and implement :meth:`build`."""

    name: ClassVar[str] = ""
    """Registry key; equals ``spec_class.method``."""
    spec_class: ClassVar[type[MethodSpec]]
    site_kind: ClassVar[str] = "linear"
    combine: ClassVar[str | None] = "chain"
    phase: ClassVar[int] = 0
    """Plan order: passes that only add nodes (linear sites) run before passes that replace nodes."""

    # -- where
    def select(self, sm: StructureMap, spec: MethodSpec, adapter: str) -> list:
        raise NotImplementedError

    def site_key(self, site) -> str:
        raise NotImplementedError

    def physical_sites(self, adapter: str, site) -> list[PhysicalSite]:
        """Where in the graph ``site`` puts a module, and who owns it (``adapters.<owner>.<key>``). A method
        made of others (a union) reports its members' sites, so the plan sees every real overlap."""
        return [PhysicalSite(self.site_kind, self.site_key(site), adapter, site, self.combine)]

    # -- what
    def build(self, spec: MethodSpec, adapter: str, site, seed: int, **site_facts) -> nn.Module:
        raise NotImplementedError

    def insert(self, gm, ctx: InsertContext, adapter: str, spec: MethodSpec, sites: list, seed: int) -> PassResult:
        raise NotImplementedError

    # -- checkpoint interop (optional)
    peft_type: ClassVar[str | None] = None
    """PEFT ``peft_type`` this method imports (``"LORA"``, ``"IA3"``…), or None."""

    def peft_spec(self, config: Mapping[str, Any], targets: tuple[str, ...]) -> MethodSpec:
        """The spec equivalent to a PEFT adapter config applied at ``targets`` (module paths)."""
        raise NotImplementedError

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
        from ..errors import CheckpointError

        raise CheckpointError(f"{self.name} adapters have no PEFT format in graphadapt; save with save_adapters "
                              "instead")

    adapterhub_architectures: ClassVar[tuple[str | None, ...]] = ()
    """AdapterHub config ``architecture`` values this method imports."""

    def adapterhub_spec(self, config: Mapping[str, Any] | str) -> MethodSpec | None:
        """The spec equivalent to an AdapterHub config dict (or preset name), or None if not ours."""
        return None

    def load_adapterhub(self, adapted, adapter: str, saved_name: str, state_dict: dict[str, torch.Tensor],
                        strict: bool, directory: str) -> None:
        raise NotImplementedError

    def load_adapterhub_fusion(self, adapted, fusion_name: str, saved_name: str, state_dict: dict[str, torch.Tensor],
                               strict: bool, directory: str) -> None:
        """Load an AdapterHub ``save_adapter_fusion`` state dict into the fusion layers over this method's sites."""
        raise NotImplementedError(f"AdapterHub fusion checkpoints over {self.name} adapters are not supported")

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {type(self).__qualname__}>"


class LinearSiteMethod(Method):
    """A method whose modules sit after linear ops and read ``(x, y, W, b)``.

    Its spec has the :class:`~graphadapt.spec.targets.LinearTargets` API; :meth:`build` gets
    the site and the base weight and returns an initialised module. Returning a new base
    weight as ``(module, new_weight)`` installs it as a new Parameter (PiSSA).
    """

    site_kind = linear_pass.KIND
    combine = "chain"
    phase = 0

    def select(self, sm, spec, adapter):
        return select_linear_sites(sm, spec, adapter)

    def site_key(self, site) -> str:
        return linear_pass.site_key(site)

    def insert(self, gm, ctx, adapter, spec, sites, seed):
        def build(site, weight):
            out = self.build(spec, adapter, site, seed, weight=weight)
            if isinstance(out, tuple):
                mod, new_w = out
                if new_w is not None:
                    linear_pass.replace_parameter(gm, site.weight, new_w)
                return mod
            return out

        return linear_pass.insert_linear_adapter(gm, adapter, self.name, sites, build, ctx)


class ResidualSiteMethod(Method):
    """A method whose modules replace a residual point and read ``(h, r, ln_w, ln_b)``.

    Its spec says ``positions`` (a tuple of ``"mh"``/``"output"``) and ``includes_layer``.
    :meth:`build` gets the target, the hidden size, the model's norm after the add (or None)
    and a reference base parameter (dtype/device). :meth:`prepare` may add shared modules.
    """

    site_kind = residual_pass.KIND
    combine = None
    phase = 10

    def positions(self, spec) -> tuple[str, ...]:
        raise NotImplementedError

    def select(self, sm, spec, adapter):
        return residual_pass.select_residual_points(sm, self.positions(spec), spec.includes_layer, adapter,
                                                    self.name)

    def site_key(self, site) -> str:
        return residual_pass.site_key(site)

    def prepare(self, gm, adapter: str, spec, targets: list, seed: int) -> dict:
        """Hook before insertion (e.g. parameters shared by every site; reuse them if already there);
        returns extra build kwargs."""
        return {}

    def insert(self, gm, ctx, adapter, spec, sites, seed):
        extra = self.prepare(gm, adapter, spec, sites, seed)

        def build(t, hidden, norm, ref):
            return self.build(spec, adapter, t, seed, hidden=hidden, norm=norm, ref=ref, **extra)

        return residual_pass.insert_residual_adapter(gm, ctx, adapter, self.name, sites, build)


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
