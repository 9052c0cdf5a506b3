"""Merge as a service: fold adapters into the base weights of an :class:`~graphadapt.model.AdaptedModel`,
undo it exactly, or copy the source model with merged weights.

:class:`Merger` holds no state (the model's ``_merge_state`` does); ``AdaptedModel.merge``/``unmerge``/
``to_base_model`` delegate to the one their model was built with (``ModelServices.merger``). The graph
surgery and fold arithmetic are :mod:`graphadapt.passes.merge`'s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .errors import MergeError
from .passes import run_pass
from .passes.merge import apply_merge, fold_chain, is_finite, plan_merge, scratch_like
from .vocab import adapter_prefix
from .guards import mark_folded


@dataclass
class MergeReport:
    folded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} adapter module(s) into base weights"]
        if self.kept:
            lines.append(f"kept {len(self.kept)} in the graph:")
            lines += [f"  {t}: {why}" for t, why in self.kept.items()]
        return "\n".join(lines)


class Merger:
    """merge / unmerge / to_base_model of an adapted model (see :meth:`graphadapt.model.AdaptedModel.merge`)."""

    def merge(self, model, names: Iterable[str] | None = None, safe: bool = True, strict: bool = False,
              in_place: bool = False, keep_backup: bool = True) -> MergeReport:
        """Fold mergeable adapters into ``model``'s base weights; the modes and guarantees are documented on
        :meth:`graphadapt.model.AdaptedModel.merge`, which delegates here."""
        if model.is_merged:
            raise MergeError("already merged; call unmerge() first" if model._merge_state.get("reversible", True)
                             else "already merged in place without a backup (keep_backup=False); reload the model")
        if not keep_backup and not in_place:
            raise MergeError("keep_backup=False needs in_place=True (a merge into new tensors always keeps the "
                             "originals, which belong to your model)")
        if names is not None and not isinstance(names, str):
            try:
                names = list(names)
            except TypeError:
                names = [names]
            if not all(isinstance(n, str) for n in names):
                raise MergeError(f"names must be an adapter name or a list of names, got {names!r}")
        names = None if names is None else ([names] if isinstance(names, str) else list(names))
        if names is not None:
            unknown = set(names) - set(model.spec.adapters)
            if unknown:
                raise MergeError(f"unknown adapter(s) {sorted(unknown)}; this model has {list(model.spec.adapters)}")
        plan = plan_merge(model, names, safe=safe, compute=not in_place)
        if strict and plan.kept:
            raise MergeError("cannot fold every adapter (strict=True); nothing was changed:\n" +
                             "\n".join(f"  {t}: {why}" for t, why in plan.kept.items()))
        saved_graph = model.snapshot_graph() if keep_backup else None
        backups: dict[str, nn.Parameter] = {}
        if in_place:
            self._merge_in_place(model, plan, safe, backups if keep_backup else None)
        else:
            for pname, value in plan.new_values.items():
                owner, _, leaf = pname.rpartition(".")
                mod = model.get_submodule(owner) if owner else model
                old = mod._parameters[leaf]
                backups[pname] = old
                mod._parameters[leaf] = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
        run_pass("merge_adapters", lambda gm: apply_merge(gm, plan), model)
        report = MergeReport(plan.folded, plan.kept)
        # folded modules no longer run: freeze them while merged so no optimizer trains them silently
        frozen = [(p, p.requires_grad) for t in plan.folded for p in model.get_submodule(t).parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        mark_folded((f"{t}.{n}", p) for t in plan.folded for n, p in model.get_submodule(t).named_parameters())
        model._merge_state = {"graph": saved_graph, "backups": backups, "in_place": in_place,
                             "reversible": keep_backup, "report": report, "frozen": frozen}
        return report

    def adopt_merged(self, model, names: Iterable[str] | None) -> MergeReport:
        """Merge state for a model whose base weights *already* hold the folded values (an unpickled model
        that was merged in place without a backup): the graph is rewritten as by ``merge`` and the
        weights keep exactly the values they have; the result is irreversible, as the original was."""
        report = self.merge(model, names, safe=False, in_place=True, keep_backup=True)
        st = model._merge_state
        with torch.no_grad():  # the fold ran on already-merged weights: put the adopted values back
            for pname, orig in st["backups"].items():
                model.get_parameter(pname).detach().copy_(orig)
        st.update(backups={}, graph=None, reversible=False)
        return report

    def _merge_in_place(self, model, plan, safe: bool, backups: dict | None) -> None:
        """Fold each chain into its weight's own storage, one weight at a time."""
        by_storage: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(n)
        for chain in plan.chains.values():
            names = by_storage.get(model.get_parameter(chain.weight).untyped_storage().data_ptr(), [])
            others = [n for n in names if n != chain.weight]
            if others:   # tied weights, layer_replication copies: an in-place fold would change them too
                raise MergeError(f"cannot merge in place into {chain.weight}: its storage is shared with "
                                 f"{', '.join(others[:3])}{' …' if len(others) > 3 else ''} (tied weights or "
                                 "layer_replication copies), which the fold would change too; nothing was changed. "
                                 "merge(in_place=False) folds into a new tensor of its own.")
        done: list[str] = []
        scratch: dict = {}
        try:
            for chain in plan.chains.values():
                for pname in (chain.weight, chain.bias):
                    if pname is not None and backups is not None:
                        backups[pname] = model.get_parameter(pname).detach().clone()
                w = model.get_parameter(chain.weight)
                b = model.get_parameter(chain.bias) if chain.bias is not None else None
                with torch.no_grad():
                    if backups is not None or not safe:
                        # fold straight into the storage (plain LoRA adds in place); checked after
                        # the write: a failure restores from the backups
                        w2, b2 = fold_chain(model, chain, safe=False, weight=w.detach(), bias=b,
                                            into_weight=True, scratch=scratch)
                    else:  # no backup: fold into a reused buffer and check it before writing
                        w2, b2 = fold_chain(model, chain, safe=False, weight=w.detach(), bias=b, scratch=scratch,
                                            out=scratch_like(scratch, w))
                    bad = [] if not safe else [n for n, t in ((chain.weight, w2), (chain.bias, b2))
                                               if t is not None and t is not b and not is_finite(t)]
                    if bad and backups is None:
                        raise MergeError(
                            f"merging {', '.join(chain.targets)} gives non-finite values in {bad}; it was not "
                            f"written. Merged in place without a backup before it (your model changed): "
                            f"{done or 'none'}. Reload the model, check the adapter weights (or pass safe=False).")
                    if w2.data_ptr() != w.data_ptr():
                        w.detach().copy_(w2)
                    if b is not None and b2 is not b and b2.data_ptr() != b.data_ptr():
                        b.detach().copy_(b2)
                    done.append(chain.weight)
                    if bad:
                        raise MergeError(f"merging {', '.join(chain.targets)} gives non-finite values in {bad}; "
                                         "nothing was changed. Check the adapter weights (or pass safe=False).")
        except BaseException:
            if backups is not None:
                with torch.no_grad():
                    for pname, orig in backups.items():
                        model.get_parameter(pname).detach().copy_(orig)
            raise

    def unmerge(self, model) -> None:
        """Restore the exact pre-merge weights and graph (kept, never recomputed by subtraction)."""
        if not model.is_merged:
            raise MergeError("not merged")
        st = model._merge_state
        if not st.get("reversible", True):
            raise MergeError("this model was merged in place without a backup (merge(in_place=True, "
                             "keep_backup=False)): the original weights are gone, so it cannot be unmerged; "
                             "reload the base model and its adapters")
        for pname, orig in st["backups"].items():
            owner, _, leaf = pname.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            if st["in_place"]:
                with torch.no_grad():
                    mod._parameters[leaf].copy_(orig)
            else:
                mod._parameters[leaf] = orig
        model.graph = st["graph"]
        model.recompile()
        for p, flag in st.get("frozen", ()):
            p.requires_grad_(flag)
        mark_folded(((None, p) for p, _ in st.get("frozen", ())), False)
        model._merge_state = None

    def to_base_model(self, model, names: Iterable[str] | None = None) -> nn.Module:
        """A copy of the source Hugging Face model with merged weights (PEFT's ``merge_and_unload``).

        Every selected adapter must fold (raises :class:`MergeError` otherwise). The
        adapted model itself is left as it was. Memory: one full copy of the base model.
        """
        src = model.__dict__.get("_source_model")
        if src is None:
            raise MergeError("the source model is not available to copy")
        was_merged = model.is_merged
        if was_merged:  # every adapter the merged graph still runs would be dropped: refuse, as unmerged
            report = model._merge_state["report"]
            kept = dict(report.kept)
            kept.update({r.target: "not merged (merge() was given other names)" for r in model.adapter_records
                         if r.target not in report.folded and r.target not in kept
                         and getattr(model.get_submodule(r.target), "active", True)})
            if kept:
                raise MergeError("cannot fold every adapter into the base model (the merged graph still runs "
                                 "them):\n" + "\n".join(f"  {t}: {why}" for t, why in kept.items()) +
                                 "\nDelete or deactivate them first, or export the merged graph with export_onnx.")
        if not was_merged:
            model.merge(names, strict=True)
        try:
            base_sd = {k: v.detach().clone() for k, v in model.named_parameters()
                       if not k.startswith(adapter_prefix())}
        finally:
            if not was_merged:
                model.unmerge()
        out = copy.deepcopy(src)
        own = dict(out.named_parameters(remove_duplicate=False))
        missing = [k for k in base_sd if k not in own]
        if missing:
            raise MergeError(f"could not map merged weights onto {type(src).__name__}: {missing[:5]}")
        with torch.no_grad():
            for k, v in base_sd.items():
                own[k].copy_(v.to(own[k].dtype))
        out.train(model.training)
        return out


__all__ = ["MergeReport", "Merger"]
