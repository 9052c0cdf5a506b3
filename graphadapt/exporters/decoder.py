"""Decoder ONNX with past key/values, checked by a greedy decode in onnxruntime.

``AdaptedModel (causal LM) → cached capture → model.onnx`` with Optimum's layout:

    inputs   input_ids [batch, sequence], attention_mask [batch, total_sequence],
             position_ids [batch, sequence],
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits [batch, sequence, vocab],
             present.{i}.key / .value [batch, kv_heads, past_sequence + sequence, head_dim]

One graph serves prefill (``past_sequence = 0``) and decode (``sequence = 1``).
An encoder-decoder LM (T5) is written as a directory with Optimum's file and tensor names:

    encoder_model.onnx            input_ids, attention_mask [batch, encoder_sequence] → last_hidden_state
    decoder_with_past_model.onnx  input_ids [batch, sequence], encoder_attention_mask,
                                  encoder_hidden_states [batch, encoder_sequence, d_model],
                                  past_key_values.{i}.decoder.key / .value → logits, present.{i}.decoder.key / .value

(no ``.encoder.`` past: the cross-attention keys/values are recomputed from
``encoder_hidden_states`` every step, so the past may be empty and one decoder graph serves every step).
:func:`verify_decoder_onnx` decodes ``max_new_tokens`` greedily in onnxruntime and in PyTorch
and requires identical tokens and per-step logits within the dtype's tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphadapt.errors import ExportError, GraphAdaptError, VerificationError
from graphadapt.exporters.dtype import DTYPE_NAMES, converted_copy, parse_dtype
from graphadapt.exporters.onnx import MERGED_KEY, ExportReport, export_onnx
from graphadapt.exporters.verify import (DEFAULT_TOLERANCES, JITTER_SEEDS, RoundingJitter, VerifyResult, combine_noise,
                                         compare, verification_providers,
                                         onnx_float_dtype)

__all__ = ["export_decoder_onnx", "verify_decoder_onnx", "default_prompt", "ENCODER_FILE", "DECODER_FILE"]

ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_with_past_model.onnx"
"""File names of an encoder-decoder export (Optimum's)."""

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def default_prompt(batch: int = 2, seq: int = 5, vocab: int = 100, seed: int = 0, side: str = "left"):
    """Seeded ``(input_ids, attention_mask)``: every other example padded by two positions on ``side``
    (left for decoder-only prompts, right for encoder inputs as transformers pads them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(vocab, 2), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1::2, : min(2, seq - 1)] = 0
    else:
        mask[1::2, max(1, seq - 2):] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _twins(model) -> list:
    """``[cached decoder]`` or ``[encoder, decoder step]`` of an adapted LM, synced with it."""
    from graphadapt.generation import generation_twins

    if not callable(getattr(model, "adapter_names", None)):
        raise ExportError(f"export_decoder_onnx takes a graphadapt AdaptedModel, got {type(model).__name__}; "
                          "build it with graphadapt.apply(model, spec, cache=True)")
    try:
        return generation_twins(model)
    except GraphAdaptError as e:
        raise ExportError(str(e)) from e


def _vocab(cached) -> int:
    return int(getattr(cached.config, "vocab_size", 100) or 100)


def seq2seq_io_names(num_layers: int) -> dict[str, str]:
    """Captured decoder-step input/output name → Optimum's seq2seq ONNX name."""
    names = {"decoder_input_ids": "input_ids", "attention_mask": "encoder_attention_mask"}
    for i in range(num_layers):
        for kv in ("key", "value"):
            names[f"past_key_values_{i}_{kv}"] = f"past_key_values.{i}.decoder.{kv}"
            names[f"present.{i}.{kv}"] = f"present.{i}.decoder.{kv}"
    return names


def _file_merged(path) -> bool:
    """Whether an exported file holds folded adapters (its ``graphadapt.merged`` metadata)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == MERGED_KEY and p.value == "true" for p in proto.metadata_props)


def _start_token(cached) -> int:
    cfg = cached.config
    start = getattr(cfg, "decoder_start_token_id", None)
    start = getattr(cfg, "pad_token_id", None) if start is None else start
    if start is None:
        raise ExportError("the config has no decoder_start_token_id (nor pad_token_id) to start decoding with")
    return int(start)


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
    An encoder-decoder LM (T5; a plain capture) is written to the *directory* ``path`` as
    ``encoder_model.onnx`` + ``decoder_with_past_model.onnx`` (module docstring); the returned report
    is the decoder's, with the encoder's in ``report.parts["encoder"]``.
    """
    twins = _twins(model)
    cached = twins[-1]
    layout = cached.decoder_cache
    from graphadapt.generation import onnx_io_names

    tdtype = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    if len(twins) == 2:
        return _export_seq2seq(twins, path, tdtype, merge, verify, max_new_tokens, input_ids, attention_mask,
                               providers, atol, rtol, opset, external_data)
    if input_ids is None:
        input_ids, attention_mask = default_prompt(vocab=_vocab(cached))
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


def _export_seq2seq(twins, path, tdtype, merge, verify, max_new_tokens, input_ids, attention_mask, providers,
                    atol, rtol, opset, external_data) -> ExportReport:
    """Encoder and decoder-with-past graphs into the directory ``path``; the decoder report holds the
    encoder's as ``parts["encoder"]``. Both files appear only after the greedy decode verified."""
    enc, step = twins
    layout = step.decoder_cache
    path = Path(path)
    if path.suffix == ".onnx" or path.is_file():
        raise ExportError(f"an encoder-decoder model exports two graphs ({ENCODER_FILE}, {DECODER_FILE}): "
                          f"give a directory, not {path}")
    if not path.parent.is_dir():
        raise ExportError(f"directory {path.parent} does not exist; create it before exporting to {path.name}")
    if input_ids is None:
        input_ids, attention_mask = default_prompt(vocab=_vocab(step), side="right")
    from graphadapt.writes import claim_export  # the encoder is moved into place over any earlier file

    claim_export(path / ENCODER_FILE, False, ExportError)
    created = not path.exists()
    path.mkdir(exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".encoder.tmp-", dir=path))
    ok = False
    try:
        enc_tmp = tmpdir / ENCODER_FILE
        enc_report = export_onnx(enc, enc_tmp, dtype=tdtype, merge=merge, opset=opset, verify=verify,
                                 providers=providers, atol=atol, rtol=rtol, external_data=external_data)
        ref_enc = converted_copy(enc, tdtype, enc.example_inputs(), merge=merge) if verify else None

        def check(tmp, export_model):
            return _verify_seq2seq(enc_tmp, tmp, (ref_enc, export_model), input_ids, attention_mask,
                                   max_new_tokens, tdtype, providers, atol, rtol)

        report = export_onnx(step, path / DECODER_FILE, dtype=tdtype, merge=merge, opset=opset, verify=verify,
                             providers=providers, atol=atol, rtol=rtol, external_data=external_data,
                             io_names=seq2seq_io_names(layout["num_layers"]), verify_fn=check)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, path / f.name)
        ok = True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if created and not ok:  # a failed export leaves no empty directory behind
            shutil.rmtree(path, ignore_errors=True)
    enc_report.path = path / ENCODER_FILE
    report.parts["encoder"] = enc_report
    report.metadata.setdefault("graphadapt.decoder_cache", json.dumps(layout, sort_keys=True))
    return report


