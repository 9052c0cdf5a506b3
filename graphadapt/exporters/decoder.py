"""Decoder ONNX with past key/values, checked by a greedy decode in onnxruntime.

``AdaptedModel (causal LM) → cached capture → model.onnx`` with Optimum's layout:

    inputs   input_ids [batch, sequence], attention_mask [batch, total_sequence],
             position_ids [batch, sequence],
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits [batch, sequence, vocab],
             present.{i}.key / .value [batch, kv_heads, past_sequence + sequence, head_dim]

One graph serves prefill (``past_sequence = 0``) and decode (``sequence = 1``).
:func:`verify_decoder_onnx` decodes ``max_new_tokens`` greedily in onnxruntime and in PyTorch
and requires identical tokens and per-step logits within the dtype's tolerance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphadapt.errors import ExportError, GraphAdaptError, VerificationError
from graphadapt.exporters.dtype import DTYPE_NAMES, converted_copy, parse_dtype
from graphadapt.exporters.onnx import ExportReport, export_onnx
from graphadapt.exporters.verify import (DEFAULT_TOLERANCES, VerifyResult, compare, verification_providers,
                                         onnx_float_dtype)

__all__ = ["export_decoder_onnx", "verify_decoder_onnx", "default_prompt"]

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def default_prompt(batch: int = 2, seq: int = 5, vocab: int = 100, seed: int = 0):
    """Seeded ``(input_ids, attention_mask)``: every other example left-padded by two positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(vocab, 2), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : min(2, seq - 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _cached(model):
    from graphadapt.generation import cached_twin

    if not callable(getattr(model, "adapter_names", None)):
        raise ExportError(f"export_decoder_onnx takes a graphadapt AdaptedModel, got {type(model).__name__}; "
                          "build it with graphadapt.apply(model, spec, cache=True)")
    try:
        return cached_twin(model)
    except GraphAdaptError as e:
        raise ExportError(str(e)) from e


def export_decoder_onnx(model, path: str | Path, dtype: str | torch.dtype = "fp32", merge: bool = True,
                        verify: bool = True, max_new_tokens: int = 32, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, providers: list[str] | None = None,
                        atol: float | None = None, rtol: float | None = None, opset: int | None = None,
                        external_data: bool | None = None) -> ExportReport:
    """Export an adapted causal LM as a KV-cache decoder and (by default) verify a greedy decode.

    ``model``: an :class:`~graphadapt.AdaptedModel` captured with ``cache=True``, or a plain one (its
    cached twin is exported). ``merge`` folds mergeable adapters for the export (restored
    afterwards). Verification decodes ``max_new_tokens`` after ``input_ids``/``attention_mask``
    (default :func:`default_prompt`) and raises :class:`VerificationError` when a token differs or
    logits differ beyond ``atol``/``rtol``; nothing is written then.
    """
    cached = _cached(model)
    layout = cached.decoder_cache
    from graphadapt.generation import onnx_io_names

    tdtype = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    if input_ids is None:
        input_ids, attention_mask = default_prompt(vocab=int(getattr(cached.config, "vocab_size", 100) or 100))
    verify_info: dict[str, Any] = {}

    def check(tmp, export_model):
        res = verify_decoder_onnx(tmp, cached, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                  dtype=tdtype, providers=providers, atol=atol, rtol=rtol, reference=export_model)
        verify_info["tokens"] = res
        return res

    report = export_onnx(cached, path, dtype=tdtype, merge=merge, opset=opset, verify=verify, providers=providers,
                         atol=atol, rtol=rtol, external_data=external_data,
                         io_names=onnx_io_names(layout["num_layers"]), verify_fn=check)
    report.metadata.setdefault("graphadapt.decoder_cache", json.dumps(layout, sort_keys=True))
    return report


def _ort_session(path, providers):
    from graphadapt.exporters.verify import _import_ort

    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=verification_providers(providers))


