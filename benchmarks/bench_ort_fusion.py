"""Fusable exports: onnxruntime fused-op counts and CPU latency, graphadapt vs Optimum, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_ort_fusion.py [--model minilm|tiny-bert] [--batch 1 8] [--seq 128]
        [--runs 20] [--oracle-python /work/main/.venv-oracle/bin/python] [--no-llama]

Files compared (same architecture and geometry; weights differ, which does not change the work):
  * graphadapt: LoRA (r=8, non-zero B on q,v) merged export of the model, ``export_onnx(optimize="ort")``;
    for reference also today's default export, run through the same optimizer.
  * Optimum: ``optimum.exporters.onnx.main_export`` of the base model (task feature-extraction), made in
    the oracle environment (optimum-onnx 0.1.0 needs transformers < 4.58) by a subprocess.
Both files then go through the same ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
opt_level=L)`` for each L in --levels (0: python fusions only, as export_onnx(optimize="ort") writes;
2: Optimum's "O2" level), and both run in onnxruntime (CPU, one intra-op thread, default session
optimisations) on the same tokenizer-shaped inputs (input_ids, attention_mask, token_type_ids), timed
round-robin. Printed: fused ops per file, median ms, graphadapt ÷ Optimum. A tiny Llama (rotary, GQA)
export's fused-op counts are printed too (graphadapt only: Optimum's Llama export is a decoder with cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphadapt as ga  # noqa: E402
from graphadapt.exporters import export_onnx  # noqa: E402
from graphadapt.exporters.fusion import fused_op_counts  # noqa: E402
from graphadapt.zoo import load_model  # noqa: E402

OPTIMUM_SCRIPT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="feature-extraction", opset=17, no_post_process=False)
"""


def optimize(src: Path, dst: Path, level: int, heads: int, hidden: int) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=level)
    model.save_model_to_file(str(dst))
    return fused_op_counts(dst)


def timed_interleaved(fns: dict, runs: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(3):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--oracle-python", default="/work/main/.venv-oracle/bin/python")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = load_model(args.model).eval()
    cfg = base.config
    heads, hidden, layers = cfg.num_attention_heads, cfg.hidden_size, cfg.num_hidden_layers
    print(f"model {args.model}: {layers} layers, hidden {hidden}, {heads} heads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base.save_pretrained(tmp / "hf")
        t = time.perf_counter()
        done = subprocess.run([args.oracle_python, "-c", OPTIMUM_SCRIPT, str(tmp / "hf"), str(tmp / "optimum")],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"Optimum export failed:\n{done.stderr[-3000:]}")
        print(f"optimum export {time.perf_counter() - t:.1f} s (subprocess, {args.oracle_python})")

        adapted = ga.apply(base, ga.LoRA(r=8, alpha=16))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if n.startswith("adapters.") and p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        ours = export_onnx(adapted, tmp / "ga_ort.onnx", optimize="ort")
        print(f"graphadapt export (optimize='ort') {ours.seconds['total']:.1f} s, verified max abs diff "
              f"{max(ours.max_abs_diff.values()):.1e}; inputs {ours.input_names}")
        default = export_onnx(adapted, tmp / "ga_default.onnx", verify=False)

        files = {}
        for level in args.levels:
            files[f"graphadapt optimize='ort' +O(L={level})"] = (tmp / f"ga_L{level}.onnx", tmp / "ga_ort.onnx")
            files[f"optimum +O(L={level})"] = (tmp / f"opt_L{level}.onnx", tmp / "optimum" / "model.onnx")
        print("\nfused ops after optimize_model(model_type='bert', opt_level=L):")
        print(f"  graphadapt default export, L=0: {optimize(tmp / 'ga_default.onnx', tmp / 'd0.onnx', 0, heads, hidden)}")
        for name, (dst, src) in files.items():
            level = int(name.rsplit("=", 1)[1].rstrip(")"))
            print(f"  {name}: {optimize(src, dst, level, heads, hidden)}")

        sessions = {name: session(dst) for name, (dst, _) in files.items()}
        for name, s in sessions.items():
            assert {i.name for i in s.get_inputs()} == {"input_ids", "attention_mask", "token_type_ids"}, name
        rng = np.random.default_rng(0)
        for batch in args.batch:
            ids = rng.integers(0, cfg.vocab_size, (batch, args.seq))
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids)}
            outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
            ms = timed_interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, args.runs)
            print(f"\nbatch {batch} x seq {args.seq}, onnxruntime {sessions[next(iter(sessions))].get_providers()[0]}, "
                  f"1 thread, median of {args.runs}:")
            for level in args.levels:
                a, b = f"graphadapt optimize='ort' +O(L={level})", f"optimum +O(L={level})"
                print(f"  L={level}: graphadapt {ms[a]:.2f} ms, optimum {ms[b]:.2f} ms, "
                      f"graphadapt/optimum {ms[a] / ms[b]:.3f}  (outputs {outs[a].shape} / {outs[b].shape})")

        if not args.no_llama:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from helpers import tiny_llama

            for merge in (True, False):
                llama = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=4))
                rep = export_onnx(llama, tmp / "llama.onnx", optimize="ort", merge=merge)
                print(f"\ntiny Llama (2 layers, 4 heads over 2 kv heads, rotary), LoRA {'merged' if merge else 'unmerged'}"
                      f", optimize='ort': {rep.fused_ops}; max abs diff {max(rep.max_abs_diff.values()):.1e}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
