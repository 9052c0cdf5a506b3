"""Duck-typed facts about the model being exported.

Works for graphadapt's ``AdaptedModel`` (``example_inputs()``, ``input_names``,
``dynamic_dims``, ``graphadapt_metadata()``, ``merge()``/``unmerge()``/``is_merged``),
for a plain ``torch.export(...).module()`` and for an eager Hugging Face model.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphadapt.errors import ExportError
from graphadapt.spec.composition import Split

# Inputs whose axis 1 is not a sequence axis (images, spectrogram frames are fixed-size here).
_BATCH_ONLY_INPUTS = {"pixel_values", "pixel_mask", "image", "images"}


def _attr(model: Any, name: str) -> Any:
    """``model.name`` or ``model.name()``; None when absent or failing."""
    value = getattr(model, name, None)
    if callable(value) and not isinstance(value, torch.nn.Module):
        try:
            value = value()
        except TypeError:
            return None
    return value


def forward_parameter_order(model: torch.nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def example_inputs(model: torch.nn.Module, given: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword example inputs, in forward-signature order (torch.export ties dynamic shapes to that order)."""
    inputs = given if given is not None else _attr(model, "example_inputs")
    if inputs is None:
        inputs = default_hf_inputs(model)
    if given is None and isinstance(inputs, dict):
        inputs = with_tokenizer_inputs(model, inputs)
    if inputs is None:
        raise ExportError(
            f"no example inputs for {type(model).__name__}: pass example_inputs={{'input_ids': ...}} "
            "(keyword tensors as the model's forward takes them)"
        )
    if not isinstance(inputs, dict):
        raise ExportError(f"example_inputs must be a dict of keyword tensors, got {type(inputs).__name__}")
    # Captured constants (use_cache=False) are forward parameters too; torch.export binds
    # the signature before any pre-hook could fill them in.
    constants = _attr(model, "constant_inputs") or {}
    inputs = {**constants, **{k: v for k, v in inputs.items() if v is not None}}
    order = forward_parameter_order(model)
    names = _attr(model, "input_names")
    if names:
        order = [*names, *order]
    rank = {n: i for i, n in reversed(list(enumerate(order)))}
    return dict(sorted(inputs.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def tokenizer_input_names(config: Any) -> list[str] | None:
    """``model_input_names`` of the tokenizer class transformers pairs with ``config.model_type``
    (BertTokenizer: input_ids, token_type_ids, attention_mask); None when unknown."""
    model_type = getattr(config, "model_type", None)
    if not model_type:
        return None
    try:
        import transformers
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    except ImportError:
        return None
    entry = TOKENIZER_MAPPING_NAMES.get(model_type)
    for name in (entry if isinstance(entry, (tuple, list)) else (entry,)):
        names = getattr(getattr(transformers, name, None), "model_input_names", None) if name else None
        if names:
            return list(names)
    return None


def takes_token_type_ids(model: torch.nn.Module) -> bool:
    """The model's forward takes ``token_type_ids`` and its tokenizer returns them (BERT, ELECTRA,
    DeBERTa-v2: yes; RoBERTa, GPT-2: no); where transformers knows no tokenizer for the model type,
    the config has more than one token type (``type_vocab_size > 1``)."""
    if "token_type_ids" not in forward_parameter_order(model):
        return False
    config = getattr(model, "config", None)
    names = tokenizer_input_names(config)
    if names is not None:
        return "token_type_ids" in names
    types = getattr(config, "type_vocab_size", None)
    return isinstance(types, int) and types > 1


def with_tokenizer_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus every input the model takes from its tokenizer that they lack, so that a
    tokenizer's output feeds the export unchanged: ``token_type_ids`` (segments 0 then 1, the shape
    of ``input_ids``) where :func:`takes_token_type_ids`. An adapted model serves the wider call
    through its signature variants (graphadapt.signatures)."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or "token_type_ids" in inputs or not takes_token_type_ids(model):
        return inputs
    segments = torch.zeros_like(ids)
    segments[..., ids.shape[-1] // 2:] = 1
    return {**inputs, "token_type_ids": segments}


def for_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.nn.Module:
    """The module that serves ``inputs``: an adapted model called with other tensor inputs than it
    was captured with (``token_type_ids``) serves them with a signature variant (graphadapt.signatures),
    which shares its parameters, adapters and merge state; that variant is exported, so the export
    copy is merged, converted and traced as a model captured with those inputs."""
    names = getattr(model, "input_names", None)
    tensors = {k for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if (not isinstance(model, torch.fx.GraphModule) or not hasattr(model, "adapter_records") or names is None
            or set(names) == tensors or model.__dict__.get("_call_signature") is None):
        return model
    from graphadapt.signatures import variants

    with torch.no_grad():
        model(**inputs)  # captures the variant on first use
    for variant in variants(model).values():
        if variant is not None and set(variant.input_names) == tensors:
            return variant
    return model


def default_hf_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> dict[str, Any] | None:
    """Example inputs for an eager transformers model, from its config; None if unknown."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        return None
    g = torch.Generator().manual_seed(0)
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        inputs = {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq - 2), generator=g)
        return inputs
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=g)}
    return None


def _fixed_sequence(model) -> tuple[str, ...]:
    """Axis names a model's active composition pins: a ``Split`` divides the sequence at fixed positions, so the
    sequence length of its export is the example's (``sum(splits)``)."""
    comp = getattr(getattr(model, "spec", None), "composition", None)
    blocks = comp.blocks() if comp is not None and hasattr(comp, "blocks") else ()
    return ("sequence",) if any(isinstance(b, Split) for b in blocks) else ()


def dynamic_axes(model: torch.nn.Module, inputs: dict[str, Any], dynamic: bool) -> dict[str, dict[int, str]]:
    """{tensor input: {axis: name}}: ``model.dynamic_dims`` when present, else batch (+ sequence) by name."""
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if not dynamic:
        return {k: {} for k in tensors}
    declared = _attr(model, "dynamic_dims")
    if declared is not None:  # an empty dict is a statically captured model: keep it static
        fixed = _fixed_sequence(model)
        axes = {k: {int(a): str(n) for a, n in (declared.get(k) or {}).items() if str(n) not in fixed}
                for k in tensors if k in declared}
        for k, value in tensors.items():  # an input the model was not captured with (token_type_ids):
            if k not in axes:             # the axes of a captured input of its shape (input_ids)
                twin = next((n for n in axes if tensors[n].shape == value.shape and tensors[n].dim() == value.dim()),
                            None)
                axes[k] = dict(axes[twin]) if twin is not None else {}
        return {k: axes[k] for k in tensors}
    axes: dict[str, dict[int, str]] = {}
    for name, value in tensors.items():
        axes[name] = {0: "batch"} if value.dim() >= 1 else {}
        if value.dim() >= 2 and name not in _BATCH_ONLY_INPUTS:
            axes[name][1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"
    return axes


def export_dynamic_shapes(inputs: dict[str, Any], axes: dict[str, dict[int, str]]) -> dict[str, Any] | None:
    """torch.export ``dynamic_shapes`` for the kwargs: ``Dim.DYNAMIC`` per named axis, None for constants."""
    if not any(axes.values()):
        return None
    return {k: ({a: torch.export.Dim.DYNAMIC for a in axes.get(k, {})} or None) for k in inputs}


def output_names(outputs: Any) -> list[str]:
    """Names for the flattened outputs: ModelOutput/dict keys, ``output_<i>`` for tuples, dotted when nested."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = []
    for path, _leaf in leaves:
        parts = []
        for key in path:
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(key.name)
            elif isinstance(key, pytree.SequenceKey):
                parts.append(str(key.idx) if parts else f"output_{key.idx}")
            else:
                parts.append(str(key).strip(".[]'\""))
        names.append(".".join(parts) or "output")
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return unique


def flat_tensors(outputs: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]


def metadata(model: torch.nn.Module) -> dict[str, str]:
    """``metadata_props`` for the ONNX file: graphadapt version, model class, spec JSON when known."""
    meta = {"graphadapt.version": graphadapt_version()}
    config = getattr(model, "config", None)
    base = type(model).__name__
    if config is not None and getattr(config, "architectures", None):
        base = config.architectures[0]
    meta["graphadapt.base_model_class"] = base
    extra = _attr(model, "graphadapt_metadata") or {}
    for k, v in extra.items():
        key = k if str(k).startswith("graphadapt") else f"graphadapt.{k}"
        meta[key] = v if isinstance(v, str) else str(v)
    return meta


def graphadapt_version() -> str:
    try:
        from importlib.metadata import version

        return version("graphadapt")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def model_device(model: torch.nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def is_merged(model: Any) -> bool:
    value = getattr(model, "is_merged", False)
    return bool(value() if callable(value) else value)


def merges_into_copy(model: Any) -> bool:
    """A graphadapt ``AdaptedModel`` (not merged yet): the exporter folds its adapters into the
    export copy (:func:`graphadapt.exporters.dtype.converted_copy`) instead of merging it."""
    return (isinstance(model, torch.fx.GraphModule) and hasattr(model, "adapter_records")
            and callable(getattr(model, "merge", None)) and not is_merged(model))


@contextlib.contextmanager
def merged_for_export(model: torch.nn.Module, merge: bool) -> Iterator[bool]:
    """Merge adapters for the duration of the export and unmerge afterwards; yields whether merged."""
    do_merge = merge and callable(getattr(model, "merge", None)) and not is_merged(model)
    if do_merge:
        try:
            model.merge()
        except Exception as e:
            raise ExportError(f"merging adapters before export failed ({one_line(e)}); pass merge=False") from e
    try:
        yield do_merge or is_merged(model)
    finally:
        if do_merge and callable(getattr(model, "unmerge", None)):
            model.unmerge()


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for eager models; a no-op for captured graphs, which refuse ``.eval()``."""
    was_training = model.training
    switched = False
    if was_training:
        try:
            model.eval()
            switched = True
        except NotImplementedError:  # torch.export's unlifted module: dropout mode is baked in
            pass
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            yield
    finally:
        if switched:  # put back the mode it had; a merged AdaptedModel refuses train() itself, not a restore
            torch.nn.Module.train(model, was_training)


def one_line(e: BaseException, limit: int = 300) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def root_cause(e: BaseException) -> BaseException:
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return e
