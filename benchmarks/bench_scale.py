"""Merge, save and export at scale: a Llama geometry on one machine (issue #16).

    python benchmarks/bench_scale.py [--layers 2 4 8 16 32] [--rounds 3] [--out benchmarks/RESULTS.md]

Geometry: hidden 2048, GQA 32/8 heads, FFN 5632, vocab 32000, fp32, built from
``LlamaConfig`` with a fixed seed; LoRA r=8 (alpha 16) on every linear, B drawn
non-zero. Each layer count runs in its own subprocess (clean peaks) and reports:

* ``apply``: time and resident-memory growth;
* ``merge`` (reversible default), ``merge(in_place=True)``, ``merge(in_place=True,
  keep_backup=False)`` and PEFT's ``merge_and_unload`` on the same weights, interleaved
  over ``--rounds`` rounds (medians; ratio = graphadapt ÷ PEFT per round, median);
* ``save_merged`` (streaming checkpoint): time and peak growth;
* fp16 ONNX export of the merged model with verification (graphadapt) — time and the
  report's peak per phase — next to a plain ``torch.onnx.export`` of the base model in
  fp16 (no adapters, no verification).

Peaks are the kernel's high-water mark per step (``/proc/self/clear_refs``), minus the
resident memory before the step. Numbers depend on the machine and its load; compare
columns within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def build(layers: int, dtype=None):
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=5632, max_position_embeddings=512)
    torch.manual_seed(0)
    if dtype is not None:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return T.LlamaModel(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    return T.LlamaModel(cfg).eval()


def randomize_b(adapted, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)


def peft_copy(base, adapted):
    """PEFT LoRA (r=8, alpha 16, all linears) on a deep copy of ``base`` with graphadapt's A/B."""
    import peft
    import torch

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    by_weight = {r.weight: adapted.get_submodule(r.target) for r in adapted.adapter_records}
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                src = by_weight[f"{name}.weight"]
                mod.lora_A["default"].weight.copy_(src.lora_A)
                mod.lora_B["default"].weight.copy_(src.lora_B)
    return pm


def measure(fn):
    """(seconds, peak resident growth in bytes, result)."""
    from graphadapt.exporters._memory import PeakRSS, release_memory

    release_memory()
    mem = PeakRSS()
    t = time.perf_counter()
    with mem.phase("x"):
        out = fn()
    return time.perf_counter() - t, (mem.peak or 0) - (mem.start or 0), out


