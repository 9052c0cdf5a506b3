"""Out-of-core merge and export: a Llama checkpoint larger than memory, LoRA on all linears.

    python benchmarks/bench_out_of_core.py --dir /work/bigtmp/ooc [--hidden 5120 --layers 40 --inter 13824
        --heads 40 --vocab 32000 --shard-gb 5] [--skip-onnx] [--keep]

Steps, each in this one process with its own peak RSS (``VmHWM`` reset per phase):

1. ``generate``: a random fp16 checkpoint in Hugging Face's sharded layout (``model-0000i-of-0000n.safetensors``
   + ``model.safetensors.index.json`` + ``config.json``), written tensor by tensor (each tensor seeded by its
   index: never the whole model in memory). Skipped when the folder already holds it.
2. ``hollow_model`` + ``apply`` LoRA r=8 on all linears (non-zero B, seeded).
3. ``save_merged_from_checkpoint``: streamed merge into a checkpoint with the same shard layout.
4. check, shard by shard: each merged shard's tensors equal an in-memory merge of the same input shard
   (that shard loaded into the model, folded by the ordinary in-memory path), bit for bit.
5. (unless ``--skip-onnx``) the merged output is deleted, then ``export_onnx(..., weights_from=checkpoint)``
   in fp16, verified in parts.

Prints a markdown table. Everything under ``--dir`` is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def config(args):
    import transformers as T

    return T.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.inter, max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="float16")


def tensor_table(cfg):
    """(name, shape) of every tensor of a Llama checkpoint, in save order."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def generate(cfg, directory: Path, shard_bytes: int) -> None:
    """A random fp16 checkpoint written tensor by tensor (no tool's mark: a foreign checkpoint)."""
    import torch

    table = tensor_table(cfg)
    shards, size = [[]], 0
    for name, shape in table:
        nb = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(directory)
    index = {name: k for k, (name, _) in enumerate(table)}
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nb = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
            header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
            total += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / (fname + ".part"), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                g = torch.Generator().manual_seed(1000 + index[name])
                if name.endswith("norm.weight"):
                    t = (1.0 + 0.1 * torch.randn(shape, generator=g)).half()
                else:
                    t = torch.empty(shape, dtype=torch.float16)
                    t.normal_(0.0, 0.02, generator=g)
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
        os.replace(directory / (fname + ".part"), directory / fname)
        print(f"  wrote {fname} ({off / GIB:.2f} GiB)", flush=True)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/work/bigtmp/ooc")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--inter", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only-generate", action="store_true")
    ap.add_argument("--skip-merge", action="store_true", help="only the ONNX export (a checkpoint exists)")
    ap.add_argument("--check-from", type=int, default=1, help="with --check-dir: the first shard to check")
    ap.add_argument("--check-dir", help="only check the merged shards in this folder (the temp folder of a running "
                    "merge works: each shard is checked once complete)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from graphadapt.exporters._memory import PeakRSS, release_memory, rss

    work = Path(args.dir)
    ckpt, merged_dir = work / "checkpoint", work / "merged"
    cfg = config(args)
    rows: list[tuple[str, float, float, str]] = []

    def step(name, fn, note=""):
        release_memory()
        mem = PeakRSS()
        t = time.perf_counter()
        with mem.phase(name):
            out = fn()
        rows.append((name, time.perf_counter() - t, (mem.peak or 0) / GIB, note))
        print(f"{name}: {rows[-1][1]:.1f} s, peak RSS {rows[-1][2]:.2f} GiB (now {(rss() or 0) / GIB:.2f})", flush=True)
        return out

    if not (ckpt / "model.safetensors.index.json").exists():
        step("generate random fp16 checkpoint", lambda: generate(cfg, ckpt, int(args.shard_gb * 1e9)))
    files = sorted(ckpt.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint: {len(files)} shards, {size / GIB:.2f} GiB", flush=True)
    if args.only_generate:
        return

    import graphadapt as ga
    from graphadapt.outofcore import hollow_model, save_merged_from_checkpoint

    model = step("hollow_model (config + small tensors)", lambda: hollow_model(ckpt))
    adapted = step(f"apply LoRA r={args.rank} all-linear",
                   lambda: ga.apply(model, ga.LoRA(r=args.rank, alpha=2 * args.rank, targets=("all-linear",))).eval())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    if args.check_dir:
        check_following(ckpt, adapted, Path(args.check_dir), step, args.check_from)
        return
    if not args.skip_merge:
        step("save_merged_from_checkpoint (streamed)", lambda: save_merged_from_checkpoint(ckpt, adapted, merged_dir))
        out_files = sorted(merged_dir.glob("*.safetensors"))
        rows[-1] = (*rows[-1][:3], f"{len(out_files)} shards, {sum(f.stat().st_size for f in out_files) / GIB:.2f} "
                    "GiB, same layout as the input")

    if not args.skip_check and not args.skip_merge:
        from graphadapt.outofcore import check_merged_against_in_memory

        res = step("check: each merged shard == in-memory merge of that shard",
                   lambda: check_merged_against_in_memory(ckpt, adapted, merged_dir))
        rows[-1] = (*rows[-1][:3], f"{res['tensors']} tensors in {res['shards']} shards bit-identical; "
                    f"{res['folded']} folded (each differs from its base)")
    if not args.skip_merge:
        shutil.rmtree(merged_dir, ignore_errors=True)

    if not args.skip_onnx:
        from graphadapt.exporters import export_onnx

        inputs = {"input_ids": torch.randint(0, args.vocab, (1, 8), generator=g),
                  "attention_mask": torch.ones(1, 8, dtype=torch.long)}
        rep = step("export_onnx fp16, merged, weights_from checkpoint, verified",
                   lambda: export_onnx(adapted, work / "model.onnx", dtype="fp16", example_inputs=inputs,
                                       weights_from=ckpt))
        phases = ", ".join(f"{k} {v:.0f}" for k, v in rep.seconds.items() if k not in ("total", "commit"))
        peaks = ", ".join(f"{k} {v / GIB:.1f}" for k, v in rep.peak_rss.items())
        rows[-1] = (*rows[-1][:3], f"s: {phases}; peak GiB: {peaks}; verified on "
                    f"{rep.verify_input_shapes.get('input_ids')} in {rep.verify_parts} parts, max abs diff "
                    f"{max(rep.max_abs_diff.values()):.2e}, rel RMS {max(rep.rel_rms_diff.values()):.1e} "
                    f"(atol {rep.atol:g}, rtol {rep.rtol:g}, rms_tol {rep.rms_tol:g}); reference: "
                    f"{rep.reference_dtype}, PyTorch fp16's own max error "
                    f"{max(rep.noise_floor.values(), default=float('nan')):.2e}")
        for f in work.glob("model.onnx*"):
            f.unlink()

    n = sum(math_prod(s) for _, s in tensor_table(cfg))
    print(f"\n{n / 1e9:.2f}B parameters ({args.layers} layers, hidden {args.hidden}), checkpoint {size / GIB:.2f} GiB "
          f"fp16 in {len(files)} shards; 1/3 of it = {size / 3 / GIB:.2f} GiB\n")
    print("| step | seconds | peak RSS GiB | notes |\n| --- | --- | --- | --- |")
    for name, sec, peak, note in rows:
        print(f"| {name} | {sec:.1f} | {peak:.2f} | {note} |")
    if not args.keep:
        shutil.rmtree(work)


def check_following(ckpt_dir, adapted, merged: Path, step, first: int = 1) -> None:
    """Check each merged shard against an in-memory merge of its input shard as soon as it is complete."""
    from graphadapt.outofcore import Checkpoint, _read_header, check_merged_shard

    ckpt = Checkpoint(ckpt_dir)
    total = {"shards": 0, "tensors": 0, "folded": 0}
    for fname in list(ckpt.shards)[first - 1:]:
        want = None
        while True:
            f = merged / fname
            if not f.exists() and (merged.parent / fname).exists():  # the merge finished and moved it
                f = merged.parent / fname
            if f.exists() and f.stat().st_size >= 8:
                try:
                    last = max(_read_header(f), key=lambda e: e.start)
                    want = last.start + last.nbytes
                except Exception:  # noqa: BLE001 - header not written yet
                    want = None
                if want is not None and f.stat().st_size >= want:
                    break
            time.sleep(10)
        res = step(f"check {fname} == in-memory merge of that shard", lambda: check_merged_shard(ckpt, adapted, f))
        for k in total:
            total[k] += res[k]
        print(f"  {res}", flush=True)
    print(f"all shards bit-identical: {total}", flush=True)


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
