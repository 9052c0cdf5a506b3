"""Compiled and optimised paths of an adapted encoder, side by side in one run (ratios, not absolutes).

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--hidden 64] [--layers 12] [--batch 1] [--seq 8]
        [--runs 200] [--backend inductor] [--clock wall|cpu]

A narrow deep BERT (per-op overhead dominates, as on a GPU), seeded; LoRA r=8 (``--targets``, default q,v) and SeqBn
(reduction 16), non-zero weights. Rows: eager and ``torch.compile`` of the Hugging Face model, of the captured
base (``graphadapt.capture``), of the adapted models (``adapted.compile()``), of the merged LoRA model and of
the inference copy (``graphadapt.optimize_for_inference``: dropout removed, scaling folded into B, one
down-projection GEMM per shared input). Every row is timed round-robin in the same rounds; median per call and
ratio to the compiled captured base. Each compiled row is checked against its eager twin first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphadapt as ga  # noqa: E402

CLOCK = time.perf_counter


def build(hidden: int, layers: int):
    import transformers as T

    cfg = T.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=hidden * 4, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.BertModel(cfg).eval()


def randomize(adapted, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (each row runs --runs // rounds calls)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--targets", default="q,v", help="LoRA targets (comma-separated roles)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    model = build(args.hidden, args.layers)
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, 1000, (args.batch, args.seq), generator=g),
         "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    base = ga.capture(model)
    targets = tuple(args.targets.split(","))
    lora = ga.apply(model, ga.LoRA(r=8, targets=targets))
    seqbn = ga.apply(model, ga.SeqBn(reduction_factor=16))
    merged = ga.apply(model, ga.LoRA(r=8, targets=targets))
    for m in (lora, seqbn, merged):
        randomize(m)
    merged.merge()
    inf = ga.optimize_for_inference(lora)
    print(f"BERT hidden {args.hidden}, {args.layers} layers, batch {args.batch} × seq {args.seq}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), backend {args.backend}; LoRA on {targets}; "
          f"inference passes: "
          f"{inf.info}")
    eager = {"hf": model, "base": base, "lora": lora, "lora_merged": merged, "lora_inference": inf, "seqbn": seqbn}
    import copy

    compiled = {"hf": torch.compile(copy.deepcopy(model), backend=args.backend, fullgraph=True)}
    for k in ("base", "lora", "lora_merged", "lora_inference", "seqbn"):
        c = copy.deepcopy(eager[k]) if k != "lora_inference" else ga.optimize_for_inference(lora)
        compiled[k] = c.compile(backend=args.backend)
    rows = {}
    with torch.inference_mode():
        for k, m in eager.items():
            ref = m(**x).last_hidden_state
            t = CLOCK()
            out = compiled[k](**x).last_hidden_state
            diff = (out - ref).abs().max().item()
            print(f"  compiled {k}: first call {CLOCK() - t:.1f} s, max |compiled − eager| {diff:.1e}")
            rows[f"eager {k}"] = m
            rows[f"compiled {k}"] = compiled[k]
    per = args.runs // args.rounds
    times = {k: [] for k in rows}
    with torch.inference_mode():
        for m in rows.values():
            for _ in range(5):
                m(**x)
        for _ in range(args.rounds):
            for k, m in rows.items():
                t = CLOCK()
                for _ in range(per):
                    m(**x)
                times[k].append((CLOCK() - t) / per * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_e, ref_c = med["eager base"], med["compiled base"]
    print(f"\n{'row':>26} {'ms/call':>9} {'÷ eager base':>13} {'÷ compiled base':>16}")
    for k, v in med.items():
        print(f"{k:>26} {v:9.3f} {v / ref_e:13.2f} {v / ref_c:16.2f}")


if __name__ == "__main__":
    main()