def run_one(layers: int, rounds: int, do_export: bool, do_peft: bool) -> dict:
    import torch

    import graphadapt as ga
    from graphadapt.exporters import export_onnx
    from graphadapt.exporters._memory import release_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    res: dict = {"layers": layers}
    base = build(layers)
    n = sum(p.numel() for p in base.parameters())
    res["params"] = n
    res["largest"] = max(p.numel() for p in base.parameters())
    res["apply_s"], res["apply_mem"], adapted = measure(lambda: ga.apply(base, ga.LoRA(r=8, alpha=16, targets=("all-linear",))))
    adapted.eval()
    randomize_b(adapted)

    times: dict[str, list[float]] = {"merge": [], "merge_in_place": [], "merge_no_backup": [], "peft": []}
    mems: dict[str, float] = {}
    for _ in range(rounds):
        if do_peft:
            pm = peft_copy(base, adapted)
            release_memory()
            t, m, _ = measure(lambda: pm.merge_and_unload())
            times["peft"].append(t)
            mems["peft"] = m
            del pm
            release_memory()
        t, m, _ = measure(lambda: adapted.merge())
        times["merge"].append(t)
        mems["merge"] = m
        adapted.unmerge()
        t, m, _ = measure(lambda: adapted.merge(in_place=True))
        times["merge_in_place"].append(t)
        mems["merge_in_place"] = m
        adapted.unmerge()
        # irreversible: on a fresh copy, since it changes the model for good
        scratch_base = copy.deepcopy(base)
        scratch = ga.apply(scratch_base, ga.LoRA(r=8, alpha=16, targets=("all-linear",))).eval()
        scratch.load_state_dict(adapted.state_dict())
        release_memory()
        t, m, _ = measure(lambda: scratch.merge(in_place=True, keep_backup=False))
        times["merge_no_backup"].append(t)
        mems["merge_no_backup"] = m
        del scratch, scratch_base
        release_memory()
    res["times"], res["mems"] = times, mems
    if do_peft:
        res["ratio_merge_vs_peft"] = statistics.median(a / b for a, b in zip(times["merge"], times["peft"]))
        res["ratio_no_backup_vs_peft"] = statistics.median(
            a / b for a, b in zip(times["merge_no_backup"], times["peft"]))

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        res["save_s"], res["save_mem"], _ = measure(lambda: adapted.save_merged(Path(d) / "ckpt", dtype="fp16"))
    release_memory()
    if do_export:
        inputs = {"input_ids": torch.randint(0, 32000, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
            rep = export_onnx(adapted, Path(d) / "m.onnx", dtype="fp16", example_inputs=inputs)
            res["export_s"] = rep.seconds
            res["export_peaks"] = {k: v - rep.rss_start for k, v in rep.peak_rss.items()}
            res["export_mem"] = rep.peak_rss_delta
            res["export_max_abs_diff"] = max(rep.max_abs_diff.values())
        del adapted
        release_memory()
        base.half()
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
            def plain():
                prog = torch.onnx.export(base, (), kwargs={**inputs, "use_cache": False}, dynamo=True, verbose=False)
                prog.save(str(Path(d) / "base.onnx"), external_data=True)
            try:
                res["plain_export_s"], res["plain_export_mem"], _ = measure(plain)
            except Exception as e:  # noqa: BLE001 - report, keep the other numbers
                print(f"plain torch.onnx.export failed: {type(e).__name__}", file=sys.stderr)
    return res


def fmt_table(results: list[dict]) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    med = lambda v: f"{statistics.median(v):.2f}" if v else "—"  # noqa: E731
    lines = [
        "| layers (params) | apply s (+GiB) | merge s (+GiB) | merge in_place s (+GiB) | merge no-backup s (+GiB) "
        "| PEFT merge_and_unload s (+GiB) | merge ÷ PEFT | no-backup ÷ PEFT | save_merged fp16 s (+GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        t, m = r["times"], r["mems"]
        lines.append(
            f"| {r['layers']} ({r['params'] / 1e6:.0f}M) | {r['apply_s']:.2f} (+{g(r['apply_mem'])}) "
            f"| {med(t['merge'])} (+{g(m['merge'])}) | {med(t['merge_in_place'])} (+{g(m['merge_in_place'])}) "
            f"| {med(t['merge_no_backup'])} (+{g(m['merge_no_backup'])}) "
            f"| {med(t['peft'])} (+{g(m.get('peft', 0))}) | {r.get('ratio_merge_vs_peft', float('nan')):.2f} "
            f"| {r.get('ratio_no_backup_vs_peft', float('nan')):.2f} | {r['save_s']:.2f} (+{g(r['save_mem'])}) |")
    exp = [r for r in results if "export_s" in r]
    if exp:
        lines += ["", "| layers | fp16 size GiB | largest tensor GiB (fp16) | export total s (prepare/export/save/check/verify) "
                  "| export peak +GiB (per phase) | peak ÷ (1.5·size + largest) | plain torch.onnx.export s (+GiB) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in exp:
            size, largest = r["params"] * 2, r["largest"] * 2
            s = r["export_s"]
            phases = "/".join(f"{s.get(k, 0):.1f}" for k in ("prepare", "export", "save", "check", "verify"))
            peaks = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["export_peaks"].items())
            lines.append(f"| {r['layers']} | {g(size)} | {g(largest)} | {s['total']:.1f} ({phases}) "
                         f"| {g(r['export_mem'])} ({peaks}) | {r['export_mem'] / (1.5 * size + largest):.2f} "
                         + (f"| {r['plain_export_s']:.1f} (+{g(r['plain_export_mem'])}) |" if "plain_export_s" in r
                            else "| failed |"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args.rounds, not args.no_export, not args.no_peft)))
        return
    results = []
    for layers in args.layers:
        cmd = [sys.executable, __file__, "--one", str(layers), "--rounds", str(args.rounds)]
        cmd += ["--no-export"] * args.no_export + ["--no-peft"] * args.no_peft
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{layers} layers failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))
        print(fmt_table(results[-1:]), flush=True)
        write(args, results)
    print(fmt_table(results))


def write(args, results) -> None:
    import platform

    import torch

    table = fmt_table(results)
    header = (f"# bench_scale results\n\n`python benchmarks/bench_scale.py --layers {' '.join(map(str, args.layers))} "
              f"--rounds {args.rounds}` on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n")
    Path(args.out).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
