"""Which model a checkpoint fits: its recorded structure against this model's, and the module-path
rewrite between them.

A checkpoint records (:func:`structure_record`) the structure it was saved on, as the versioned
:class:`~graphadapt.structure.signature.StructureSignature` (``structure_signature``: typed facts, no
display strings), the module path of each (layer, block, role) (``structure_paths``) and, for readers
older than the signature, the v0 ``structure_fingerprint``. Loading (:func:`check_structure`):

1. ``structure_signature`` of a version this graphadapt reads: compared with the model's; a
   difference is refused, naming what differs (layer count, sizes, heads, norm placement...).
2. otherwise ``structure_fingerprint`` (checkpoints written before the signature, or by a newer
   graphadapt whose signature version this one does not read but which still wrote the v0 form):
   compared with the model's v0 digest, recomputed from its typed facts by a frozen copy of the
   v0 rendering; a difference is refused, naming a layer-count or role difference when the saved
   ``structure_paths`` show one.
3. a signature of a version this graphadapt does not read, and no fingerprint: CheckpointError
   naming the upgrade.
4. no record at all (files written by hand): not checked here; the per-tensor key and shape checks
   still run.

Then the saved path of each (layer, block, role) is paired with ours: the one prefix rewrite they
agree on (``bert.`` ↔ ``""``) is applied to the adapter keys, so the same encoder behind a different
head or wrapper (``BertModel`` vs ``BertForSequenceClassification``) matches.
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..structure.signature import KNOWN_VERSIONS, StructureSignature, structure_signature
from ..structure.types import StructureMap

RECORD_KEYS = ("structure_signature", "structure_fingerprint")


def _layers(report) -> list:
    return list(report["layers"]) if report is not None else []


def report_signature(report) -> StructureSignature:
    """The signature of a structure report (:func:`graphadapt.inspect`, ``AdaptedModel.structure_report``)."""
    if report is None:
        return structure_signature(StructureMap())
    sig = getattr(report, "signature", None)
    if sig is None:
        raise CheckpointError("this model's structure report carries no structure signature (made by another "
                              "graphadapt version?); re-apply the adapters with graphadapt.apply")
    return sig


def structure_record(report) -> dict:
    """What a checkpoint records about the structure it was saved on (see the module docstring)."""
    sig = report_signature(report)
    return {"structure_signature": sig.to_dict(), "structure_fingerprint": sig.v0_digest,
            "structure_paths": structure_paths(report)}


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
    """Refuse a checkpoint saved on a different structure, naming what differs; the path rewrite onto
    ``adapted`` (or None). ``cfg``: the checkpoint's ``spec.json`` or ``adapter_config.json`` object."""
    if cfg is None:
        return None
    ours = report_signature(adapted.structure_report)
    saved_class = str(cfg.get("base_model_class") or cfg.get("source_class")).rsplit(".", 1)[-1]
    where = (f"{directory} was saved on a {saved_class} whose recognised structure differs from this "
             f"{str(adapted.source_class).rsplit('.', 1)[-1]}'s")
    fix = "Load it onto the base model it was trained on."
    record = cfg.get("structure_signature")
    version = record.get("version") if isinstance(record, dict) else None
    if record is not None and version in KNOWN_VERSIONS:
        try:
            saved = StructureSignature.from_dict(record)
        except ValueError as e:
            raise CheckpointError(f"{directory}: unreadable structure_signature ({e}); re-save the checkpoint") from e
        if saved.digest != ours.digest:
            diff = "; ".join(saved.differences(ours)) or "facts differ"
            raise CheckpointError(f"{where} (saved vs this model: {diff}). {fix}")
    elif cfg.get("structure_fingerprint") is not None:
        want, have = cfg["structure_fingerprint"], ours.v0_digest
        if want != have:
            raise CheckpointError(f"{where} ({_v0_difference(cfg.get('structure_paths'), adapted.structure_report)}; "
                                  f"v0 fingerprint {want[:12]}… vs {have[:12]}…). {fix}")
    elif record is not None:
        raise CheckpointError(f"{directory} records its structure in signature version {version!r}, which this "
                              f"graphadapt does not read (it reads {list(KNOWN_VERSIONS)}): upgrade graphadapt.")
    return prefix_rule(cfg.get("structure_paths") or [], structure_paths(adapted.structure_report))


def _v0_difference(saved_paths, report) -> str:
    """A v0 checkpoint holds only a hash; its ``structure_paths`` still show a layer-count or role difference."""
    if not saved_paths:
        return "other layer count, sizes or architecture"
    saved = {(a, b, c) for a, b, c, _ in saved_paths if b != "layer" and not c.endswith(".norm")}
    ours = {(a, b, c) for a, b, c, _ in structure_paths(report) if b != "layer" and not c.endswith(".norm")}
    n_saved = len({a for a, _, _ in saved})
    n_ours = len({a for a, _, _ in ours})
    if n_saved != n_ours:
        return f"{n_saved} layer(s) vs {n_ours}"
    if saved != ours:
        only = sorted(saved ^ ours)[:3]
        return "roles found in only one of them: " + ", ".join(f"layer {a} {b}.{c}" for a, b, c in only)
    return "same layers and roles; other sizes, head counts, norm placement or attention form"


__all__ = ["RECORD_KEYS", "check_structure", "prefix_rule", "report_signature", "rewrite_key", "structure_paths",
           "structure_record"]
