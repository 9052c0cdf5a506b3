"""Latency of exported models, measured side by side in one run (ratios, not absolutes).

    python benchmarks/bench_export.py [--model minilm|tiny-bert|DIR] [--batch 8] [--seq 128] [--runs 30]

Reports, on the same inputs:
  * onnxruntime: merged-LoRA export ÷ base-model export (merging should cost nothing),
    unmerged-LoRA export ÷ base export (what merging saves);
  * merged export in onnxruntime ÷ PyTorch eager of the base model;
  * PyTorch eager: graphadapt unmerged LoRA ÷ PEFT unmerged LoRA (same weights), when peft is installed.
Median of --runs after warm-up, with the interquartile range. Node counts of each export too.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphadapt as ga  # noqa: E402
from graphadapt.exporters import export_onnx  # noqa: E402
from graphadapt.zoo import default_model, load_model  # noqa: E402


def timed_interleaved(fns: dict, runs: int) -> dict[str, tuple[float, float]]:
    """Median and IQR (ms) per callable, timing them round-robin so drift hits all equally."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    ts = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t) * 1e3)
    out = {}
    for k, v in ts.items():
        q = statistics.quantiles(v, n=4)
        out[k] = (statistics.median(v), q[2] - q[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    name, model = (args.model, load_model(args.model)) if args.model else default_model()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g),
         "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}

    spec = ga.LoRA(r=16, alpha=32, targets=("q", "k", "v", "o"))
    adapted = ga.apply(model, spec)
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02, generator=g)

    tmp = Path(tempfile.mkdtemp(prefix="ga-bench-"))
    base_gm = ga.capture(model)
    reports = {
        "base": export_onnx(base_gm, tmp / "base.onnx", verify=True),
        "unmerged": export_onnx(adapted, tmp / "unmerged.onnx", merge=False, verify=True),
        "merged": export_onnx(adapted, tmp / "merged.onnx", merge=True, verify=True),
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = {k: ort.InferenceSession(str(r.path), so, providers=["CPUExecutionProvider"])
                for k, r in reports.items()}
    feeds = {k: {i.name: x[i.name].numpy() for i in s.get_inputs()} for k, s in sessions.items()}

    fns = {f"ort {k}": (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    fns["eager base"] = lambda: model(**x)
    fns["eager graphadapt unmerged"] = lambda: adapted(**x)
    try:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "attention.output.dense"])
        peft_model = get_peft_model(copy.deepcopy(model), cfg).eval()
        fns["eager peft unmerged"] = lambda: peft_model(**x)
    except Exception as e:  # noqa: BLE001 - the peer is optional
        print(f"(PEFT comparison skipped: {type(e).__name__}: {e})")
    with torch.inference_mode():
        res = timed_interleaved(fns, args.runs)

    print(f"model {name}, batch {args.batch} x seq {args.seq}, {args.threads} thread(s), median of {args.runs} (IQR)")
    for k, (med, iqr) in res.items():
        print(f"  {k:28s} {med:9.2f} ms  (IQR {iqr:.2f})")
    print("node counts: " + ", ".join(f"{k} {r.node_count}" for k, r in reports.items()))
    r = {k: v[0] for k, v in res.items()}
    print("ratios:")
    print(f"  ort merged / ort base          {r['ort merged'] / r['ort base']:.3f}")
    print(f"  ort unmerged / ort base        {r['ort unmerged'] / r['ort base']:.3f}")
    print(f"  ort merged / eager base        {r['ort merged'] / r['eager base']:.3f}")
    print(f"  eager graphadapt / eager base  {r['eager graphadapt unmerged'] / r['eager base']:.3f}")
    if "eager peft unmerged" in r:
        print(f"  eager graphadapt / eager peft  {r['eager graphadapt unmerged'] / r['eager peft unmerged']:.3f}")


if __name__ == "__main__":
    main()
