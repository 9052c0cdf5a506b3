"""Prefix tuning modules: one pool producing every layer's prefix, one small module per attention core.

``PrefixPool`` (``adapters.<name>.prefix``, called once per forward) returns, per location
(``self_prefix``, ``encoder_prefix``, ``cross_prefix``), a tensor ``[layers·2, kv_heads, P, head_dim]``:
row ``2i`` holds layer ``i``'s keys, ``2i+1`` its values (AdapterHub's and PEFT's layout).
``PrefixAttention`` (``adapters.<name>.<layer>.<location>``) takes its layer's rows, expands them to
the batch, applies dropout and the optional gate, repeats them for grouped-query attention, prepends
them to the core's keys/values and pads the core's masks so every query sees the prefix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graphadapt.init import linear_default_, normal_, uniform_

from graphadapt.methods.activations import ACTIVATIONS

_REFUSAL = ("prefix tuning prepends key/value vectors inside attention; it cannot fold into a weight "
            "(eject_prefix() removes its reparametrisation for inference)")


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class PrefixGenerator(nn.Module):
    """Reparametrised prefix (Li & Liang): ``wte → Linear → act → Linear`` to all layers' keys and values.
    Parameter names follow AdapterHub (``wte``, ``control_trans.0``, ``control_trans.2``)."""

    def __init__(self, prefix_length: int, hidden: int, bottleneck: int, n_layers: int, n_heads: int,
                 head_dim: int, non_linearity: str = "tanh", *, generator=None, dtype=None, device=None):
        super().__init__()
        self.prefix_length, self.n_layers, self.n_heads, self.head_dim = prefix_length, n_layers, n_heads, head_dim
        kw = {"dtype": dtype, "device": device}
        self.wte = nn.Embedding(prefix_length, hidden, **kw)
        self.control_trans = nn.Sequential(nn.Linear(hidden, bottleneck, **kw), _Act(non_linearity),
                                           nn.Linear(bottleneck, n_layers * 2 * n_heads * head_dim, **kw))
        if generator is not None:
            with torch.no_grad():
                normal_(self.wte.weight, 1.0, generator)  # nn.Embedding's default N(0, 1)
                for lin in (self.control_trans[0], self.control_trans[2]):
                    linear_default_(lin.weight, lin.bias, generator)

    def forward(self) -> Tensor:
        kv = self.control_trans(self.wte.weight)  # [P, layers·2·H·d]
        return kv.view(self.prefix_length, self.n_layers * 2, self.n_heads, self.head_dim).permute(1, 2, 0, 3)

    def flat(self) -> FlatPrefix:
        """A :class:`FlatPrefix` holding this generator's current output (same forward)."""
        with torch.no_grad():
            values = self.control_trans(self.wte.weight).reshape(-1).clone()
        out = FlatPrefix(self.prefix_length, self.n_layers, self.n_heads, self.head_dim,
                         dtype=values.dtype, device=values.device)
        with torch.no_grad():
            out.control_trans.copy_(values)
        out.train(self.training)
        return out


class FlatPrefix(nn.Module):
    """Directly learned prefix: ``control_trans`` holds ``[P, layers·2, H, d]`` flattened (AdapterHub's name
    and order; PEFT's ``prompt_embeddings`` ``[P, layers·2·H·d]`` is the same numbers)."""

    def __init__(self, prefix_length: int, n_layers: int, n_heads: int, head_dim: int, *, generator=None,
                 dtype=None, device=None):
        super().__init__()
        self.prefix_length, self.n_layers, self.n_heads, self.head_dim = prefix_length, n_layers, n_heads, head_dim
        self.control_trans = nn.Parameter(torch.empty(prefix_length * n_layers * 2 * n_heads * head_dim,
                                                      dtype=dtype, device=device))
        if generator is not None:
            normal_(self.control_trans.data, 1.0, generator)  # AdapterHub: torch.randn

    def forward(self) -> Tensor:
        return self.control_trans.view(self.prefix_length, self.n_layers * 2, self.n_heads,
                                       self.head_dim).permute(1, 2, 0, 3)


class PrefixPool(nn.Module):
    """Every location's prefix generator; ``forward()`` returns their outputs in ``locations`` order."""

    mergeable = False
    merge_refusal = _REFUSAL

    def __init__(self, generators: dict[str, nn.Module]):
        super().__init__()
        self.locations = tuple(generators)
        self.generators = nn.ModuleDict(generators)

    def forward(self) -> tuple[Tensor, ...]:
        return tuple(self.generators[loc]() for loc in self.locations)

    def eject(self) -> int:
        """Replace every reparametrised generator by a :class:`FlatPrefix` of its output; returns how many."""
        n = 0
        for loc in self.locations:
            gen = self.generators[loc]
            if isinstance(gen, PrefixGenerator):
                self.generators[loc] = gen.flat()
                n += 1
        return n


