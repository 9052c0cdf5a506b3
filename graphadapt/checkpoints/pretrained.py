"""``save_pretrained`` / ``from_pretrained``: an adapter checkpoint that names its base model.

Directory: ``spec.json`` + ``adapters.safetensors`` (as :func:`save_adapters`; only the adapters,
the active set and ``modules_to_save`` — never the base weights) plus ``adapter_config.json``::

    {"format": "graphadapt-pretrained/1", "base_model_class": "transformers....BertForSequenceClassification",
     "structure_fingerprint": "<sha256>", "structure_paths": [[layer, block, role, module path], ...], ...}

The fingerprint hashes the recognised structure without module paths (layers, attention form,
roles, shapes, layouts, norm placement), so the same encoder behind a different head or wrapper
(``BertModel`` vs ``BertForSequenceClassification``) matches, and a different architecture or size
does not. Module paths are then mapped through the structure: the saved path of each (layer,
block, role) is paired with ours, and the one prefix rewrite they agree on (``bert.`` ↔ ``""``) is
applied to the adapter keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
FORMAT = "graphadapt-pretrained/1"
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


def pretrained_config(adapted) -> dict:
    from ..version import __version__

    return {"format": FORMAT, "base_model_class": adapted.source_class,
            "structure_fingerprint": structure_fingerprint(adapted.structure_report),
            "structure_paths": structure_paths(adapted.structure_report),
            "adapters": list(adapted.spec.adapters), "modules_to_save": list(adapted.spec.modules_to_save),
            "graphadapt_version": __version__}


def write_pretrained(adapted, directory: str | os.PathLike, names=None, overwrite: bool = False) -> Path:
    from ..writes import check_overwrite_flag, claim_directory, seal
    from . import SPEC_FILE, WEIGHTS_FILE, _atomic_write, save_adapters, saved_spec

    cfg = pretrained_config(adapted)
    cfg["adapters"] = list(saved_spec(adapted, names).adapters)
    claim_directory(directory, "pretrained", [CONFIG_FILE, SPEC_FILE, WEIGHTS_FILE], compatible=("adapters",),
                    overwrite=check_overwrite_flag(overwrite))
    d = save_adapters(adapted, directory, names, overwrite=True)  # claimed just above
    _atomic_write(d / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(seal(cfg), indent=2)))
    return d


def read_pretrained_config(directory: str | os.PathLike) -> dict | None:
    """The graphadapt ``adapter_config.json`` of ``directory`` (None when there is none, e.g. a plain
    ``save_adapters`` directory); a PEFT ``adapter_config.json`` raises, naming ``import_peft``."""
    from . import read_json

    p = Path(directory) / CONFIG_FILE
    if not p.exists():
        return None
    cfg = read_json(p)
    if cfg.get("format") == FORMAT:
        from ..writes import check_seal

        check_seal(cfg, p)
    if cfg.get("format") != FORMAT:
        if "peft_type" in cfg:
            raise CheckpointError(f"{directory} is a PEFT checkpoint; load it with graphadapt.import_peft(model, dir)")
        raise CheckpointError(f"{p} is not a graphadapt adapter config (format {cfg.get('format')!r})")
    return cfg


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


__all__ = ["CONFIG_FILE", "check_structure", "pretrained_config", "prefix_rule", "read_pretrained_config",
           "rewrite_key", "structure_fingerprint", "structure_paths", "write_pretrained"]
