"""Top-level entry points: ``apply``, ``merge``, ``inspect``, ``load`` and the checkpoint importers.

``apply`` is the pipeline in one place::

    capture ─▶ recognize ─▶ build_plan (data) ─▶ one insertion pass per planned adapter ─▶ AdaptedModel
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from .replication import MARK as REPLICATED, replicate_layers
from .capture import capture, serialised
from .errors import CaptureError, CheckpointError, SpecError
from .hollow import HOLLOW_MARK, fill_hollow, held_hollow, reading_checkpoint
from .inference import generate_options
from .init import isolated_rng
from . import generation, pickling, signatures
from .merging import Merger
from .model import AdaptedModel, MergeReport, ModelServices, fusion_dropout
from .plan import Plan, build_plan, execute_plan
from .spec import Spec, as_spec
from .structure import recognize
from .structure.report import structure_report


@serialised
def plan(model: nn.Module, spec: Any, example_inputs: tuple | None = None,
         example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True) -> Plan:
    """What :func:`apply` would insert where (adapters → sites, shared sites → combination), without building it."""
    spec = as_spec(spec)
    with isolated_rng():
        gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
        return build_plan(recognize(gm), spec)


@serialised
def apply(model: nn.Module, spec: Any, example_inputs: tuple | None = None,
          example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True,
          cache: bool = False, quantize: Any = None, program_cache: bool | None = None) -> AdaptedModel:
    """Capture ``model`` and insert the adapters of ``spec``.

    ``spec``: a :class:`Spec`, one method (``LoRA(r=8)``), a dict, or a JSON/YAML path.
    Returns an :class:`AdaptedModel`: base weights frozen (sharing storage with ``model``,
    which is never modified), adapters trainable. Initialisation draws only from generators
    seeded by (seed, adapter name, site): the caller's RNG state is untouched.

    ``cache=True`` (causal LMs): capture with a KV cache as flat tensor inputs/outputs, for
    :meth:`AdaptedModel.generate` and decoder ONNX export; see :mod:`graphadapt.generation`.

    ``quantize="nf4"`` / ``"fp4"`` / ``"int8"`` (or a :class:`graphadapt.quantized.Quantize`): quantize the frozen
    base linears inside the captured graph (QLoRA from an fp32/fp16/bf16 checkpoint; the same packed
    bytes as transformers' ``BitsAndBytesConfig`` loading path; needs bitsandbytes). The caller's model
    stays dense. See docs/big-models.md.

    ``program_cache``: the on-disk cache of captured programs (opt-in): True uses it for this call, False never
    reads or writes it, None (default) uses it only when ``GRAPHADAPT_CACHE`` names a directory
    (:mod:`graphadapt.program_cache`).
    """
    from .checkpoints.trainable import with_task_heads

    spec = with_task_heads(model, as_spec(spec))  # Spec.task_type's heads join modules_to_save
    if spec.layer_replication is not None and getattr(model, REPLICATED, None) != spec.layer_replication:
        model = replicate_layers(model, spec.layer_replication)   # a new, deeper model sharing the weights
    if quantize is not None:
        from .quantized import Quantize, quantize_linears

        quantize = Quantize.parse(quantize)
    target, axes = model, None
    if cache:
        from .kvcache import cached_decoder

        if example_inputs is not None:
            raise CaptureError("with cache=True pass example_kwargs={'input_ids': ...}, not example_inputs")
        target, example_kwargs, axes = cached_decoder(model, example_kwargs)
    with isolated_rng():
        gm = capture(target, example_inputs, example_kwargs, dynamic=dynamic, cls=AdaptedModel,
                     dynamic_axes=axes, program_cache=program_cache)
        if cache:
            gm.decoder_cache = dict(target.layout)
        if quantize is not None:  # before the snapshot: re-planning starts from the quantized graph
            quantize_linears(gm, quantize, source=model)  # a hollow base: each weight read from its checkpoint
            fill_hollow(gm, model)  # what was not quantized (embeddings, output projection) is read: none stays hollow
            gm._quantize = quantize  # a pickle's rebuild quantizes again (graphadapt.pickling)
        base_graph = gm.snapshot_graph()  # set_active re-plans from here, without re-capture
        sm = recognize(gm)
        the_plan = build_plan(sm, spec)
        for p in gm.parameters():
            p.requires_grad_(False)
        with reading_checkpoint(gm, model):  # over a hollow base, inits that read W read the checkpoint's
            records = execute_plan(gm, the_plan, dropout=fusion_dropout(gm), base_seed=spec.effective_seed(None))
            if spec.modules_to_save:  # trainable copies of whole modules (checkpoints/trainable.py)
                from .checkpoints.trainable import install_trainable_copies, resolve_modules_to_save

                install_trainable_copies(gm, resolve_modules_to_save(gm, spec.modules_to_save))
        # adapter modules were created trainable (or deliberately frozen, e.g. learn_phm=False);
        # the base was frozen before insertion, so nothing to flip here
        gm._init_adapted(spec, records, structure_report(sm), model, the_plan, base_graph, SERVICES)
        held = held_hollow(gm, model)
        if held:  # unread base weights (graphadapt.outofcore.hollow_model): forward, merge, to_base_model refuse
            setattr(gm, HOLLOW_MARK, frozenset(held))
        if spec.active is not None and spec.composition is None:
            gm._set_flags(spec.active_names)
        gm.train(model.training)
    return gm


def unpickle(state: dict) -> AdaptedModel:
    """What ``pickle.load`` calls for an adapted model (see :mod:`graphadapt.pickling`)."""
    return pickling.rebuild(state, apply)


def _reduce(model: AdaptedModel):
    return unpickle, (pickling.pickle_state(model),)


def _generate(model, input_ids, attention_mask=None, **kwargs):
    """``AdaptedModel.generate``: transformers-style keywords (a pipeline's ``generation_config``) mapped onto
    :func:`graphadapt.generation.generate` (:func:`graphadapt.inference.generate_options`)."""
    return generation.generate(model, input_ids, attention_mask, **generate_options(input_ids, kwargs))


SERVICES = ModelServices(merger=Merger(), signature_of=signatures.signature_of, route_call=signatures.dispatch,
                         set_checkpointing=signatures.set_checkpointing, generate=_generate, recapture=apply,
                         reduce=_reduce)
"""What every model built here delegates to: the layers above ``model`` hand their entry points in explicitly."""


@serialised
def merge(adapted: AdaptedModel, names=None, safe: bool = True, strict: bool = False,
          in_place: bool = False, keep_backup: bool = True) -> MergeReport:
    """Fold mergeable adapters into the base weights; see :meth:`AdaptedModel.merge`."""
    return adapted.merge(names, safe=safe, strict=strict, in_place=in_place, keep_backup=keep_backup)


@serialised
def inspect(model: nn.Module, example_inputs: tuple | None = None,
            example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True) -> dict:
    """Capture and recognise ``model``; return the structure report (see ``graphadapt inspect``)."""
    with isolated_rng():
        gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
        return structure_report(recognize(gm))


def load(model: nn.Module, directory: str | os.PathLike, **apply_kwargs) -> AdaptedModel:
    """Re-apply a saved spec (``save_adapters``) to ``model`` and load the saved adapter weights.

    The checkpoint may come from another head/wrapper of the same structure (saved on
    ``BertForSequenceClassification``, loaded onto ``BertModel`` or back): module paths are mapped
    through the recognised structure. Saved ``modules_to_save`` that ``model`` lacks (a classifier, onto
    a headless model) are skipped with a warning."""
    import warnings

    from .checkpoints import load_adapter_weights, read_spec
    from .checkpoints.trainable import resolve_modules_to_save

    spec = read_spec(directory)
    have = [n for n in spec.modules_to_save if resolve_modules_to_save(model, [n], strict=False)]
    if len(have) < len(spec.modules_to_save):
        warnings.warn(f"{directory}: modules_to_save {[n for n in spec.modules_to_save if n not in have]} do not "
                      f"exist in {type(model).__name__}; their saved weights are not loaded", stacklevel=2)
        spec = spec.replace(modules_to_save=tuple(have))
    try:
        adapted = apply(model, spec, **apply_kwargs)
    except SpecError:
        moved = _retarget_paths(model, spec, directory, apply_kwargs)
        if moved is None:
            raise
        adapted = apply(model, moved, **apply_kwargs)
    load_adapter_weights(adapted, directory, skip_modules_to_save=len(have) < len(read_spec(directory).modules_to_save))
    return adapted


def _retarget_paths(model, spec, directory, apply_kwargs):
    """``spec`` with its module-path ``targets`` mapped onto ``model`` through the recognised structure
    (saved on ``BertForSequenceClassification``, loaded onto ``BertModel``), or None when nothing maps."""
    import dataclasses

    from .checkpoints import SPEC_FILE, read_json
    from .checkpoints.matching import prefix_rule, structure_paths
    from .spec.targets import target_kind

    saved = read_json(os.path.join(directory, SPEC_FILE)).get("structure_paths")
    if not saved:
        return None
    kw = {k: apply_kwargs[k] for k in ("example_inputs", "example_kwargs", "dynamic") if k in apply_kwargs}
    rule = prefix_rule(saved, structure_paths(inspect(model, **kw)))
    if rule is None:
        return None
    old, new = rule

    def move(t: str) -> str:
        if target_kind(t) not in ("path", "glob") or (old and not t.startswith(old + ".")):
            return t
        rest = t[len(old) + 1:] if old else t
        return f"{new}.{rest}" if new else rest

    adapters = {n: dataclasses.replace(m, targets=tuple(move(t) for t in m.targets)) if hasattr(m, "targets") else m
                for n, m in spec.adapters.items()}
    return spec.replace(adapters=adapters)


def from_pretrained(model: nn.Module, directory: str | os.PathLike, **apply_kwargs) -> AdaptedModel:
    """Load a directory written by :meth:`AdaptedModel.save_pretrained` onto ``model`` (a base model of the
    same recognised structure; ``adapter_config.json``'s fingerprint must match, else
    :class:`~graphadapt.errors.CheckpointError`). Same as :func:`load`, plus that check."""
    from .checkpoints.pretrained import read_pretrained_config

    if read_pretrained_config(directory) is None:
        raise CheckpointError(f"{directory} has no adapter_config.json: not written by save_pretrained "
                              "(a save_adapters directory loads with graphadapt.load)")
    return load(model, directory, **apply_kwargs)


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                ignore_modules_to_save: bool = False, allow_pickle: bool = False, **apply_kwargs) -> AdaptedModel:
    """Apply the adapter saved in a PEFT checkpoint directory to ``model``, with its weights.

    The method comes from the checkpoint's ``peft_type`` (any registered plugin with that
    ``peft_type``); adapted module paths come from the checkpoint's keys. ``modules_to_save``
    (whole modules PEFT trained, e.g. the classifier) are imported as ``Spec.modules_to_save`` (trainable
    copies with the saved weights); ``ignore_modules_to_save=True`` skips them (the base's own modules stay). A pickled
    ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then read with ``weights_only=True``).
    """
    from .checkpoints.peft import read_peft, read_peft_config

    layer_map = read_peft_config(directory).get("layer_replication")
    if layer_map:   # PEFT's keys name the replicated layers: read them against the deeper model
        model = replicate_layers(model, layer_map)
    try:
        spec, fill, modules = read_peft(model, directory, name, ignore_modules_to_save=ignore_modules_to_save,
                                        allow_pickle=allow_pickle)
    except CheckpointError as e:
        if not layer_map:
            raise
        raise CheckpointError(f"{e} (read against the model with the checkpoint's layer_replication={layer_map} "
                              "applied: is it the base model the adapter was trained on?)") from e
    adapted = apply(model, Spec({name: spec}, modules_to_save=modules,
                                layer_replication=layer_map or None), **apply_kwargs)
    fill(adapted)
    return adapted


def import_adapterhub(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                      strict: bool = True, with_head: bool | None = None, **apply_kwargs) -> AdaptedModel:
    """Apply the adapter saved by AdapterHub ``model.save_adapter(dir, name)`` to ``model``, with its weights.

    ``name``: graphadapt adapter name (default: the saved name). ``strict``: every AdapterHub tensor
    must land in a graphadapt tensor and every graphadapt tensor must be filled. A head saved beside it
    (``save_adapter(..., with_head=True)``) comes too: a flexible head wraps ``model`` as
    :class:`graphadapt.heads.ModelWithHead` (outputs: the head's logits), a static head (e.g. the
    ``classifier`` of a ``…ForSequenceClassification``) fills ``model``'s own modules; either is trained whole
    (``Spec.modules_to_save``). ``with_head``: None (default) brings the head when ``model`` can take it and
    otherwise warns and leaves it (a static head saved from a model with a head, imported into the bare
    model); True requires it (:class:`CheckpointError` if ``model`` cannot take it); False leaves it.

    Several adapters at once (AdapterHub's multi-task and multi-head setups): ``directory`` a list of
    ``save_adapter`` directories (each keeps its saved name; ``name`` must be None), ``active`` the spec's active
    setup (e.g. ``ga.MultiTask("t0", "t1")``), ``active_head`` the heads model's active head (a name, a list, or a
    ``BatchSplit`` of head names: :class:`graphadapt.heads.ModelWithHead`), set before capture.
    """
    from .checkpoints.adapterhub import read_adapterhub_adapter
    from .checkpoints.adapterhub_heads import read_adapterhub_head

    many = isinstance(directory, (list, tuple))
    if many and name is not None:
        raise CheckpointError("import_adapterhub of several directories keeps each adapter's saved name; leave "
                              "name=None")
    active, active_head = apply_kwargs.pop("active", None), apply_kwargs.pop("active_head", None)
    specs, fills, heads, modules = {}, [], [], []
    for d in (directory if many else [directory]):
        spec, saved, fill = read_adapterhub_adapter(d)
        ours = name or saved
        if ours in specs:
            raise CheckpointError(f"two of the directories hold an adapter named {ours!r}; rename one with "
                                  "AdapterHub's save_adapter(dir, new_name)")
        head = read_adapterhub_head(d) if with_head is not False else None
        if head is not None and with_head is None and not head.fits(model):
            import warnings

            warnings.warn(f"{d} holds a head whose tensors {sorted(head.tensors)[:4]} are no parameters of "
                          f"{type(model).__name__}: imported the adapter without it (pass with_head=True to require "
                          "it, with the model class it was saved from)", UserWarning, stacklevel=2)
            head = None
        if head is not None:
            model, mods = head.attach(model, ours)
            modules.extend(m for m in mods if m not in modules)
            heads.append(head)
        specs[ours] = spec
        fills.append((ours, fill))
    if active_head is not None:
        if not hasattr(model, "active_head"):
            raise CheckpointError("active_head needs flexible heads (save_adapter(..., with_head=True) from an "
                                  "AdapterHub …AdapterModel); these directories bring none")
        model.active_head = active_head
    adapted = apply(model, Spec(specs, active=active, modules_to_save=tuple(modules)), **apply_kwargs)
    for ours, fill in fills:
        fill(adapted, ours, strict)
    for head in heads:
        head.fill(adapted, strict)
    return adapted


def import_adapterhub_fusion(model: nn.Module, fusion_directory: str | os.PathLike, adapter_directories,
                             name: str | None = None, strict: bool = True, **apply_kwargs) -> AdaptedModel:
    """Apply AdapterHub adapters (``save_adapter`` directories) and their AdapterFusion (a
    ``save_adapter_fusion`` directory) to ``model``: the adapters keep their saved names, the
    fusion is active as ``Fuse(...)`` with its saved options, all weights loaded."""
    from .checkpoints.adapterhub import read_adapterhub_adapter, read_adapterhub_fusion
    from .methods import get_method

    block, fill_fusion = read_adapterhub_fusion(fusion_directory, name)
    specs, fills = {}, []
    for d in adapter_directories:
        spec, saved, fill = read_adapterhub_adapter(d)
        specs[saved] = spec
        fills.append((saved, fill))
    missing = [n for n in block.names() if n not in specs]
    if missing:
        raise CheckpointError(f"the fusion {fusion_directory} fuses {list(block.names())}, but no adapter directory "
                              f"holds {missing}")
    adapted = apply(model, Spec(specs, active=block), **apply_kwargs)
    for saved, fill in fills:
        fill(adapted, saved, strict)
    fill_fusion(adapted, get_method(specs[block.names()[-1]]), strict)
    return adapted


__all__ = ["apply", "from_pretrained", "import_adapterhub", "import_adapterhub_fusion", "import_peft", "inspect", "load", "merge", "plan"]
