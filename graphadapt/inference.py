"""An inference copy of a captured (adapted) model, its graph run through the inference passes.

Transform::

    before:  model (trainable graph: dropout nodes, adapter module calls)
    after:   InferenceModule sharing model's base weights, eval only, graph after
             remove_eval_dropout → lower_low_rank (graphadapt/passes/inference.py)

The copy shares every base parameter and every adapter module it still calls with ``model`` (no weight is
copied, except the low-rank factors the lowering pass snapshots: ``cat[A]`` and ``s·B``). It is a snapshot of
the adapter weights: after training further, or loading other adapters, build it again. It refuses ``train()``.
"""

from __future__ import annotations

from .capture import CapturedModule, _check_inputs_hook
from .errors import GraphAdaptError
from .hollow import refuse as refuse_hollow
from .passes import run_pass
from .passes.inference import lower_low_rank, remove_eval_dropout

__all__ = ["InferenceModule", "PipelineInterface", "generate_options", "optimize_for_inference"]


class InferenceModule(CapturedModule):
    """A captured graph optimised for inference (see :func:`optimize_for_inference`); eval mode only."""

    def train(self, mode: bool = True):
        if mode:
            raise GraphAdaptError("an inference copy (graphadapt.optimize_for_inference) has no dropout or "
                                  "trainable adapter calls left: train the adapted model it was made from")
        return super().train(False)


def optimize_for_inference(model, *, dropout: bool = True, low_rank: bool = True,
                           concat: bool = True, concat_up: bool = True) -> InferenceModule:
    """An eval-only copy of ``model`` (an adapted or captured model) with the inference passes applied.

    ``dropout``: remove the (identity) dropout nodes; ``low_rank``: replace low-rank adapter calls by explicit
    GEMMs with the scaling folded into B; ``concat``: one down-projection GEMM for the sites sharing an input, and
    with ``concat_up`` one up-projection GEMM for them too (block-diagonal ``s·B``).
    ``info`` on the result says what each pass did. Call it with the same inputs as ``model``."""
    if not isinstance(model, CapturedModule):
        raise GraphAdaptError(f"optimize_for_inference takes a graphadapt model, got {type(model).__name__}")
    refuse_hollow(model, "optimize_for_inference()")  # its copy's forward would compute with unread weights
    if model.training:
        raise GraphAdaptError("optimize_for_inference needs the model in eval mode (model.eval()): the inference "
                              "passes drop dropout and fold eval-mode adapter math")
    graph = model.snapshot_graph() if hasattr(model, "snapshot_graph") else _copy_graph(model.graph)
    inf = InferenceModule(model, graph)
    for a in CapturedModule._graphadapt_attrs + ("_in_spec", "_out_spec", "_call_signature", "_positional_names"):
        if a in model.__dict__:
            inf.__dict__[a] = model.__dict__[a]
    inf.training = False
    info = {}
    if dropout:
        info["remove_eval_dropout"] = run_pass("remove_eval_dropout", remove_eval_dropout, inf).info
    if low_rank:
        info["lower_low_rank"] = run_pass("lower_low_rank", lower_low_rank, inf, concat=concat,
                                             concat_up=concat_up).info
    inf.delete_all_unused_submodules()
    inf.recompile()
    inf.info = info
    inf.register_forward_pre_hook(_check_inputs_hook, with_kwargs=True)
    return inf


def _copy_graph(graph):
    import copy

    return copy.deepcopy(graph)


