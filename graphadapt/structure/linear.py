"""Normalise linear-like ATen forms to :class:`LinearSite`.

before: ``aten.linear(x, W, b)`` | ``view(x,[-1,in]) → addmm(b, ·, W[in,out]) → view(·,[B,T,out])`` |
        ``mm`` | either followed by ``split``/``slice`` of the output channels (fused QKV)
after:  one ``LinearSite`` per (projection, output slice) with N-d input/output nodes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .types import LinearSite, Unmatched

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default}


def _param(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            t = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target, t
    return None


def _owner(qualname: str) -> str:
    return qualname.rsplit(".", 1)[0] if "." in qualname else ""


def _last_dim(dim, rank) -> bool:
    return rank is not None and dim in (-1, rank - 1)


def _split_slices(out: fx.Node, width: int) -> list[tuple[int, int, fx.Node]] | None:
    """If ``out``'s channels are cut into pieces, return (start, end, node) per piece.

    Forms: ``split``/``split_with_sizes``/``chunk`` on the last dim followed by ``getitem``
    (GPT-2 ``c_attn``, Phi-3 ``gate_up_proj``), or several ``slice`` users on the last dim
    (Phi-3 ``qkv_proj``). Anything else (e.g. a head-interleaved view then split, as in
    GPT-NeoX) is not a contiguous channel split and returns ``None``.
    """
    users = list(out.users)
    rank = len(out.meta["val"].shape) if "val" in out.meta else None
    if not users or rank is None:
        return None
    if all(u.op == "call_function" and u.target == aten.slice.Tensor for u in users):
        pieces = []
        for u in users:
            dim, start, end = (list(u.args[1:4]) + [0, None, None])[:3] if len(u.args) > 1 else (0, None, None)
            step = u.args[4] if len(u.args) > 4 else 1
            if not _last_dim(dim, rank) or step != 1 or not isinstance(start or 0, int) \
                    or not isinstance(end if end is not None else width, int):
                return None
            start = max(0, start or 0)
            end = width if end is None else min(end, width)
            pieces.append((start, end, u))
        pieces.sort(key=lambda p: p[0])
        return pieces if len(pieces) > 1 else None
    if len(users) != 1 or users[0].op != "call_function":
        return None
    u = users[0]
    if u.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
        if not _last_dim(dim, rank):
            return None
        if u.target == aten.split.Tensor:
            size = u.args[1]
            sizes = [min(size, width - i) for i in range(0, width, size)]
        elif u.target == aten.chunk.default:
            n = u.args[1]
            size = -(-width // n)
            sizes = [min(size, width - i) for i in range(0, width, size)]
        else:
            sizes = list(u.args[1])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        got = {}
        for g in u.users:
            if g.op == "call_function" and g.target is operator.getitem:
                got[g.args[1]] = g
        if not got:
            return None
        return [(starts[i], starts[i] + sizes[i], got[i]) for i in sorted(got)]
    return None


def find_linear_sites(gm: fx.GraphModule) -> tuple[list[LinearSite], list[Unmatched]]:
    sites: list[LinearSite] = []
    unmatched: list[Unmatched] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            pw = _param(gm, w)
            if pw is None or pw[1].dim() != 2:
                unmatched.append(Unmatched("linear", n.name, "weight is not a 2-d parameter of the model"))
                continue
            pb = _param(gm, b) if b is not None else None
            name, wt = pw
            site = LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=n,
                              weight=name, bias=pb[0] if pb else None, in_features=wt.shape[1],
                              out_features=wt.shape[0], layout="linear", total_out=wt.shape[0])
        elif n.target in (aten.addmm.default, aten.mm.default):
            if n.target == aten.addmm.default:
                b, x2, w = n.args[0], n.args[1], n.args[2]
            else:
                b, (x2, w) = None, n.args[:2]
            pw = _param(gm, w)
            layout = "conv1d"
            if pw is None and isinstance(w, fx.Node) and w.target == aten.t.default:
                pw, layout = _param(gm, w.args[0]), "linear"
            if pw is None or pw[1].dim() != 2:
                continue  # an activation-activation product, not a projection
            pb = _param(gm, b) if b is not None else None
            name, wt = pw
            inf, outf = (wt.shape[0], wt.shape[1]) if layout == "conv1d" else (wt.shape[1], wt.shape[0])
            x = x2.args[0] if isinstance(x2, fx.Node) and x2.target in _VIEWS else x2
            users = list(n.users)
            out = users[0] if len(users) == 1 and users[0].target in _VIEWS else n
            site = LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=out,
                              weight=name, bias=pb[0] if pb else None, in_features=inf,
                              out_features=outf, layout=layout, total_out=outf)
        elif n.target == aten.matmul.default:
            # ``x @ W.T`` written by hand (Falcon's FalconLinear): matmul with a (transposed) parameter
            x, w = n.args[0], n.args[1]
            layout = "conv1d"
            if isinstance(w, fx.Node) and w.op == "call_function" and w.target in _TRANSPOSES:
                w, layout = w.args[0], "linear"
            pw = _param(gm, w)
            if pw is None or pw[1].dim() != 2:
                continue  # activation @ activation (attention scores), not a projection
            name, wt = pw
            inf, outf = (wt.shape[0], wt.shape[1]) if layout == "conv1d" else (wt.shape[1], wt.shape[0])
            site = LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=n,
                              weight=name, bias=None, in_features=inf, out_features=outf, layout=layout,
                              total_out=outf)
        else:
            continue
        slices = _split_slices(site.output, site.out_features)
        if slices and len(slices) > 1:
            total = site.out_features
            for start, end, node in slices:
                sites.append(LinearSite(
                    name=f"{site.name}[{start}:{end}]", module_path=site.module_path, node=site.node,
                    input=site.input, output=site.output, weight=site.weight, bias=site.bias,
                    in_features=site.in_features, out_features=end - start, layout=site.layout,
                    out_slice=(start, end), total_out=total, split_output=node))
        else:
            sites.append(site)
    return sites, unmatched
