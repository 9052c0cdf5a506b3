"""PEFT LoRA checkpoints ↔ graphadapt LoRA: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.{lora_A,lora_B,lora_magnitude_vector}[.<adapter>][.weight]``;
ours: ``adapters.<name>.<module path>.{lora_A,lora_B,lora_magnitude}`` (same shapes).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from graphadapt.errors import CheckpointError

from ..sliced import peft_inexpressible_sites

from .spec import LoRA

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)"
                  r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[A-Za-z_][\w]*))?(?P<leaf>\.weight|\.bias)?$")
_OURS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


_SAME_BASE_INITS = (True, False, None, "gaussian", "orthogonal", "eva")
"""PEFT inits that leave the base weights alone: a loaded adapter is just its saved tensors."""
_BASE_CHANGING_INITS = ("pissa", "olora")
"""PEFT inits that move part of each base weight into the adapter, re-run by PEFT when it loads the adapter (so the
saved tensors apply to the residual): imported with the same init, whose residual graphadapt computes exactly."""


def peft_key(key: str) -> tuple[str, str] | None:
    m = _KEY.match(key)
    if m is None:
        return None
    if m["leaf"] == ".bias":   # lora_bias: lora_B is an nn.Linear with a bias
        return (m["path"], "lora_bias") if m["kind"] == "lora_B" else None
    return m["path"], _OURS[m["kind"]]


def peft_lora_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> LoRA:
    """The graphadapt :class:`LoRA` equivalent to a PEFT ``LoraConfig`` dict (for given module paths)."""
    # options that change what the adapter computes: importing without them would give wrong numbers
    # layer_replication is read by graphadapt.import_peft (Spec.layer_replication): the keys name replicated layers
    unsupported = {k: cfg.get(k) for k in ("trainable_token_indices", "megatron_config", "use_qalora",
                                            "alora_invocation_tokens") if cfg.get(k)}
    if cfg.get("bias", "none") not in ("none", None):
        unsupported["bias"] = cfg["bias"]
    init = cfg.get("init_lora_weights", True)
    if init not in _SAME_BASE_INITS and init not in _BASE_CHANGING_INITS:
        # PEFT re-runs the init when it loads the adapter; these change the base weights in ways not reproduced here
        unsupported["init_lora_weights"] = init
    if unsupported:
        raise CheckpointError(f"PEFT options not supported by the importer yet: {unsupported}; re-train "
                              "without them or merge the adapter with PEFT (merge_and_unload) instead.")
    missing = [k for k in ("r", "lora_alpha") if k not in cfg]
    if missing:
        raise CheckpointError(f"adapter_config.json lacks {missing}; is it a PEFT LoraConfig?")
    try:
        r, _ = int(cfg["r"]), float(cfg["lora_alpha"])
        dropout = float(cfg.get("lora_dropout") or 0.0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter_config.json: r/lora_alpha/lora_dropout must be numbers ({e})") from e
    return LoRA(r=r, alpha=cfg["lora_alpha"], dropout=dropout, targets=targets,
                use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")),
                init=init if init in _BASE_CHANGING_INITS else "lora",
                lora_bias=bool(cfg.get("lora_bias")), rank_pattern=dict(cfg.get("rank_pattern") or {}),
                alpha_pattern=dict(cfg.get("alpha_pattern") or {}))


def peft_lora_export(spec: LoRA, modules: Mapping[str, Any], records: list) -> tuple[dict, dict]:
    """PEFT ``LoraConfig`` fields and ``{<path>.lora_A.weight: …}`` for a graphadapt LoRA adapter."""
    refused = {k: v for k, v in (("use_gating", spec.use_gating), ("init", spec.init in ("pissa", "olora")),
                                 ("dora_form", spec.use_dora and spec.dora_form != "peft" and spec.dora_form)) if v}
    refused.update(peft_inexpressible_sites(modules, records))
    if refused:
        raise CheckpointError(f"PEFT's LoRA cannot express {refused} (gating, PiSSA's changed base weights, or "
                              "sites that are not whole nn.Linear layers); save with save_adapters instead")
    cfg = {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
           "target_modules": sorted(modules), "use_rslora": spec.use_rslora, "use_dora": spec.use_dora,
           "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "lora_bias": spec.lora_bias,
           "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern)}
    tensors = {}
    for path, m in modules.items():
        tensors[f"{path}.lora_A.weight"] = m.lora_A
        tensors[f"{path}.lora_B.weight"] = m.lora_B
        if spec.use_dora:
            tensors[f"{path}.lora_magnitude_vector"] = m.lora_magnitude
        if spec.lora_bias:
            tensors[f"{path}.lora_B.bias"] = m.lora_bias
    return cfg, tensors


def _module_path(path: str, modules: set[str]) -> str | None:
    """A checkpoint module path in ``modules`` (dropping wrapper names in front, if needed)."""
    parts = path.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in modules:
            return ".".join(parts[i:])
    return None


def read_target_parameters(model, cfg: Mapping[str, Any], weights: Mapping[str, Any], name: str):
    """``(spec, fill)`` for a PEFT LoRA checkpoint with ``target_parameters`` (LoRA on 3-d expert weights).

    PEFT wraps the module owning each targeted parameter once per parameter, so its keys read
    ``<module>[.base_layer]*.lora_{A,B}``; which parameter a pair belongs to is read from the
    shapes (``lora_A`` [E·r, in], ``lora_B`` [out, r·E], ``in``/``out`` of ``W[E, out, in]``, or of
    ``W[E, in, out]`` when the module says ``is_transposed``). Other keys are per-module as usual.
    """
    import torch

    from graphadapt.vocab import adapter_prefix

    modules = {n for n, _ in model.named_modules() if n}
    params = dict(model.named_parameters())
    wanted = list(cfg.get("target_parameters") or ())
    mapped: dict[str, tuple[str, str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for key, value in weights.items():
        m = _KEY.match(key)
        if m is None or m["kind"] == "lora_magnitude_vector" and ".base_layer" in m["path"]:
            raise CheckpointError(f"unexpected key {key!r} in a PEFT LoRA checkpoint with target_parameters")
        path = m["path"]
        owner = _module_path(re.sub(r"(\.base_layer)+$", "", path), modules)
        if owner is None:
            raise CheckpointError(f"the checkpoint adapts {path!r}, which does not exist in {type(model).__name__}")
        mod_params = [f"{owner}.{leaf}" for leaf, p in model.get_submodule(owner).named_parameters(recurse=False)
                      if p.dim() == 3 and any(f"{owner}.{leaf}".endswith(t) for t in wanted)]
        if not mod_params:   # a plain linear module
            mapped[key] = (owner, _OURS[m["kind"]])
            continue
        transposed = bool(getattr(model.get_submodule(owner), "is_transposed", False))

        def dims(q):
            e, a, b = params[q].shape
            return (a, b) if transposed else (b, a)   # (in, out)

        if m["kind"] == "lora_A":
            hits = [q for q in mod_params if dims(q)[0] == value.shape[1] and value.shape[0] % params[q].shape[0] == 0]
        else:
            hits = [q for q in mod_params if dims(q)[1] == value.shape[0] and value.shape[1] % params[q].shape[0] == 0]
        depth = path.count(".base_layer")
        if len(hits) != 1:
            raise CheckpointError(f"cannot tell which expert weight of {owner} the key {key!r} belongs to "
                                  f"(shape {tuple(value.shape)}; candidates {hits or mod_params})")
        pairs.setdefault(f"{owner}#{depth}", {})[m["kind"]] = hits[0]
        mapped[key] = (hits[0], _OURS[m["kind"]])
    for where, kinds in pairs.items():
        if len(set(kinds.values())) != 1:
            raise CheckpointError(f"lora_A and lora_B at {where.split('#')[0]} belong to different expert weights "
                                  f"({sorted(set(kinds.values()))}); the checkpoint does not match this model")
    targets = tuple(sorted({p for p, _ in mapped.values()}))
    spec = peft_lora_spec(cfg, targets)

    def fill(adapted) -> None:
        ours = dict(adapted.named_parameters())
        with torch.no_grad():
            for key, (path, kind) in mapped.items():
                q = f"{adapter_prefix(name)}{path}.{kind}"
                if q not in ours:
                    raise CheckpointError(f"{key} has no counterpart {q} in the adapted model")
                if tuple(ours[q].shape) != tuple(weights[key].shape):
                    raise CheckpointError(f"{key} has shape {tuple(weights[key].shape)}, {q} needs "
                                          f"{tuple(ours[q].shape)}")
                ours[q].copy_(weights[key].to(ours[q].dtype))

    return spec, fill


__all__ = ["peft_key", "peft_lora_export", "peft_lora_spec", "read_target_parameters"]
