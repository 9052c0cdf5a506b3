"""Trainable tokens as a method plugin (site kind ``parameter``): spec (:mod:`.spec`), module (:mod:`.module`).

before: ``embedding(E, ids)`` (and a tied ``linear(h, E)``)  →  after: both read ``E`` with rows
``token_indices`` replaced by trainable rows. PEFT import: ``TRAINABLE_TOKENS``
(``<path>.trainable_tokens_delta``; the tied LM head's copy must agree).

Init: the base rows (``init_weights=True``), or N(0, 1) drawn from ``adapter_generator(seed, adapter, site)``.
"""

from __future__ import annotations

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.sites.parameter import ParameterSite
from graphadapt.vocab import SiteKind

from ..transforms import refuse_peft_options
from .module import TrainableTokensModule
from .spec import TrainableTokens

_KEY = ".trainable_tokens_delta"
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
          torch.ops.aten._to_copy.default}


def embedding_sites(gm, spec: TrainableTokens, adapter: str) -> list[ParameterSite]:
    """The embedding lookups of ``input_ids`` (``aten.embedding(get_attr E, ids…)``), or those ``targets`` selects."""
    from graphadapt.spec.targets import selector_matches
    from graphadapt.structure.ops import module_path

    aten = torch.ops.aten
    phs = {n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids"}
    out: dict[str, ParameterSite] = {}
    for n in gm.graph.nodes:
        if not (n.op == "call_function" and n.target == aten.embedding.default and len(n.args) >= 2
                and getattr(n.args[0], "op", None) == "get_attr"):
            continue
        path = module_path(n) or str(n.args[0].target).rpartition(".")[0]
        if spec.targets:
            if not any(selector_matches(s, path) for s in spec.targets):
                continue
        else:
            a = n.args[1]   # the indices are input_ids themselves, maybe reshaped (GPT-2: view(-1, T))
            while isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target in _VIEWS:
                a = a.args[0]
            from_ids = a in phs
            if not from_ids:
                continue
        out.setdefault(path, ParameterSite(name=path, params=((str(n.args[0].target), "weight"),), role="embedding"))
    if not out:
        raise SpecError(f"adapter {adapter!r}: no embedding lookup "
                        + (f"matching {list(spec.targets)}" if spec.targets else "of input_ids")
                        + " found in the graph (aten.embedding)", field="targets")
    return list(out.values())


@register
class TrainableTokensMethod(Method):
    name = "trainable_tokens"
    spec_class = TrainableTokens
    site_kind = SiteKind.PARAMETER
    peft_type = "TRAINABLE_TOKENS"

    def parameter_sites(self, gm, sm, spec, adapter):
        return embedding_sites(gm, spec, adapter)

    def build(self, spec, adapter, site, seed, params=None, **extra):
        w = params["weight"]
        bad = [i for i in spec.token_indices if i >= w.shape[0]]
        if bad:
            raise SpecError(f"adapter {adapter!r}: token_indices {bad} are outside the {w.shape[0]} rows of "
                            f"{site.params[0][0]}", field="token_indices")
        mod = TrainableTokensModule(spec.token_indices, w[list(spec.token_indices)])
        if not spec.init_weights:
            with torch.no_grad():
                normal_(mod.trainable_tokens_delta, 1.0, adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options("TRAINABLE_TOKENS", config)
        return TrainableTokens(token_indices=tuple(config.get("token_indices") or ()),
                               init_weights=bool(config.get("init_weights", True)))

    def peft_read(self, model, config, weights, name, directory):
        """PEFT saves the rows once per reader of a tied matrix (``embed_tokens`` and ``lm_head``): one module
        here stands in for the matrix at every read, so the copies must agree."""
        from graphadapt.vocab import adapter_prefix

        deltas = {k: v for k, v in weights.items() if k.endswith(_KEY)}
        other = sorted(set(weights) - set(deltas))
        if other or not deltas:
            raise CheckpointError(f"unexpected keys {other[:3]} in a PEFT trainable-tokens checkpoint" if other else
                                  "no trainable_tokens_delta in the PEFT trainable-tokens checkpoint")
        values = list(deltas.values())
        if any(not torch.equal(v, values[0]) for v in values[1:]):
            raise CheckpointError(f"the checkpoint holds different rows for {sorted(deltas)}; graphadapt trains one "
                                  "set of rows per embedding matrix (tied readers share it)")
        try:
            spec = self.peft_spec(config, ())
        except SpecError as e:
            raise CheckpointError(f"PEFT TrainableTokensConfig does not translate: {e}") from e

        def fill(adapted) -> None:
            mods = [(n, p) for n, p in adapted.named_parameters()
                    if n.startswith(adapter_prefix(name)) and n.endswith(_KEY)]
            if len(mods) != 1:
                raise CheckpointError(f"expected one trainable-tokens module, found {[n for n, _ in mods]}")
            with torch.no_grad():
                p = mods[0][1]
                if p.shape != values[0].shape:
                    raise CheckpointError(f"{sorted(deltas)[0]} has shape {tuple(values[0].shape)}, the model's "
                                          f"rows {tuple(p.shape)}")
                p.copy_(values[0].to(p.dtype))

        return spec, fill


__all__ = ["TrainableTokens", "TrainableTokensMethod", "TrainableTokensModule"]
