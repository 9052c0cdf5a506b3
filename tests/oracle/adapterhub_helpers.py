"""Helpers shared by the AdapterHub oracle tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from helpers import t5_inputs, text_inputs


@torch.no_grad()
def randomize_adapterhub(model, name: str = "a", seed: int = 0) -> int:
    """Non-zero random values in every AdapterHub tensor of adapter ``name`` (shared PHM parameters
    included, under any model prefix); returns how many tensors were set."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".adapters.{name}." not in f".{pname}" and f"shared_parameters.{name}." not in pname:
            continue
        if "norm" in pname:  # LayerNorm-like: stay near 1 / 0
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if pname.endswith("weight")
                    else 0.2 * torch.randn(p.shape, generator=g))
        elif pname.endswith("scaling"):
            p.copy_(0.5 + 2.0 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        assert (p != 0).all(), pname
        n += 1
    return n


def oracle_inputs(kind: str) -> dict:
    """Padded inputs with batch/sequence sizes the capture never used (capture: batch 2, sequence 9)."""
    if kind == "t5":
        out = t5_inputs(batch=3, seq=6, dec_seq=4, seed=7)
        out["attention_mask"] = text_inputs(3, 6, seed=7, pad=2)["attention_mask"]
        return out
    out = text_inputs(batch=3, seq=6, seed=7, pad=2)
    if kind in ("gpt2", "llama"):
        out["use_cache"] = False
    return out