class PrefixAttention(nn.Module):
    """Prepend one layer's prefix at one attention core: ``(kv, k, v, x, q, masks) → (k', v', *masks')``."""

    mergeable = False
    merge_refusal = _REFUSAL

    def __init__(self, index: int, prefix_length: int, n_rep: int = 1, mask_kinds: tuple[str, ...] = (),
                 dropout: float = 0.0, gate_outputs: int = 0, hidden: int | None = None, *, generator=None,
                 dtype=None, device=None):
        super().__init__()
        self.index, self.prefix_length, self.n_rep = index, prefix_length, n_rep
        self.mask_kinds = tuple(mask_kinds)
        self.dropout = nn.Dropout(dropout)
        self.active = True
        self.gate = nn.Linear(hidden, gate_outputs, dtype=dtype, device=device) if gate_outputs else None
        if self.gate is not None and generator is not None:
            with torch.no_grad():  # AdapterHub: nn.Linear default, then weight ~ N(0, 0.02)
                normal_(self.gate.weight, 0.02, generator)
                bound = 1.0 / math.sqrt(hidden)
                uniform_(self.gate.bias, -bound, bound, generator)

    def _pad(self, m: Tensor | None, kind: str, q: Tensor, k: Tensor, n: int) -> Tensor:
        if m is None:  # the core was is_causal: make the mask explicit (top-left aligned, as SDPA)
            tq, tk = q.shape[-2], k.shape[-2]
            m = torch.ones((tq, tk), dtype=torch.bool, device=k.device).tril()
            kind = "bool"
        if n == 0:
            return m
        shape = tuple(m.shape[:-1]) + (n,)
        if kind == "bool":
            pad = torch.ones(shape, dtype=torch.bool, device=m.device)
        elif kind == "fill":
            pad = torch.zeros(shape, dtype=torch.bool, device=m.device)
        else:
            pad = torch.zeros(shape, dtype=m.dtype, device=m.device)
        return torch.cat([pad, m], dim=-1)

    def forward(self, kv: Tensor, k: Tensor, v: Tensor, x: Tensor | None, q: Tensor | None, masks: list):
        if not self.active:
            return (k, v, *[self._pad(m, kind, q, k, 0) for m, kind in zip(masks, self.mask_kinds)])
        b = k.shape[0]
        pk, pv = kv[2 * self.index], kv[2 * self.index + 1]          # [H_kv, P, d]
        pk = self.dropout(pk.unsqueeze(0).expand(b, -1, -1, -1))
        pv = self.dropout(pv.unsqueeze(0).expand(b, -1, -1, -1))
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x)).mean(dim=1)              # [B, 1 | 2]
            pk = pk * g[:, 0].view(-1, 1, 1, 1)
            pv = pv * g[:, -1].view(-1, 1, 1, 1)
        if self.n_rep > 1:  # grouped-query attention: query heads h·n_rep … share key/value head h
            h, p, d = pk.shape[1:]
            pk = pk.unsqueeze(2).expand(b, h, self.n_rep, p, d).reshape(b, h * self.n_rep, p, d)
            pv = pv.unsqueeze(2).expand(b, h, self.n_rep, p, d).reshape(b, h * self.n_rep, p, d)
        n = pk.shape[2]
        k2 = torch.cat([pk.to(k.dtype), k], dim=2)
        v2 = torch.cat([pv.to(v.dtype), v], dim=2)
        return (k2, v2, *[self._pad(m, kind, q, k, n) for m, kind in zip(masks, self.mask_kinds)])

    def extra_repr(self) -> str:
        return (f"layer_index={self.index}, prefix_length={self.prefix_length}, n_rep={self.n_rep}, "
                f"masks={self.mask_kinds}, gated={self.gate is not None}")


class PositionOffset(nn.Module):
    """PEFT's prefix form: the model's position ids shifted by the prefix length (when active)."""

    mergeable = False
    merge_refusal = _REFUSAL

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset
        self.active = True

    def forward(self, positions: Tensor) -> Tensor:
        return positions + self.offset if self.active else positions

    def extra_repr(self) -> str:
        return f"offset={self.offset}"


__all__ = ["FlatPrefix", "PositionOffset", "PrefixAttention", "PrefixGenerator", "PrefixPool"]
