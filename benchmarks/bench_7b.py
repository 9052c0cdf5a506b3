"""Llama-7B geometry on one machine: fp16 model, LoRA on all linears, apply → save_merged → fp16 ONNX export, verified.

    python benchmarks/bench_7b.py [--layers 32] [--dir /tmp/bench7b] [--atol A --rtol R --rms-tol T]

Builds ``LlamaForCausalLM`` (hidden 4096, 32 heads, 32 layers, FFN 11008, vocab 32000: 6.74B
parameters, 12.6 GiB in fp16) directly in fp16 with random weights (no fp32 copy ever exists),
applies LoRA r=8 to all linears with non-zero B, then times each step and reports the peak
resident memory of the process during it. Finally the model is dropped and the merged checkpoint loaded with
``AutoModelForCausalLM.from_pretrained`` and compared with the adapted model's logits. Needs about
20 GiB of RAM and 2 × 13 GiB of disk under ``--dir`` (outputs are deleted). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def build(layers: int):
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                        torch_dtype="float16")
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.float16)  # no data yet: filled tensor by tensor
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        # buffers computed at init (rotary inverse frequencies) were made on the meta device: redo them
        fresh = dict(type(model.model.rotary_emb)(config=cfg).named_buffers())
        for name, b in model.model.rotary_emb.named_buffers():
            b.copy_(fresh[name])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", default="/tmp/bench7b")
    ap.add_argument("--atol", type=float, help="verification tolerances (default: the library's per-dtype ones)")
    ap.add_argument("--rtol", type=float)
    ap.add_argument("--rms-tol", type=float)
    args = ap.parse_args()

    import torch

    import graphadapt as ga
    from graphadapt.exporters import export_onnx
    from graphadapt.exporters._memory import PeakRSS, release_memory, rss

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, float, str]] = []

    def step(name, fn, note=""):
        release_memory()
        mem = PeakRSS()
        t = time.perf_counter()
        with mem.phase(name):
            out = fn()
        rows.append((name, time.perf_counter() - t, (mem.peak or 0) / GIB, note))
        print(f"{name}: {rows[-1][1]:.1f} s, peak RSS {rows[-1][2]:.2f} GiB", flush=True)
        return out

    model = step("build fp16 model", lambda: build(args.layers))
    n = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / GIB
    print(f"{n / 1e9:.2f}B parameters, {size:.2f} GiB fp16, largest tensor {largest:.3f} GiB, RSS {rss() / GIB:.2f}")
    adapted = step("apply LoRA r=8 all-linear",
                   lambda: ga.apply(model, ga.LoRA(r=8, alpha=16, targets=("all-linear",))).eval())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    out = work / "merged"
    step("save_merged (fp16 shards)", lambda: adapted.save_merged(out))
    shards = sorted(out.glob("*.safetensors"))
    disk = sum(f.stat().st_size for f in shards) / GIB
    rows[-1] = (*rows[-1][:3], f"{len(shards)} shards, {disk:.2f} GiB")

    inputs = {"input_ids": torch.randint(0, 32000, (1, 8), generator=g),
              "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    onnx_path = work / "model.onnx"
    rep = step("export_onnx fp16, merged, verified",
               lambda: export_onnx(adapted, onnx_path, dtype="fp16", example_inputs=inputs, atol=args.atol,
                                   rtol=args.rtol, rms_tol=args.rms_tol))
    phases = ", ".join(f"{k} {v:.0f}" for k, v in rep.seconds.items() if k not in ("total", "commit"))
    peaks = ", ".join(f"{k} {v / GIB:.1f}" for k, v in rep.peak_rss.items())
    rows[-1] = (*rows[-1][:3], f"s: {phases}; peak GiB: {peaks}; verified on {rep.verify_input_shapes['input_ids']} "
                f"in {rep.verify_parts} parts, max abs diff {max(rep.max_abs_diff.values()):.2e}, "
                f"rel RMS {max(rep.rel_rms_diff.values()):.1e}, PyTorch fp16's own max error "
                f"{max(rep.noise_floor.values(), default=float('nan')):.2e} (atol {rep.atol:g}, rtol {rep.rtol:g}, rms_tol {rep.rms_tol:g})")
    for f in work.glob("model.onnx*"):
        f.unlink()

    # the merged checkpoint loads with transformers: its logits against the adapted model's (fp16)
    with torch.no_grad():
        want = adapted(**inputs).logits.float()
    adapted = model = None  # the merged checkpoint is loaded in their place
    release_memory()
    import transformers as T

    loaded = step("from_pretrained(merged checkpoint)",
                  lambda: T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).eval())
    with torch.no_grad():
        got = loaded(**inputs, use_cache=False).logits.float()
    diff = float((got - want).abs().max())
    rows[-1] = (*rows[-1][:3], f"{type(loaded).__name__}; logits vs the adapted model (fp16, unmerged): max abs diff "
                f"{diff:.2e}, logits RMS {float(want.pow(2).mean().sqrt()):.2f}")
    del loaded
    shutil.rmtree(out)

    print(f"\n{n / 1e9:.2f}B parameters ({args.layers} layers), {size:.2f} GiB in fp16, largest tensor "
          f"{largest:.3f} GiB; 1.5 × size + largest = {1.5 * size + largest:.2f} GiB\n")
    print("| step | seconds | peak RSS GiB | notes |\n| --- | --- | --- | --- |")
    for name, sec, peak, note in rows:
        print(f"| {name} | {sec:.1f} | {peak:.2f} | {note} |")


if __name__ == "__main__":
    main()
