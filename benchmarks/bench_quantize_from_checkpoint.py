"""QLoRA from an fp16 checkpoint: ``apply(hollow_model(ckpt), spec, quantize="nf4")`` (each weight read from the
checkpoint, quantized, dropped) against loading the model first (``from_pretrained`` + ``apply(..., quantize=)``).

    python benchmarks/bench_quantize_from_checkpoint.py --dir /work/bigtmp/qload [--hidden 2048 --layers 8
        --inter 5504 --heads 16 --vocab 32000 --shard-gb 0.5] [--keep]

Each way runs in a fresh process (peak RSS = the process's ``VmHWM``, which includes Python, torch and
transformers); the two adapted models' packed bytes are compared afterwards in a third process (bit for bit).
The checkpoint is written by ``bench_out_of_core.generate`` (random, seeded per tensor). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30
SPEC = dict(r=8, alpha=16, targets=("all-linear",))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(way: str, ckpt: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import graphadapt as ga
    from graphadapt.quantized import Packed4bitLinear, base_bytes

    t = time.perf_counter()
    start = _status("VmRSS")
    if way == "hollow":
        from graphadapt.outofcore import hollow_model

        model = hollow_model(ckpt)
    else:
        import transformers as T

        model = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16).eval()
    loaded = time.perf_counter() - t
    rss_loaded = _status("VmRSS")
    adapted = ga.apply(model, ga.LoRA(**SPEC), quantize="nf4").eval()
    seconds = time.perf_counter() - t
    rss_applied = _status("VmRSS")
    with torch.no_grad():
        logits = adapted(input_ids=torch.arange(8).view(1, 8), attention_mask=torch.ones(1, 8, dtype=torch.long)).logits
    packs = {n: m.weight_packed for n, m in adapted.named_modules() if isinstance(m, Packed4bitLinear)}
    absmax = {n: m.weight_absmax for n, m in adapted.named_modules() if isinstance(m, Packed4bitLinear)}
    torch.save({"packed": packs, "absmax": absmax, "logits": logits}, out)
    stats = base_bytes(adapted)
    print(json.dumps({"way": way, "seconds": seconds, "load_s": loaded, "start_rss": start,
                      "peak_rss": _status("VmHWM"), "rss_loaded": rss_loaded, "rss_applied": rss_applied, "rss_after": _status("VmRSS"), "quantized_linears": len(packs),
                      "quantized_bytes": stats["quantized_bytes"], "dense_bytes": stats["dense_bytes"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/work/bigtmp/qload")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=5504)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--one", choices=["hollow", "loaded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.dir)
    ckpt = work / "checkpoint"
    if args.one:
        run_one(args.one, ckpt, work / f"{args.one}.pt")
        return

    from bench_out_of_core import config, generate

    if not (ckpt / "model.safetensors.index.json").exists():
        generate(config(args), ckpt, int(args.shard_gb * 1e9))
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    rows = {}
    # glibc's default mmap threshold grows with the largest block freed, so later weight-sized transients (the
    # dequantized weight each adapter insertion reads) are carved from the heap and stay resident after they
    # are freed; a fixed threshold (MALLOC_MMAP_THRESHOLD_) shows the peak without that retention
    for way in ("hollow", "loaded"):
        for malloc in ("default", "1048576"):
            env = dict(os.environ)
            if malloc != "default":
                env["MALLOC_MMAP_THRESHOLD_"] = malloc
            res = subprocess.run([sys.executable, __file__, "--dir", str(work), "--one", way], check=True,
                                 capture_output=True, text=True, env=env)
            rows[(way, malloc)] = json.loads(res.stdout.strip().splitlines()[-1])
    import torch

    a, b = torch.load(work / "hollow.pt"), torch.load(work / "loaded.pt")
    same = (a["packed"].keys() == b["packed"].keys()
            and all(torch.equal(a["packed"][k], b["packed"][k]) and torch.equal(a["absmax"][k], b["absmax"][k])
                    for k in a["packed"]) and torch.equal(a["logits"], b["logits"]))
    print(f"checkpoint: {size / GIB:.2f} GiB fp16; packed bytes, absmax and logits bit-identical: {same}")
    print("| way | MALLOC_MMAP_THRESHOLD_ | load + apply s | RSS at start GiB | after load | after apply | "
          "peak RSS GiB | quantized linears | packed base GiB | dense base GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (way, malloc), r in rows.items():
        print(f"| {way} | {malloc} | {r['seconds']:.1f} | {r['start_rss'] / GIB:.2f} | {r['rss_loaded'] / GIB:.2f} | "
              f"{r['rss_applied'] / GIB:.2f} | {r['peak_rss'] / GIB:.2f} | {r['quantized_linears']} | "
              f"{r['quantized_bytes'] / GIB:.2f} | {r['dense_bytes'] / GIB:.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
