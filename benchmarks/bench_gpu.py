"""GPU figures, measured side by side in one run: graphadapt vs the base model vs PEFT, and
onnxruntime-gpu (CUDA execution provider) vs PyTorch eager.

    python benchmarks/bench_gpu.py [--out RESULTS_GPU.md] [--small] [--device cuda]

Sections (each one independent: a failure is printed and the others still run):
  encoder   BERT-base geometry, fp16, batch 32 x 128: forward latency of the base model, graphadapt
            LoRA (unmerged, merged), graphadapt SeqBn, PEFT LoRA; train step (bf16 autocast) ours vs PEFT
  onnx      the same model exported fp16 by graphadapt (merged LoRA; unmerged SeqBn) run by onnxruntime
            on the CUDA EP with IO binding, vs PyTorch eager; outputs compared with PyTorch
  decoder   Llama geometry (hidden 2048, GQA 32/8, FFN 5632, 16 layers), fp16, LoRA r=8 on all
            linears: per-token latency of greedy decoding (64 new tokens) with graphadapt's
            ``generate`` (unmerged, merged) vs Hugging Face ``generate`` on the base model and on PEFT

Timings: CUDA-synchronised wall clock, median of ``--reps`` runs after warm-up, with the
spread (min-max). Ratios are the numbers to quote; absolute times depend on the machine.
``--small`` shrinks every geometry so the script can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphadapt as ga  # noqa: E402

LINES: list[str] = []


def out(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int, warmup: int = 3) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts), max(ts)


def fmt(t) -> str:
    return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def bert(small: bool, dev, dtype):
    cfg = T.BertConfig(hidden_size=64 if small else 768, num_hidden_layers=2 if small else 12,
                       num_attention_heads=4 if small else 12, intermediate_size=128 if small else 3072)
    torch.manual_seed(0)
    with torch.device(dev):
        return T.BertModel(cfg).to(dtype).eval()


def randomize(adapted, seed=0, std=0.02):
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def encoder_section(a, dev):
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    b, s = (4, 16) if a.small else (32, 128)
    base = bert(a.small, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = {"input_ids": torch.randint(0, base.config.vocab_size, (b, s), generator=g).to(dev),
         "attention_mask": torch.ones(b, s, dtype=torch.long, device=dev)}
    lora = ga.apply(base, ga.LoRA(r=8, targets=("q", "v")))
    randomize(lora)
    seq = ga.apply(base, ga.SeqBn(reduction_factor=16))
    randomize(seq, 1)
    from peft import LoraConfig, get_peft_model

    pbase = bert(a.small, dev, dtype)
    peft = get_peft_model(pbase, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"])).eval()
    with torch.no_grad():
        t_base = timed(lambda: base(**x), dev, a.reps)
        t_lora = timed(lambda: lora(**x), dev, a.reps)
        t_seq = timed(lambda: seq(**x), dev, a.reps)
        t_peft = timed(lambda: peft(**x), dev, a.reps)
        lora.merge()
        t_merged = timed(lambda: lora(**x), dev, a.reps)
        lora.unmerge()
    out(f"## encoder: BERT-base geometry, {str(dtype)[6:]}, batch {b} x {s}, forward (ms, median (min-max) of {a.reps})")
    out("")
    out("| model | ms | ÷ base |")
    out("| --- | --- | --- |")
    for name, t in [("base (HF eager)", t_base), ("graphadapt LoRA r=8 q,v unmerged", t_lora),
                    ("graphadapt LoRA merged", t_merged), ("graphadapt SeqBn rf=16", t_seq),
                    ("PEFT LoRA r=8 q,v unmerged", t_peft)]:
        out(f"| {name} | {fmt(t)} | {t[0] / t_base[0]:.2f} |")
    out(f"\ngraphadapt LoRA unmerged ÷ PEFT LoRA unmerged: {t_lora[0] / t_peft[0]:.2f}")

    # train step under bf16 autocast, fp32 master weights, ours vs PEFT
    tb = bert(a.small, dev, torch.float32)
    ours = ga.apply(tb, ga.LoRA(r=8, targets=("q", "v"))).train()
    theirs = get_peft_model(bert(a.small, dev, torch.float32),
                            LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"])).train()
    res = {}
    for name, m in [("graphadapt", ours), ("PEFT", theirs)]:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = m(**x).last_hidden_state.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        res[name] = timed(step, dev, a.reps)
    out(f"\ntrain step (bf16 autocast, AdamW on LoRA): graphadapt {fmt(res['graphadapt'])} ms, "
        f"PEFT {fmt(res['PEFT'])} ms, ratio {res['graphadapt'][0] / res['PEFT'][0]:.2f}")
    out("")
    return base, lora, seq, x


def onnx_section(a, dev, base, lora, seq, x):
    import numpy as np
    import onnxruntime as ort

    if dev.type == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort.get_available_providers()
    cuda = dev.type == "cuda" and "CUDAExecutionProvider" in providers
    prov = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    out(f"## onnx: onnxruntime {ort.__version__}, providers {prov} (available: {providers})")
    out("")
    if dev.type == "cuda" and not cuda:
        out("onnxruntime-gpu is not installed here: no CUDA EP figures.")
        return
    dtype = "fp16" if dev.type == "cuda" else "fp32"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, m, merge in [("LoRA merged", lora, True), ("SeqBn (in graph)", seq, False)]:
            t0 = time.perf_counter()
            rep = ga.export_onnx(m, Path(d) / f"{name.split()[0]}.onnx", dtype=dtype, merge=merge, verify=True,
                                 providers=prov)
            t_export = time.perf_counter() - t0
            so = ort.SessionOptions()
            sess = ort.InferenceSession(str(rep.path), so, providers=prov)
            io = sess.io_binding()
            feeds = {}
            for i in sess.get_inputs():
                t = x[i.name].contiguous()
                feeds[i.name] = t
                io.bind_input(i.name, dev.type, 0, np.int64, tuple(t.shape), t.data_ptr())
            for o in sess.get_outputs():
                io.bind_output(o.name, dev.type)
            run = lambda: sess.run_with_iobinding(io)  # noqa: E731
            t_ort = timed(run, dev, a.reps)
            with torch.no_grad():
                t_eager = timed(lambda: m(**x), dev, a.reps)
            run()
            got = torch.from_numpy(io.copy_outputs_to_cpu()[0]).float()
            with torch.no_grad():
                want = m(**x).last_hidden_state.float().cpu()
            rows.append((name, t_export, rep, t_ort, t_eager, float((got - want).abs().max())))
    with torch.no_grad():
        t_base = timed(lambda: base(**x), dev, a.reps)
    out(f"| exported model ({dtype}) | export+verify s | verify max abs diff | ORT ms | PyTorch eager ms | ORT ÷ eager | ORT ÷ base eager | ORT vs torch max abs diff (same inputs) |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, te, rep, to, tq, diff in rows:
        vd = max(rep.max_abs_diff.values()) if rep.max_abs_diff else float("nan")
        out(f"| {name} | {te:.1f} | {vd:.2e} | {fmt(to)} | {fmt(tq)} | {to[0] / tq[0]:.2f} | {to[0] / t_base[0]:.2f} | {diff:.2e} |")
    out("")


def decoder_section(a, dev):
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = T.LlamaConfig(hidden_size=64 if a.small else 2048, num_hidden_layers=2 if a.small else 16,
                        num_attention_heads=4 if a.small else 32, num_key_value_heads=2 if a.small else 8,
                        intermediate_size=128 if a.small else 5632, vocab_size=1000 if a.small else 32000,
                        max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(dev):
        base = T.LlamaForCausalLM(cfg).to(dtype).eval()
    nparams = sum(p.numel() for p in base.parameters())
    new = 8 if a.small else 64
    t0 = time.perf_counter()
    adapted = ga.apply(base, ga.LoRA(r=8, targets="all-linear"), cache=True)
    t_apply = time.perf_counter() - t0
    randomize(adapted, 2, 0.01)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with torch.device(dev):
        pbase = T.LlamaForCausalLM(cfg).to(dtype).eval()
    peft = get_peft_model(pbase, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")).eval()
    out(f"## decoder: Llama geometry {nparams / 1e6:.0f}M params, {str(dtype)[6:]}, LoRA r=8 all linears "
        f"(apply with cache: {t_apply:.1f} s); greedy, prompt 32, {new} new tokens, ms per new token")
    out("")
    out("| batch | HF generate base | HF generate PEFT | graphadapt unmerged | graphadapt merged | ours unmerged ÷ PEFT | ours merged ÷ HF base |")
    out("| --- | --- | --- | --- | --- | --- | --- |")
    for b in (1, 8):
        g = torch.Generator(device="cpu").manual_seed(b)
        ids = torch.randint(3, cfg.vocab_size, (b, 32), generator=g).to(dev)
        mask = torch.ones_like(ids)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        reps = max(3, a.reps // 6)
        with torch.no_grad():
            hf = timed(lambda: base.generate(input_ids=ids, attention_mask=mask, **kw), dev, reps, 1)
            pf = timed(lambda: peft.generate(input_ids=ids, attention_mask=mask, **kw), dev, reps, 1)
            un = timed(lambda: adapted.generate(ids, mask, max_new_tokens=new), dev, reps, 1)
            adapted.merge()
            me = timed(lambda: adapted.generate(ids, mask, max_new_tokens=new), dev, reps, 1)
            adapted.unmerge()
        per = [(t[0] / new, t[1] / new, t[2] / new) for t in (hf, pf, un, me)]
        out(f"| {b} | {fmt(per[0])} | {fmt(per[1])} | {fmt(per[2])} | {fmt(per[3])} | "
            f"{per[2][0] / per[1][0]:.2f} | {per[3][0] / per[0][0]:.2f} |")
    out("")


def profile_section(a, dev):
    """Where the time goes: top kernels of one forward (ours vs PEFT vs base) and of one decode step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    b, s = (4, 16) if a.small else (32, 128)
    base = bert(a.small, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = {"input_ids": torch.randint(0, base.config.vocab_size, (b, s), generator=g).to(dev),
         "attention_mask": torch.ones(b, s, dtype=torch.long, device=dev)}
    from peft import LoraConfig, get_peft_model

    ours = ga.apply(base, ga.LoRA(r=8, targets=("q", "v")))
    seq = ga.apply(base, ga.SeqBn(reduction_factor=16))
    peft = get_peft_model(bert(a.small, dev, dtype), LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name, m in [("base", base), ("graphadapt LoRA", ours), ("graphadapt SeqBn", seq), ("PEFT LoRA", peft.eval())]:
        with torch.no_grad():
            for _ in range(3):
                m(**x)
            sync(dev)
            with profile(activities=acts) as prof:
                for _ in range(5):
                    m(**x)
                sync(dev)
        out(f"### profile: {name}, 5 forwards")
        out("```")
        out(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70))
        out("```")
    # one greedy generate at batch 8, 16 new tokens: HF on the base vs ours merged
    cfg = T.LlamaConfig(hidden_size=64 if a.small else 2048, num_hidden_layers=2 if a.small else 4,
                        num_attention_heads=4 if a.small else 32, num_key_value_heads=2 if a.small else 8,
                        intermediate_size=128 if a.small else 5632, vocab_size=1000 if a.small else 32000)
    torch.manual_seed(0)
    with torch.device(dev):
        lm = T.LlamaForCausalLM(cfg).to(dtype).eval()
    adapted = ga.apply(lm, ga.LoRA(r=8, targets="all-linear"), cache=True)
    adapted.merge()
    ids = torch.randint(3, cfg.vocab_size, (8, 32), generator=g).to(dev)
    mask = torch.ones_like(ids)
    for name, fn in [("HF generate (base)", lambda: lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                                                min_new_tokens=16, do_sample=False)),
                     ("graphadapt generate (merged)", lambda: adapted.generate(ids, mask, max_new_tokens=16))]:
        with torch.no_grad():
            fn()
            sync(dev)
            with profile(activities=acts) as prof:
                fn()
                sync(dev)
        out(f"### profile: {name}, batch 8, 16 new tokens")
        out("```")
        out(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=70))
        out("```")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sections", default="encoder,onnx,decoder")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out(f"# bench_gpu results\n\n`python benchmarks/bench_gpu.py` on {name}, torch {torch.__version__}, "
        f"transformers {T.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    sections = a.sections.split(",")
    enc = None
    if "encoder" in sections or "onnx" in sections:
        try:
            enc = encoder_section(a, dev)
        except Exception:
            out("encoder section failed:\n```\n" + traceback.format_exc() + "```")
    if "onnx" in sections and enc is not None:
        try:
            onnx_section(a, dev, *enc)
        except Exception:
            out("onnx section failed:\n```\n" + traceback.format_exc() + "```")
    if "profile" in sections:
        try:
            profile_section(a, dev)
        except Exception:
            out("profile section failed:\n```\n" + traceback.format_exc() + "```")
    if "decoder" in sections:
        try:
            decoder_section(a, dev)
        except Exception:
            out("decoder section failed:\n```\n" + traceback.format_exc() + "```")
    if a.out:
        Path(a.out).write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
