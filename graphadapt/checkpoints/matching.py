"""Which model a checkpoint fits: its recorded structure against this model's, and the module-path
rewrite between them.

A checkpoint records the recognised structure it was saved on (``structure_fingerprint``) and the
module path of each (layer, block, role) (``structure_paths``). Loading compares the structure,
then pairs the saved path of each (layer, block, role) with ours: the one prefix rewrite they agree
on (``bert.`` ↔ ``""``) is applied to the adapter keys, so the same encoder behind a different head
or wrapper (``BertModel`` vs ``BertForSequenceClassification``) matches.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import CheckpointError

_PATH_KEYS = ("module", "norm_module", "stack")


def _layers(report) -> list:
    return list(report["layers"]) if report is not None else []


def structure_fingerprint(report) -> str:
    """sha256 of the recognised structure, module paths and node names left out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in sorted(x.items()) if k not in _PATH_KEYS}
        if isinstance(x, (list, tuple)):
            return [strip(v) for v in x]
        return x

    text = json.dumps(strip(_layers(report)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def structure_paths(report) -> list[list]:
    """``[layer, block, role, module path]`` for every recognised module path (layer modules, sites, norms)."""
    out = []
    for layer in _layers(report):
        i = layer.get("index")
        if layer.get("module"):
            out.append([i, "layer", "", layer["module"]])
        for row in layer.get("sites", ()):
            if row.get("role") != "residual" and row.get("module"):
                out.append([i, row["block"], row["role"], row["module"]])
            if row.get("norm_module"):
                out.append([i, row["block"], row["role"] + ".norm", row["norm_module"]])
    return out


def prefix_rule(saved: list, ours: list) -> tuple[str, str] | None:
    """``(old, new)``: the module-path prefix rewrite that maps the saved structure's paths onto ours
    (None: paths already agree). Raises :class:`CheckpointError` if the pairs disagree."""
    mine = {(a, b, c): p for a, b, c, p in ours}
    rules = set()
    for a, b, c, p in saved:
        q = mine.get((a, b, c))
        if q is None or q == p:
            if q == p:
                rules.add(("", ""))
            continue
        sp, qp = p.split("."), q.split(".")
        n = 0
        while n < min(len(sp), len(qp)) and sp[-1 - n] == qp[-1 - n]:
            n += 1
        rules.add((".".join(sp[:len(sp) - n]), ".".join(qp[:len(qp) - n])))
    if len(rules) > 1:
        raise CheckpointError(f"the checkpoint's module paths do not map onto this model's consistently "
                              f"({sorted(rules)[:3]}); was it saved on another architecture?")
    rule = rules.pop() if rules else ("", "")
    return None if rule[0] == rule[1] else rule


def rewrite_key(key: str, rule: tuple[str, str] | None, prefix: str = "adapters.") -> str:
    """Apply ``rule`` to the module path inside an adapter key ``adapters.<name>.<path>...``."""
    if rule is None or not key.startswith(prefix):
        return key
    name, _, rest = key[len(prefix):].partition(".")
    old, new = rule
    if old and (rest == old or rest.startswith(old + ".")):
        rest = rest[len(old):].lstrip(".")
    elif old:
        return key
    if new:
        rest = f"{new}.{rest}" if rest else new
    return f"{prefix}{name}.{rest}"


def check_structure(cfg: dict | None, adapted, directory) -> tuple[str, str] | None:
    """Refuse a checkpoint saved on a different structure; the path rewrite onto ``adapted`` (or None)."""
    if cfg is None:
        return None
    want = cfg.get("structure_fingerprint")
    have = structure_fingerprint(adapted.structure_report)
    if want is not None and want != have:
        raise CheckpointError(
            f"{directory} was saved on a {str(cfg.get('base_model_class')).rsplit('.', 1)[-1]} whose recognised "
            f"structure differs from this {adapted.source_class.rsplit('.', 1)[-1]}'s (fingerprint {want[:12]}… vs "
            f"{have[:12]}…: other layer count, sizes or architecture). Load it onto the base model it was trained on.")
    return prefix_rule(cfg.get("structure_paths") or [], structure_paths(adapted.structure_report))


__all__ = ["check_structure", "prefix_rule", "rewrite_key", "structure_fingerprint", "structure_paths"]
