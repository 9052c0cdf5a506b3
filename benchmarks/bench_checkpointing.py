"""Gradient checkpointing on an adapted model: peak memory and step time, with vs without.

    python benchmarks/bench_checkpointing.py [--layers 8] [--hidden 512] [--seq 512] [--batch 4]

Each mode runs in a fresh process (peak RSS only grows): a seeded LlamaForCausalLM, LoRA r=8 on
q/v/down, one warm-up step (captures the labels variant), then timed forward+backward steps.
Reports the peak RSS growth of the first full-size step (warm-up on small inputs before it), the bytes autograd saved for
backward in one step (``saved_tensors_hooks``, unique storages), and the step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(args) -> dict:
    import torch
    import transformers as T

    import graphadapt as ga

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=args.seq)
    model = T.LlamaForCausalLM(cfg).eval()
    adapted = ga.apply(model, ga.LoRA(r=8, targets=("q", "v", "down")))
    adapted.train()
    if args.mode == "checkpointing":
        adapted.gradient_checkpointing_enable()
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(b=batch):
        adapted(**b).loss.backward()
        for p in adapted.trainable_parameters().values():
            p.grad = None

    step({k: v[:2, :16] for k, v in batch.items()})  # warm-up on small inputs: captures the labels variant
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    t = time.perf_counter()
    for _ in range(args.rounds):
        step()
    seconds = (time.perf_counter() - t) / args.rounds
    return {"mode": args.mode, "saved_MiB": sum(storages.values()) / 2**20, "peak_growth_MiB": (peak - base) / 1024,
            "peak_MiB": peak / 1024, "step_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", default=None)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_child(args)))
        return
    rows = []
    for mode in ("plain", "checkpointing"):
        cmd = [sys.executable, __file__, "--mode", mode] + [f"--{k}={getattr(args, k)}" for k in
                                                           ("layers", "hidden", "seq", "batch", "rounds")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"LlamaForCausalLM layers={args.layers} hidden={args.hidden} batch={args.batch} seq={args.seq}, LoRA r=8")
    print("| mode | saved for backward MiB | peak RSS growth MiB (first full-size step) | peak RSS MiB | step s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['saved_MiB']:.0f} | {r['peak_growth_MiB']:.0f} | {r['peak_MiB']:.0f} | {r['step_s']:.2f} |")
    p, c = rows
    print(f"ratios (checkpointing ÷ plain): saved {c['saved_MiB'] / p['saved_MiB']:.2f}, "
          f"peak RSS {c['peak_MiB'] / p['peak_MiB']:.2f}, step time {c['step_s'] / p['step_s']:.2f}")


if __name__ == "__main__":
    main()
