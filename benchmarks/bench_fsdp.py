"""Per-rank memory of LoRA training under FSDP2 (graphadapt.shard) against one unsharded process.

    python benchmarks/bench_fsdp.py            # launches: 1 process unsharded, then 2 gloo ranks sharded
    python benchmarks/bench_fsdp.py --qlora    # the same over an NF4 base (apply(..., quantize="nf4"))

Each rank builds a Llama geometry in fp32 (hidden 1024, 16 layers, LoRA r=8 on all linears), drops its own
reference to the source model, then reports resident memory after ``shard`` (steady state) and the peak
of one training step (batch 2 x 32 per rank), the high-water mark reset through ``/proc/self/clear_refs``.
With ``--qlora`` every linear but the head is NF4 (packed bytes, block scales and code tables: the
"packed" bytes reported, summed over this rank's local shards).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

WORKER = "--worker"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(sharded: bool, qlora: bool) -> None:
    import torch
    import torch.distributed as dist
    import transformers as T

    import graphadapt as ga

    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else 0

    def build():
        torch.manual_seed(0)
        cfg = T.LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=128)
        return ga.apply(T.LlamaForCausalLM(cfg), ga.LoRA(r=8, targets=("all-linear",)),
                        quantize="nf4" if qlora else None)

    def packed_bytes(adapted) -> int:  # this rank's bytes of the 4-bit linears (local shards when sharded)
        from graphadapt.quantized import PACKED

        total = 0
        for m in adapted.modules():
            if isinstance(m, PACKED):
                for t in [*m._parameters.values(), *m._buffers.values()]:
                    if t is not None and t is not m._parameters.get("bias"):
                        t = t.to_local() if hasattr(t, "to_local") else t
                        total += t.numel() * t.element_size()
        return total

    gc.collect()
    start = _status("VmRSS")  # torch, transformers and the process group, before any weight
    adapted = build()
    params = sum(p.numel() * p.element_size() for p in adapted.parameters())
    params += packed_bytes(adapted)
    if qlora and not sharded:  # the dense source model is not the packed base's: drop it, as shard() does
        for attr in ("_source_model", "_signature_variants"):
            adapted.__dict__.pop(attr, None)
    model = ga.shard(adapted) if sharded else adapted.train()
    packed = packed_bytes(adapted)
    gc.collect()
    steady = _status("VmRSS")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(rank))
    _reset_peak()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 8000), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    peak = _status("VmHWM")
    print(f"RESULT qlora={qlora} sharded={sharded} rank={rank} weights={params / 2**20:.0f}MiB "
          f"packed_on_rank={packed / 2**20:.1f}MiB "
          f"rss_before_model={start / 2**20:.0f}MiB rss_after_shard={steady / 2**20:.0f}MiB "
          f"step_peak={peak / 2**20:.0f}MiB (over the start: {(steady - start) / 2**20:.0f} / {(peak - start) / 2**20:.0f}MiB)", flush=True)
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    # large blocks from mmap, so a freed all-gather buffer leaves the resident set (glibc otherwise keeps
    # freed heap memory, and the high-water mark counts it as if it were still live)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    q = "1" if "--qlora" in sys.argv else "0"
    runs = [[sys.executable, __file__, WORKER, "0", q],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, WORKER,
             "1", q]]
    for cmd in runs:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=1200)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if out.returncode or not lines:
            raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
        print("\n".join(sorted(lines)))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        worker(sys.argv[2] == "1", sys.argv[3] == "1")
    else:
        main()
