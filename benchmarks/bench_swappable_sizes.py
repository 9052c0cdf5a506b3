"""File sizes: one swappable base + N adapter files vs N merged ONNX files (BERT-mini shape, random weights).

    PYTHONPATH=. python benchmarks/bench_swappable_sizes.py [--hidden 256 --layers 4 --rank 8]

Prints the measured sizes and the ratio for N = 8 and N = 50 (sizes are exact; no timing).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

import graphadapt as ga


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    a = p.parse_args()
    cfg = transformers.BertConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                                  intermediate_size=4 * a.hidden)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(r=a.rank, targets=("q", "v"))}))
    with torch.no_grad():
        for n, t in adapted.named_parameters():
            if n.startswith("adapters."):
                t.normal_(0, 0.02)
    d = tempfile.mkdtemp()
    merged = ga.export_onnx(adapted, f"{d}/merged.onnx").file_size
    swap = ga.export_onnx(adapted, f"{d}/swap.onnx", swappable=True, max_rank=a.rank).file_size
    adapter = os.path.getsize(ga.export_onnx_adapter(adapted, "a", f"{d}/a.onnx_adapter",
                                                     onnx_model=f"{d}/swap.onnx"))
    mib = 2 ** 20
    print(f"BERT hidden {a.hidden}, {a.layers} layers, vocab {cfg.vocab_size}; LoRA r={a.rank} on q, v")
    print(f"merged export        {merged / mib:8.2f} MiB")
    print(f"swappable export     {swap / mib:8.2f} MiB")
    print(f"adapter file         {adapter / 1024:8.1f} KiB")
    for n in (8, 50):
        print(f"N={n:3d}: {n} merged files {n * merged / mib:9.1f} MiB vs base + {n} adapter files "
              f"{(swap + n * adapter) / mib:7.2f} MiB  (ratio {n * merged / (swap + n * adapter):.1f}x)")


if __name__ == "__main__":
    main()
