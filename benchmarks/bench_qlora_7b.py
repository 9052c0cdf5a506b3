"""QLoRA at the Llama-7B geometry on CPU: an NF4 base built without a dense copy, LoRA on all linears,
one training step with gradient checkpointing; peak resident memory per phase.

    python benchmarks/bench_qlora_7b.py [--layers 32] [--seq 16] [--export DIR]

Builds ``LlamaForCausalLM`` (hidden 4096, 32 heads, 32 layers, FFN 11008, vocab 32000: 6.74B
parameters) on the meta device, then fills it linear by linear: each layer linear's weight is drawn in
bf16 and packed at once into a bitsandbytes NF4 ``Linear4bit`` (double quantisation, blocks of 64, bf16
compute) — the dense weight of one linear exists at a time; embeddings, norms and the output projection
are bf16. Then ``graphadapt.apply`` (LoRA r=8 on all linears, captured over the packed base), one AdamW
step on a ``--seq``-token batch with gradient checkpointing, and the bytes per base parameter.
``--export DIR`` also writes the int4 ``MatMulNBits`` ONNX export (``export_onnx(quantize="int4", merge=False)``,
streamed: traced over placeholder base weights, each linear dequantized and packed while the external data is
written), verified against the PyTorch model over the file's int4 weights (read back one linear at a time).
``--wait-for FILE`` waits for FILE after training before exporting (the exporter is imported only then).
The base is synthetic (one random matrix per shape, so ``q_proj`` equals ``k_proj``): memory and time are
representative, the export's drift against the NF4 model is not (attention is near-hard; RESULTS.md).
Prints a markdown table (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def build_nf4(layers: int):
    import bitsandbytes as bnb
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                        tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    drawn: dict[tuple[int, int], torch.Tensor] = {}  # one random matrix per shape (drawing 6.5B normals takes ~30 min here)
    with torch.no_grad():
        for path, m in list(model.model.layers.named_modules()):
            if not isinstance(m, torch.nn.Linear):
                continue
            shape = (m.out_features, m.in_features)
            if shape not in drawn:
                drawn[shape] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            w = drawn[shape]
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True,
                                         quant_type="nf4", module=q)._quantize("cpu")
            q.quant_state = q.weight.quant_state
            parent, _, leaf = path.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), leaf, q)
        for name, p in list(model.named_parameters()):
            if p.is_meta:
                owner, _, leaf = name.rpartition(".")
                t = torch.ones(p.shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else \
                    (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
                model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        drawn.clear()
        fresh = dict(type(model.model.rotary_emb)(config=cfg).named_buffers())
        for name, b in list(model.model.rotary_emb.named_buffers()):
            model.model.rotary_emb._buffers[name] = fresh[name]
    return model.train()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--export", default=None, help="directory for the int4 ONNX export (off by default)")
    ap.add_argument("--wait-for", default=None,
                    help="after training, wait until this file exists before exporting (the exporter is imported "
                         "only then, so a long build can start before the export code is final)")
    args = ap.parse_args()

    import importlib.util

    import torch

    import graphadapt as ga
    from graphadapt.quantized import base_bytes

    # graphadapt/exporters/_memory.py on its own: importing the exporters package now would freeze its code
    # for --wait-for.
    spec = importlib.util.spec_from_file_location("_bench_memory", ROOT / "graphadapt" / "exporters" / "_memory.py")
    _memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_memory)
    PeakRSS, release_memory, rss = _memory.PeakRSS, _memory.release_memory, _memory.rss
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
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

    model = step("build NF4 model (one dense linear at a time)", lambda: build_nf4(args.layers))
    print(f"RSS after build {rss() / GIB:.2f} GiB", flush=True)
    adapted = step("apply LoRA r=8 all-linear (captured over the packed base)",
                   lambda: ga.apply(model, ga.LoRA(r=8, alpha=16, targets=("all-linear",))))
    stats = base_bytes(adapted)
    n_lora = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    rows[-1] = (*rows[-1][:3], f"{stats['quantized_params'] / 1e9:.2f}B packed params at "
                f"{stats['bytes_per_quantized_param']:.3f} B/param; {stats['dense_params'] / 1e6:.0f}M dense (bf16); "
                f"{n_lora / 1e6:.1f}M LoRA params")
    adapted.train()
    adapted.gradient_checkpointing_enable()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (1, args.seq), generator=g)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)

    def train_step():
        out = adapted(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out["logits"] if isinstance(out, dict) else out.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 32000), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    loss = step(f"one training step (seq {args.seq}, gradient checkpointing, AdamW)", train_step)
    rows[-1] = (*rows[-1][:3], f"loss {loss:.3f}")
    del opt
    print(f"RSS after training {rss() / GIB:.2f} GiB", flush=True)
    print(f"\n| phase ({args.layers} layers) | seconds | peak RSS GiB | notes |\n|---|---|---|---|")
    for name, s, peak, note in rows:
        print(f"| {name} | {s:.1f} | {peak:.2f} | {note} |", flush=True)
    if args.export and args.wait_for:
        print(f"waiting for {args.wait_for}", flush=True)
        while not os.path.exists(args.wait_for):
            time.sleep(10)
    if args.export:
        from graphadapt.exporters import export_onnx

        path = Path(args.export) / "qlora.onnx"
        rep = step("export_onnx(quantize='int4', merge=False), verified",
                   lambda: export_onnx(adapted, path, merge=False, quantize="int4", external_data=True,
                                       example_inputs={"input_ids": ids[:, :8],
                                                       "attention_mask": torch.ones(1, 8, dtype=torch.long)}))
        q = rep.quantization
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in rep.peak_rss.items())
        # export_onnx resets the kernel's high-water mark per phase of its own, so the step's reading holds only
        # the peak since its last phase began: the step's peak is the largest of them
        peak = max([rows[-1][2], *(v / GIB for v in rep.peak_rss.values())])
        rows[-1] = (*rows[-1][:2], peak, f"{q['nodes']} MatMulNBits (int{q['bits']}, blocks of {q['block_size']}); "
                    f"exact part "
                    f"max abs diff {max(rep.max_abs_diff.values()):.2e} (atol {rep.atol:g}) in {rep.verify_parts} "
                    f"onnxruntime parts; drift vs NF4 rel RMS {q['drift_rel_rms']:.3f}; "
                    f"{rep.file_size / GIB:.2f} GiB on disk; peak GiB per export phase: {phases}")
        print(rep.summary(), flush=True)
    print(f"\n| phase ({args.layers} layers) | seconds | peak RSS GiB | notes |\n|---|---|---|---|")
    for name, s, peak, note in rows:
        print(f"| {name} | {s:.1f} | {peak:.2f} | {note} |")


if __name__ == "__main__":
    main()
