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
from .passes import run_pass
from .passes.inference import lower_low_rank, remove_eval_dropout

__all__ = ["InferenceModule", "optimize_for_inference"]


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
