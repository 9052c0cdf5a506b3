"""Merge time alone, side by side: PEFT ``merge_and_unload`` vs graphadapt ``merge()`` and ``merge(in_place=True)``.

    python benchmarks/bench_merge.py [--layers 32] [--rounds 3]

Same geometry as ``bench_scale.py`` (Llama hidden 2048, GQA 32/8, FFN 5632, fp32, LoRA r=8 on all
linears, non-zero B, same A/B in PEFT); one process holds only the base model, the adapted model and,
during its step, PEFT's copy. Each round: PEFT, then ``merge()`` + ``unmerge()``, then
``merge(in_place=True)`` + ``unmerge()``. Prints the times and the median per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch
    from bench_scale import build, peft_copy, randomize_b

    import graphadapt as ga
    from graphadapt.exporters._memory import release_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    base = build(args.layers)
    adapted = ga.apply(base, ga.LoRA(r=8, alpha=16, targets=("all-linear",))).eval()
    randomize_b(adapted)
    times: dict[str, list[float]] = {"peft": [], "merge": [], "merge_in_place": []}
    for _ in range(args.rounds):
        pm = peft_copy(base, adapted)
        release_memory()
        t = time.perf_counter()
        pm.merge_and_unload()
        times["peft"].append(time.perf_counter() - t)
        del pm
        release_memory()
        for key, kw in (("merge", {}), ("merge_in_place", {"in_place": True})):
            t = time.perf_counter()
            adapted.merge(**kw)
            times[key].append(time.perf_counter() - t)
            adapted.unmerge()
            release_memory()
    print(f"{args.layers} layers, {args.rounds} rounds, seconds: " +
          "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in times.items()))
    for key in ("merge", "merge_in_place"):
        ratio = statistics.median(a / b for a, b in zip(times[key], times["peft"]))
        print(f"{key} ÷ PEFT merge_and_unload: {ratio:.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
