"""Cost of the ONNX lowering of grouped expert products (``passes/experts.py``), in PyTorch.

The captured graph runs transformers' grouped product (every routed row through its own expert);
the lowered graph (what ``export_onnx`` exports) multiplies every routed row by every expert and
selects. Prints forward times of both on a Mixtral-style model and their ratio. CPU, one thread.

    PYTHONPATH=. python benchmarks/bench_moe.py [--experts 8] [--hidden 256] [--tokens 512]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as T

from graphadapt.capture import capture
from graphadapt.exporters.dtype import converted_copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = T.MixtralConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = T.MixtralModel(cfg).eval()
    ids = torch.randint(0, 1000, (1, args.tokens))
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    grouped = capture(model, example_kwargs=inp)
    lowered = converted_copy(grouped, torch.float32, inp)

    def timed(m):
        with torch.no_grad():
            m(**inp)
            best = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = m(**inp).last_hidden_state
                best = min(best, time.perf_counter() - t)
        return best, out

    tg, og = timed(grouped)
    tl, ol = timed(lowered)
    print(f"experts {args.experts} top-{args.top_k} hidden {args.hidden} intermediate {args.intermediate} "
          f"tokens {args.tokens}")
    print(f"grouped (captured) {tg * 1e3:.1f} ms   lowered (export form) {tl * 1e3:.1f} ms   ratio {tl / tg:.2f}x   "
          f"max |diff| {(og - ol).abs().max().item():.2e}")
    print(f"expert FLOPs: lowered/grouped = E = {args.experts}x (every routed row through every expert)")


if __name__ == "__main__":
    main()
