"""Optimum's ONNX Runtime layout: ``AdaptedModel → directory`` that ``optimum.onnxruntime.ORTModelFor<Task>``
loads with ``from_pretrained`` (and so runs in Optimum's and transformers' ``pipeline``):

    directory/
      config.json               the source model's config (``architectures``: the source class)
      model.onnx                encoder tasks: input_ids, attention_mask[, token_type_ids] →
                                  logits (sequence / token classification) | start_logits, end_logits (question
                                  answering) | last_hidden_state (feature extraction)
                                causal LM: input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value →
                                  logits, present.{i}.key/.value (one graph for prefill and decode, no
                                  use_cache_branch: Optimum feeds an empty past on the first step)
      generation_config.json    causal LM: the source model's generation config
      tokenizer files           when a tokenizer is given (``tokenizer.save_pretrained``)

The ONNX file is written and verified by :func:`~graphadapt.exporters.onnx.export_onnx` (encoders) or
:func:`~graphadapt.exporters.decoder.export_decoder_onnx` (causal LMs: a greedy decode in onnxruntime against
PyTorch); the adapters are folded into it (``merge=True``) like any export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from graphadapt.errors import ExportError
from graphadapt.exporters.decoder import _twins, export_decoder_onnx
from graphadapt.exporters.onnx import ExportReport
from graphadapt.exporters.onnx import export_onnx as export_onnx_file

__all__ = ["LAYOUTS", "OPTIMUM_TASKS", "export_onnx", "export_optimum", "optimum_task"]

LAYOUTS = ("file", "optimum")

OPTIMUM_TASKS = {
    # task: (ORTModel class, outputs model.onnx must have, source class name suffixes)
    "text-classification": ("ORTModelForSequenceClassification", ("logits",), ("ForSequenceClassification",)),
    "token-classification": ("ORTModelForTokenClassification", ("logits",), ("ForTokenClassification",)),
    "question-answering": ("ORTModelForQuestionAnswering", ("start_logits", "end_logits"), ("ForQuestionAnswering",)),
    "text-generation": ("ORTModelForCausalLM", ("logits",), ("ForCausalLM", "LMHeadModel")),
    "feature-extraction": ("ORTModelForFeatureExtraction", ("last_hidden_state",), ("Model",)),
}
"""Tasks :func:`export_optimum` writes, with the Optimum class that loads each."""

# Optimum 0.1.0 sizes the empty first-step past as hidden_size // num_attention_heads, except for these
_OWN_HEAD_DIM = {"gemma", "gemma3_text", "gpt_oss", "nemotron"}
_KV_HEADS_FIELD = {"arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss", "helium",
                   "mistral", "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3", "stablelm"}


def export_onnx(model, path: str | os.PathLike, example_inputs: dict[str, Any] | None = None, *args,
                layout: str = "file", tokenizer=None, task: str | None = None, **options) -> ExportReport:
    """Export ``model`` to ONNX, verified with onnxruntime; ``layout`` says what is written at ``path``.

    ``layout="file"`` (default): the ``.onnx`` file ``path``
    (:func:`graphadapt.exporters.onnx.export_onnx`: every option — ``dtype``, ``merge``, ``optimize``,
    ``swappable``, tolerances, … — is documented there). ``layout="optimum"``: the *directory* ``path`` in
    Optimum's ONNX Runtime layout (``config.json``, ``model.onnx``, ``generation_config.json`` for causal LMs,
    ``tokenizer``'s files when given), loadable by ``optimum.onnxruntime.ORTModelFor<Task>.from_pretrained``; see
    :func:`export_optimum` (``task`` defaults to the one the source model's class says).
    """
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "file":
        if tokenizer is not None or task is not None:
            raise ExportError("tokenizer= and task= are for layout='optimum' (a directory); a single .onnx file "
                              "holds neither: pass layout='optimum' or leave them out")
        return export_onnx_file(model, path, example_inputs, *args, **options)
    if args or example_inputs is not None:
        raise ExportError("layout='optimum' exports on the model's own example inputs; leave example_inputs out")
    return export_optimum(model, path, tokenizer=tokenizer, task=task, **options)


def optimum_task(model) -> str:
    """The Optimum task of an adapted model, from its source class (``BertForSequenceClassification`` →
    ``"text-classification"``); :class:`ExportError` naming the class when none fits."""
    source = str(getattr(model, "source_class", "") or type(model).__name__).rsplit(".", 1)[-1]
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ExportError(f"{source} is an encoder-decoder model: the Optimum layout covers encoder tasks and "
                          "decoder-only LMs; export it with export_decoder_onnx (encoder_model.onnx + "
                          "decoder_with_past_model.onnx, Optimum's file names)")
    for task, (_, _, suffixes) in OPTIMUM_TASKS.items():
        if any(source.endswith(s) for s in suffixes):
            return task
    raise ExportError(f"cannot tell the Optimum task of {source}; pass task= one of {', '.join(OPTIMUM_TASKS)}")


def export_optimum(model, directory: str | os.PathLike, *, tokenizer=None, task: str | None = None,
                   dtype: str = "fp32", merge: bool = True, verify: bool = True, opset: int | None = None,
                   providers: list[str] | None = None, atol: float | None = None, rtol: float | None = None,
                   overwrite: bool = False, **options) -> ExportReport:
    """Write ``model`` into ``directory`` in Optimum's ONNX Runtime layout (module docstring) and return the
    report of ``model.onnx``.

    ``task``: one of :data:`OPTIMUM_TASKS` (default: :func:`optimum_task`). ``tokenizer``: saved beside the model
    (``save_pretrained``) so ``ORTModelFor….from_pretrained(directory)`` and ``AutoTokenizer.from_pretrained(directory)``
    find everything. Encoder tasks take :func:`~graphadapt.exporters.onnx.export_onnx`'s other ``options``;
    ``text-generation`` exports the KV-cache decoder (:func:`~graphadapt.exporters.decoder.export_decoder_onnx`,
    verified by a greedy decode) and takes ``max_new_tokens``/``input_ids``/``attention_mask``/``external_data``.
    ``directory`` is created if missing (its parent must exist); an earlier graphadapt export there is replaced.
    """
    task = optimum_task(model) if task is None else task
    if task not in OPTIMUM_TASKS:
        raise ExportError(f"task must be one of {', '.join(OPTIMUM_TASKS)}, got {task!r}")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise ExportError("the Optimum layout needs the source model's transformers config (config.json); this "
                          f"model has none ({type(model).__name__} captured from a model without .config)")
    directory = Path(directory)
    if directory.suffix == ".onnx" or directory.is_file():
        raise ExportError(f"layout='optimum' writes a directory (config.json, model.onnx, ...); {directory} is a "
                          "file path: give a directory")
    if not directory.parent.is_dir():
        raise ExportError(f"directory {directory.parent} does not exist; create it before exporting to "
                          f"{directory.name}")
    if task == "text-generation":
        unknown = set(options) - {"max_new_tokens", "input_ids", "attention_mask", "external_data"}
        if unknown:
            raise ExportError(f"a causal LM's Optimum export does not take {', '.join(sorted(unknown))}")
        if overwrite:  # the decoder exporter replaces an earlier graphadapt export, never a foreign file
            raise ExportError("overwrite=True is not taken by a causal LM's Optimum export: an earlier graphadapt "
                              f"export in {directory} is replaced anyway; remove another model.onnx there first")
        _check_decoder_layout(model, config)
    created = not directory.exists()
    directory.mkdir(exist_ok=True)
    path = directory / "model.onnx"
    common = dict(dtype=dtype, merge=merge, verify=verify, opset=opset, providers=providers, atol=atol, rtol=rtol)
    if task == "text-generation":
        report = export_decoder_onnx(model, path, **common, **options)
    else:
        report = export_onnx_file(model, path, overwrite=overwrite, **common, **options)
    want = OPTIMUM_TASKS[task][1]
    missing = [n for n in want if n not in report.output_names]
    if missing:  # the file is of no use to Optimum: take it back
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise ExportError(f"model.onnx has outputs {report.output_names}, but Optimum's "
                          f"{OPTIMUM_TASKS[task][0]} reads {list(want)}: {task!r} does not fit this model "
                          f"({getattr(model, 'source_class', type(model).__name__)}); pass the task it has")
    _write_config(model, config, directory, task)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, directory)
    report.metadata["graphadapt.layout"] = "optimum"
    report.metadata["graphadapt.optimum_task"] = task
    return report


def _check_decoder_layout(model, config) -> None:
    """Optimum builds the first step's empty past from the config: refuse a graph whose cache it would size wrong."""
    twins = _twins(model)
    layout = twins[-1].decoder_cache
    model_type = getattr(config, "model_type", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if model_type in _OWN_HEAD_DIM:
        head_dim = getattr(config, "head_dim", None)
    else:
        head_dim = hidden // heads if hidden and heads else None
    kv = getattr(config, "num_key_value_heads", None) if model_type in _KV_HEADS_FIELD else heads
    if head_dim != layout["head_dim"] or kv != layout["kv_heads"]:
        raise ExportError(
            f"Optimum's ORTModelForCausalLM would feed a past of {kv} heads x {head_dim} per head (from the "
            f"{model_type} config), but this graph's cache has {layout['kv_heads']} x {layout['head_dim']}; "
            "use layout='file' with export_decoder_onnx and feed the cache yourself")


def _write_config(model, config, directory: Path, task: str) -> None:
    import copy

    cfg = copy.deepcopy(config)
    source = str(getattr(model, "source_class", "")).rsplit(".", 1)[-1]
    if source:
        cfg.architectures = [source]
    if task == "text-generation":
        cfg.use_cache = True
    cfg.save_pretrained(str(directory))
    if task == "text-generation":
        src = model.__dict__.get("_source_model")
        gen = getattr(src, "generation_config", None)
        if gen is None:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_model_config(cfg)
        gen.save_pretrained(str(directory))


def _write_tokenizer(tokenizer, directory: Path) -> None:
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ExportError(f"tokenizer must be a transformers tokenizer (with save_pretrained), got "
                          f"{type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(directory))
    # transformers 5 names its fast tokenizers' class "TokenizersBackend"; transformers 4 (which Optimum needs)
    # loads the same tokenizer.json as PreTrainedTokenizerFast
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