# --------------------------------------------------------------------------- transformers pipelines
class PipelineInterface:
    """What ``transformers.pipeline(task, model=adapted, tokenizer=tok)`` reads from a model besides calling it:
    ``device``, ``dtype``, ``can_generate()``, ``generation_config`` (the source model's), the modalities. The
    pipeline then calls the model (classification, token classification, question answering, ...) or its
    ``generate`` (text generation, which hands a ``generation_config`` and generation keywords: see
    :func:`generate_options`)."""

    input_modalities = ("text",)
    output_modalities = ("text",)

    @property
    def main_input_name(self) -> str:
        """The source model's ``main_input_name`` (``input_ids``, ``pixel_values``, ...)."""
        src = self.__dict__.get("_source_model")
        names = self.__dict__.get("input_names") or ["input_ids"]
        return getattr(src, "main_input_name", None) or names[0]

    @property
    def device(self):
        """The device of the model's weights (``torch.device``)."""
        t = next(self.parameters(), None)
        t = next(self.buffers(), None) if t is None else t
        return t.device if t is not None else self.__dict__.get("_compute_device")

    @property
    def dtype(self):
        """The dtype of the model's floating-point base weights."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return self.__dict__.get("_compute_dtype")

    def can_generate(self) -> bool:
        """Whether ``generate`` serves this model (a causal or encoder-decoder LM), as transformers asks."""
        if self.__dict__.get("decoder_cache"):
            return True
        src = self.__dict__.get("_source_model")
        return bool(getattr(src, "can_generate", lambda: False)())

    @property
    def generation_config(self):
        """The source model's ``GenerationConfig`` (built from its config when it has none)."""
        own = self.__dict__.get("_generation_config")
        if own is not None:
            return own
        src = self.__dict__.get("_source_model")
        gen = getattr(src, "generation_config", None)
        if gen is None and getattr(self, "config", None) is not None:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = gen
        return gen

    @generation_config.setter
    def generation_config(self, value):
        self.__dict__["_generation_config"] = value


# generate() keywords graphadapt.generation.generate implements (the rest of a GenerationConfig must be unset)
_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                  "decoder_start_token_id", "num_beams", "num_return_sequences", "length_penalty", "early_stopping",
                  "generator", "seed", "output_scores", "adapter_ids", "task_ids", "cache_implementation")
# set in generation configs (or by pipelines) without changing what the decoding computes
_IGNORED = {"transformers_version", "bos_token_id", "use_cache", "_from_model_config",
            "cache_config", "compile_config", "disable_compile", "low_memory", "prefill_chunk_size"}
# options whose value here means "off"
_NEUTRAL = {"return_dict_in_generate": False, "output_logits": False, "output_attentions": False,
            "output_hidden_states": False, "repetition_penalty": 1.0, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "typical_p": 1.0, "min_length": 0, "min_new_tokens": 0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "renormalize_logits": False,
            "remove_invalid_values": False}


def generate_options(input_ids, kwargs: dict) -> dict:
    """transformers-style ``generate`` keywords → :func:`graphadapt.generation.generate` keywords.

    A ``generation_config`` (what pipelines pass) contributes the fields it sets, under the explicit keywords;
    ``max_length`` becomes ``max_new_tokens`` (minus the prompt length). A set option graphadapt's decoding does
    not implement (``repetition_penalty=1.2``, ``stop_strings``, ...) raises :class:`GraphAdaptError` naming it,
    rather than decoding something else than asked."""
    config = kwargs.get("generation_config")
    if config is None and set(kwargs) <= set(_GENERATE_KEYS):
        return dict(kwargs)
    merged = dict(config.to_diff_dict()) if config is not None else {}
    merged.update((k, v) for k, v in kwargs.items() if k != "generation_config")
    opts: dict = {}
    refused = []
    for key, value in merged.items():
        if value is None or key in _IGNORED:
            continue
        if key == "cache_implementation" and key not in kwargs:
            continue   # a model's generation_config (Gemma's "hybrid"): decoding's own cache choice stands
        if key in _GENERATE_KEYS:
            opts[key] = value
        elif key == "max_length":
            if merged.get("max_new_tokens") is None:
                opts["max_new_tokens"] = max(int(value) - int(input_ids.shape[-1]), 0)
        elif key not in _NEUTRAL or _NEUTRAL[key] != value:
            refused.append(f"{key}={value!r}")
    if refused:
        raise GraphAdaptError(
            f"graphadapt's generate does not implement {', '.join(sorted(refused))}; it decodes greedily, by "
            "sampling (temperature, top_k, top_p) or by beam search (num_beams, length_penalty, early_stopping). "
            "Leave these unset, or run the merged model (adapted.to_base_model()) with transformers' generate")
    return opts