def ort_session(path, providers):
    from graphadapt.exporters.verify import import_ort

    ort = import_ort()
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


def ort_greedy_seq2seq(encoder, decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       max_new_tokens: int, layout: dict[str, Any], start: int,
                       float_dtype=np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decode with an encoder and a decoder-with-past session; (ids [B, 1 + n], per-step logits)."""
    ids = input_ids.numpy().astype(np.int64)
    mask = attention_mask.numpy().astype(np.int64)
    b = ids.shape[0]
    hidden = encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    names = [o.name for o in decoder.get_outputs()]
    feeds = {f"past_key_values.{i}.decoder.{kv}": np.zeros((b, layout["kv_heads"], 0, layout["head_dim"]), float_dtype)
             for i in range(layout["num_layers"]) for kv in ("key", "value")}
    out_ids = np.full((b, 1), start, np.int64)
    step, scores = out_ids, []
    for _ in range(max_new_tokens):
        outs = dict(zip(names, decoder.run(None, {"input_ids": step, "encoder_attention_mask": mask,
                                                  "encoder_hidden_states": hidden, **feeds})))
        logits = outs["logits"][:, -1, :].astype(np.float32)
        scores.append(logits)
        step = logits.argmax(-1).astype(np.int64)[:, None]
        out_ids = np.concatenate([out_ids, step], 1)
        feeds = {f"past_key_values.{i}.decoder.{kv}": outs[f"present.{i}.decoder.{kv}"]
                 for i in range(layout["num_layers"]) for kv in ("key", "value")}
    return out_ids, scores


def _decode_noise(decode, want_ids, want_scores, prompt_len) -> list[torch.Tensor | None]:
    """Per step, the spread of the reference's logits when ``decode()`` (the same greedy decode)
    runs under rounding jitter (:class:`~graphadapt.exporters.verify.RoundingJitter`). Logits of a
    step are comparable while the jittered decode chose the same tokens before it; later steps
    take the largest floor seen on comparable steps."""
    runs = []
    for seed in JITTER_SEEDS:
        try:
            with RoundingJitter(seed):
                ids, scores = decode()
        except Exception:  # noqa: BLE001 - an op the dispatch mode cannot serve: no floor
            return [None] * len(want_scores)
        same = (ids[:, prompt_len:] == want_ids[:, prompt_len:]).all(0).tolist() if ids.shape == want_ids.shape else []
        run = []
        for step, (got, want) in enumerate(zip(scores, want_scores)):
            comparable = all(same[:step])
            run.append(got.to(want.dtype) - want if comparable and got.shape == want.shape else None)
        floor = max((float(n.abs().max()) for n in run if n is not None and n.numel()), default=0.0)
        runs.append([n if n is not None else torch.full_like(want, floor) for n, want in zip(run, want_scores)])
    return combine_noise(runs)


def _compare_decodes(got_ids, got_scores, want_ids, want_scores, prompt_len, atol, rtol, context, noise=None):
    want_np = want_ids.cpu().numpy()
    if got_ids.shape != want_np.shape or not (got_ids == want_np).all():
        t0 = prompt_len
        diff = np.argwhere(got_ids[:, t0:] != want_np[:, t0:])
        b, s = (int(diff[0][0]), int(diff[0][1])) if len(diff) else (0, 0)
        top2 = torch.topk(want_scores[s, b], 2).values
        raise VerificationError(
            f"ONNX greedy tokens differ from PyTorch{context}: first at new token {s} of sequence {b} "
            f"(onnx {int(got_ids[b, t0 + s])} vs torch {int(want_np[b, t0 + s])}; torch's top-2 logit margin there "
            f"{float(top2[0] - top2[1]):.3g})")
    names = [f"logits[step {i}]" for i in range(len(got_scores))]
    return compare(names, list(want_scores), got_scores, atol, rtol, context, noise=noise)


def _result(max_abs, max_rel, atol, rtol, used, input_ids, max_new_tokens, tdtype, start, noise=None) -> VerifyResult:
    worst = max(max_abs, key=max_abs.get) if max_abs else None
    floor = max((float(n.abs().max()) for n in noise or [] if n is not None and n.numel()), default=None)
    return VerifyResult(
        noise_floor={} if floor is None else {"logits": floor},
        max_abs_diff={"logits": max_abs[worst]} if worst else {},
        max_rel_diff={"logits": max(max_rel.values())} if max_rel else {},
        atol=atol, rtol=rtol, providers=used,
        input_shapes={"input_ids": tuple(input_ids.shape), "new_tokens": (max_new_tokens,)},
        reference_dtype=DTYPE_NAMES.get(tdtype, str(tdtype)), seconds=time.perf_counter() - start)


def _verify_seq2seq(enc_path, dec_path, reference, input_ids, attention_mask, max_new_tokens, tdtype, providers,
                    atol, rtol) -> VerifyResult:
    from graphadapt.generation import generate

    start = time.perf_counter()
    d_atol, d_rtol = DEFAULT_TOLERANCES[tdtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    layout = reference[1].decoder_cache
    first = _start_token(reference[1])
    want_ids, want_scores = generate(tuple(reference), input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                     output_scores=True, eos_token_id=[], decoder_start_token_id=first)
    encoder, decoder = ort_session(enc_path, providers), ort_session(dec_path, providers)
    got_ids, got_scores = ort_greedy_seq2seq(encoder, decoder, input_ids.cpu(), attention_mask.cpu(), max_new_tokens,
                                             layout, first, _NP_DTYPES.get(tdtype, np.float32))
    used = decoder.get_providers()
    context = f" (encoder-decoder, batch {input_ids.shape[0]}, input {input_ids.shape[1]}, {max_new_tokens} new " \
              f"tokens, {used[0]})"
    noise = None
    if tdtype == torch.float32:
        noise = _decode_noise(lambda: generate(tuple(reference), input_ids, attention_mask,
                                               max_new_tokens=max_new_tokens, output_scores=True, eos_token_id=[],
                                               decoder_start_token_id=first), want_ids, want_scores, 1)
    max_abs, max_rel = _compare_decodes(got_ids, got_scores, want_ids, want_scores, 1, atol, rtol, context, noise)
    return _result(max_abs, max_rel, atol, rtol, used, input_ids, max_new_tokens, tdtype, start, noise)


def verify_decoder_onnx(path: str | Path, model, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 32,
                        dtype: str | torch.dtype | None = None, providers: list[str] | None = None,
                        atol: float | None = None, rtol: float | None = None, reference=None) -> VerifyResult:
    """Greedy-decode ``max_new_tokens`` in onnxruntime and in PyTorch; tokens must be equal, logits close.

    The PyTorch reference is ``model`` (its cached capture) converted to the file's dtype and,
    when the file holds merged adapters, merged the same way; ``reference`` skips that conversion. ``max_abs_diff`` holds the worst logits difference.
    For an encoder-decoder model ``path`` is the export directory (both graphs run in
    onnxruntime) and ``input_ids``/``attention_mask`` are the encoder input (default right-padded).
    """
    from graphadapt.generation import generate

    start = time.perf_counter()
    path = Path(path)
    twins = _twins(model)
    cached = twins[-1]
    layout = cached.decoder_cache
    if len(twins) == 2:  # encoder-decoder: a directory with both graphs
        enc_path, dec_path = path / ENCODER_FILE, path / DECODER_FILE
        missing = [p for p in (enc_path, dec_path) if not p.is_file()]
        if missing:
            raise ExportError(f"no ONNX file at {missing[0]} (an encoder-decoder export is a directory with "
                              f"{ENCODER_FILE} and {DECODER_FILE})")
        tdtype = parse_dtype(dtype) if dtype is not None else onnx_float_dtype(dec_path)
        if input_ids is None:
            input_ids, attention_mask = default_prompt(vocab=_vocab(cached), side="right")
        merged = _file_merged(dec_path)  # fold like the file did, so rounding matches
        ref = reference if reference is not None else tuple(
            converted_copy(t, tdtype, t.example_inputs(), merge=merged) for t in twins)
        return _verify_seq2seq(enc_path, dec_path, ref, input_ids, attention_mask, max_new_tokens, tdtype,
                               providers, atol, rtol)
    if not path.is_file():
        raise ExportError(f"no ONNX file at {path}")
    tdtype = parse_dtype(dtype) if dtype is not None else onnx_float_dtype(path)
    d_atol, d_rtol = DEFAULT_TOLERANCES[tdtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if input_ids is None:
        input_ids, attention_mask = default_prompt(vocab=_vocab(cached))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ref = reference if reference is not None else converted_copy(cached, tdtype, cached.example_inputs(),
                                                                 merge=_file_merged(path))
    # eos_token_id=[]: the reference decodes exactly max_new_tokens, as the onnxruntime loop does
    want_ids, want_scores = generate(ref, input_ids, attention_mask, max_new_tokens=max_new_tokens, output_scores=True,
                                     eos_token_id=[])
    session = ort_session(path, providers)
    got_ids, got_scores = ort_greedy(session, input_ids.cpu(), attention_mask.cpu(), max_new_tokens, layout,
                                     _NP_DTYPES.get(tdtype, np.float32))
    used = session.get_providers()
    context = f" (batch {input_ids.shape[0]}, prompt {input_ids.shape[1]}, {max_new_tokens} new tokens, {used[0]})"
    noise = None
    if tdtype == torch.float32:
        noise = _decode_noise(lambda: generate(ref, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                               output_scores=True, eos_token_id=[]),
                              want_ids, want_scores, input_ids.shape[1])
    max_abs, max_rel = _compare_decodes(got_ids, got_scores, want_ids, want_scores, input_ids.shape[1], atol, rtol,
                                        context, noise)
    return _result(max_abs, max_rel, atol, rtol, used, input_ids, max_new_tokens, tdtype, start, noise)
