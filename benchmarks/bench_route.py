"""Serving 8 LoRA tenants from one graph: ``Route`` vs one adapter vs 8 merged models vs PEFT ``adapter_names``.

    python benchmarks/bench_route.py [--layers 4] [--hidden 256] [--seq 32] [--batch 32] [--reps 10] [--no-onnx]

A Llama from a config (fp32, GQA), 8 LoRA adapters (r=8, q/k/v/o, non-zero B, same A/B in PEFT), a batch of
``--batch`` rows whose ``adapter_ids`` cycle over the 8 adapters. One run, one process, measured back to back:

* ``routed``       graphadapt ``Route(a0 … a7)``: one forward of the mixed batch (stacked LoRA factors, gather + bmm)
* ``one adapter``  the same batch through one (unmerged) adapter — the cost routing should approach
* ``8 merged``     8 merged models (one per adapter), each run on its own rows, one after another
* ``peft``         PEFT ``model(..., adapter_names=[…])`` (its mixed-batch path: one sub-batch per adapter)

and the same in onnxruntime (routed file vs one-adapter file vs one merged file run 8 times on 8 row groups).
Variants run interleaved, one call each per round; prints medians and the median per-round ratios
(throughput relative to ``one adapter``), the max difference between the routed
and PEFT outputs (a correctness check, not a timing), and file sizes: one routed ONNX file vs base + 8 adapter
files vs 8 merged ONNX files.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = 8


def interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
    """Every variant once per round (so a change in machine load hits all of them alike): the median seconds
    per variant, and the median per-round throughput ratio to the first variant."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    ref = next(iter(fns))
    return ({k: statistics.median(v) for k, v in ts.items()},
            {k: statistics.median(a / b for a, b in zip(ts[ref], v)) for k, v in ts.items()})


def report(title: str, t: dict, ratio: dict) -> None:
    print(title)
    for k, v in t.items():
        print(f"  {k:20s} {v * 1e3:8.2f} ms   {ratio[k]:5.2f}x")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    import graphadapt as ga

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=max(64, args.seq))
    base = transformers.LlamaModel(cfg).eval()
    names = [f"a{i}" for i in range(N)]
    lora = ga.LoRA(r=8, alpha=16, targets=("q", "k", "v", "o"))
    routed = ga.apply(base, ga.Spec({n: lora for n in names}, active=ga.Route(*names))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in routed.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    route = torch.arange(args.batch) % N
    rows = [torch.nonzero(route == i).flatten() for i in range(N)]

    # one merged model per adapter (graphadapt: single-adapter spec, the routed model's weights, merged)
    merged = []
    for i, n in enumerate(names):
        m = ga.apply(base, ga.Spec({n: lora})).eval()
        with torch.no_grad():
            for pn, p in m.named_parameters():
                if pn.startswith("adapters."):
                    p.copy_(routed.get_parameter(pn))
        m.merge()
        merged.append(m)
    single = ga.apply(base, ga.Spec({names[0]: lora})).eval()
    with torch.no_grad():
        for pn, p in single.named_parameters():
            if pn.startswith("adapters."):
                p.copy_(routed.get_parameter(pn))

    # PEFT with the same A/B
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"]), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    mods = {(r.adapter, r.weight): routed.get_submodule(r.target) for r in routed.adapter_records
            if r.adapter in names}
    with torch.no_grad():
        for mname, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and names[0] in getattr(mod, "lora_A", {}):
                for n in names:
                    src = mods[(n, f"{mname}.weight")]
                    mod.lora_A[n].weight.copy_(src.lora_A)
                    mod.lora_B[n].weight.copy_(src.lora_B)
    pm.eval()
    peft_names = [names[i] for i in route.tolist()]

    with torch.no_grad():
        out_r = routed(**batch, adapter_ids=route).last_hidden_state
        out_p = pm(**batch, adapter_names=peft_names).last_hidden_state
        out_m = torch.empty_like(out_r)
        for i, m in enumerate(merged):
            out_m[rows[i]] = m(**{k: v[rows[i]] for k, v in batch.items()}).last_hidden_state
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, {N} LoRAs r=8 "
          f"(q,k,v,o), fp32, {torch.get_num_threads()} thread(s)")
    print(f"check: max |routed - PEFT adapter_names| = {(out_r - out_p).abs().max():.2e}, "
          f"max |routed - 8 merged| = {(out_r - out_m).abs().max():.2e}")

    def run_merged():
        for i, m in enumerate(merged):
            m(**{k: v[rows[i]] for k, v in batch.items()})

    with torch.no_grad():
        t, ratio = interleaved({
            "one adapter": lambda: single(**batch),
            "routed": lambda: routed(**batch, adapter_ids=route),
            "8 merged": run_merged,
            "peft adapter_names": lambda: pm(**batch, adapter_names=peft_names),
        }, args.reps)
    report("PyTorch (median ms/batch; throughput ÷ one adapter, median of per-round ratios):", t, ratio)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter_files = 0
        for n in names:
            single_n = merged[names.index(n)]
            single_n.unmerge()
            single_n.save_adapters(tmp / f"adapter_{n}")
            adapter_files += size(tmp / f"adapter_{n}")
            single_n.merge()
        if args.no_onnx:
            return
        import onnxruntime as ort

        ga.export_onnx(routed, tmp / "routed.onnx", example_inputs={**batch, "adapter_ids": route}, verify=False)
        ga.export_onnx(single, tmp / "single.onnx", merge=False, verify=False)
        ga.export_onnx(merged[0], tmp / "merged.onnx", verify=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = {k: ort.InferenceSession(str(tmp / f"{k}.onnx"), opts, providers=["CPUExecutionProvider"])
                for k in ("routed", "single", "merged")}
        feed = {k: v.numpy() for k, v in batch.items()}
        parts = [{k: v[r.numpy()] for k, v in feed.items()} for r in rows]
        got = sess["routed"].run(["last_hidden_state"], {**feed, "adapter_ids": route.numpy()})[0]
        print(f"check: max |ORT routed - PyTorch routed| = {abs(got - out_r.numpy()).max():.2e}")
        o, ratio = interleaved({
            "one adapter": lambda: sess["single"].run(None, feed),
            "routed": lambda: sess["routed"].run(None, {**feed, "adapter_ids": route.numpy()}),
            "8 merged": lambda: [sess["merged"].run(None, p) for p in parts],
        }, args.reps)
        report("onnxruntime (median ms/batch; throughput ÷ one adapter; '8 merged' = one merged file on 8 row "
               "groups):", o, ratio)
        r_size, m_size = size(tmp / "routed.onnx"), size(tmp / "merged.onnx")
        print("files:")
        print(f"  one routed ONNX (base + 8 adapters inside)  {r_size / 2**20:8.2f} MiB")
        print(f"  base ONNX + 8 adapter files (safetensors)   {(m_size + adapter_files) / 2**20:8.2f} MiB "
              f"(adapters {adapter_files / 2**20:.2f} MiB)")
        print(f"  8 merged ONNX files                         {8 * m_size / 2**20:8.2f} MiB  "
              f"({8 * m_size / (m_size + adapter_files):.1f}x base + adapters)")


if __name__ == "__main__":
    main()