def ort_greedy(session, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
               layout: dict[str, Any], float_dtype=np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decode with an ONNX decoder session; returns (ids [B, T + n], per-step last logits)."""
    ids = input_ids.numpy().astype(np.int64)
    mask = attention_mask.numpy().astype(np.int64)
    b = ids.shape[0]
    pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1).astype(np.int64)
    names = [o.name for o in session.get_outputs()]
    feeds: dict[str, np.ndarray] = {}
    for i in range(layout["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((b, layout["kv_heads"], 0, layout["head_dim"]), float_dtype)
    out_ids, step, scores = ids, ids, []
    for _ in range(max_new_tokens):
        outs = dict(zip(names, session.run(None, {"input_ids": step, "attention_mask": mask, "position_ids": pos,
                                                  **feeds})))
        logits = outs["logits"][:, -1, :].astype(np.float32)
        scores.append(logits)
        nxt = logits.argmax(-1).astype(np.int64)[:, None]
        out_ids = np.concatenate([out_ids, nxt], 1)
        for i in range(layout["num_layers"]):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        step = nxt
    return out_ids, scores


def verify_decoder_onnx(path: str | Path, model, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 32,
                        dtype: str | torch.dtype | None = None, providers: list[str] | None = None,
                        atol: float | None = None, rtol: float | None = None, reference=None) -> VerifyResult:
    """Greedy-decode ``max_new_tokens`` in onnxruntime and in PyTorch; tokens must be equal, logits close.

    The PyTorch reference is ``model`` (its cached capture) converted to the file's dtype;
    ``reference`` skips that conversion. ``max_abs_diff`` holds the worst logits difference.
    """
    from graphadapt.generation import generate

    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no ONNX file at {path}")
    cached = _cached(model)
    layout = cached.decoder_cache
    tdtype = parse_dtype(dtype) if dtype is not None else onnx_float_dtype(path)
    d_atol, d_rtol = DEFAULT_TOLERANCES[tdtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if input_ids is None:
        input_ids, attention_mask = default_prompt(vocab=int(getattr(cached.config, "vocab_size", 100) or 100))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ref = reference if reference is not None else converted_copy(cached, tdtype, cached.example_inputs())
    want_ids, want_scores = generate(ref, input_ids, attention_mask, max_new_tokens=max_new_tokens, output_scores=True)
    session = _ort_session(path, providers)
    got_ids, got_scores = ort_greedy(session, input_ids.cpu(), attention_mask.cpu(), max_new_tokens, layout,
                                     _NP_DTYPES.get(tdtype, np.float32))
    used = session.get_providers()
    context = f" (batch {input_ids.shape[0]}, prompt {input_ids.shape[1]}, {max_new_tokens} new tokens, {used[0]})"
    want_np = want_ids.cpu().numpy()
    if got_ids.shape != want_np.shape or not (got_ids == want_np).all():
        t0 = input_ids.shape[1]
        diff = np.argwhere(got_ids[:, t0:] != want_np[:, t0:])
        b, s = (int(diff[0][0]), int(diff[0][1])) if len(diff) else (0, 0)
        top2 = torch.topk(want_scores[s, b], 2).values
        raise VerificationError(
            f"ONNX greedy tokens differ from PyTorch{context}: first at new token {s} of sequence {b} "
            f"(onnx {int(got_ids[b, t0 + s])} vs torch {int(want_np[b, t0 + s])}; torch's top-2 logit margin there "
            f"{float(top2[0] - top2[1]):.3g})")
    names = [f"logits[step {i}]" for i in range(len(got_scores))]
    max_abs, max_rel = compare(names, list(want_scores), got_scores, atol, rtol, context)
    worst = max(max_abs, key=max_abs.get) if max_abs else None
    return VerifyResult(
        max_abs_diff={"logits": max_abs[worst]} if worst else {},
        max_rel_diff={"logits": max(max_rel.values())} if max_rel else {},
        atol=atol, rtol=rtol, providers=used,
        input_shapes={"input_ids": tuple(input_ids.shape), "new_tokens": (max_new_tokens,)},
        reference_dtype=DTYPE_NAMES.get(tdtype, str(tdtype)), seconds=time.perf_counter() - start)
