"""Re-target a captured graph from its capture float dtype to fp16/bf16, keeping HF's fp32 islands.

An eager model handles dtype itself. A captured graph (``torch.export(...).module()``)
does not: capture bakes the capture dtype into ``_assert_tensor_metadata`` checks,
``.to(float32)`` casts, factory calls and ``finfo(float32).min`` scalars, and it
specialises away dtype-dependent branches (T5's ``if weight.dtype == fp16: cast``).
:func:`retarget_graph_dtype` rewrites those, by running the graph once on example
inputs so each decision sees the dtypes of the *new* program:

* ``_assert_tensor_metadata`` → removed (it only guards the capture dtype);
* cast to fp32 of an fp16 value → kept (a deliberate upcast: norm statistics, rotary);
* cast to fp32 of a value that is already fp32, or of a factory → cast to fp16
  (at capture it meant "back to the model dtype");
* factory ``dtype=float32`` → fp16; scalars ``±finfo(float32).max/min`` → ``finfo(fp16)``;
* a matmul-like op (linear, matmul, SDPA, conv, norm, adapter ``call_module``) that
  receives fp32 and fp16 float tensors → the fp32 ones are cast to fp16 (repairs
  the specialised-away casts); graph float outputs → fp16.

This keeps HF's fp32 islands (RMSNorm variance, rotary angles) where the graph
shows them, instead of computing every op in fp16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from . import PassResult

aten = torch.ops.aten

_CAST_POSITIONAL = {aten.to.dtype: 1, aten.to.device: 2}
_CAST_KEYWORD = {aten.to.dtype_layout, aten._to_copy.default}
# Ops whose float operands must share a dtype (no type promotion in the kernel).
_SAME_DTYPE_OPS = {
    aten.linear.default,
    aten.matmul.default,
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.baddbmm.default,
    aten.scaled_dot_product_attention.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.convolution.default,
    aten.layer_norm.default,
    aten.group_norm.default,
    aten.native_layer_norm.default,
    aten.batch_norm.default,
    aten.rms_norm.default,
}


def retarget_graph_dtype(
    gm: torch.fx.GraphModule, src: torch.dtype, dst: torch.dtype, example_inputs: dict[str, Any]
) -> torch.fx.GraphModule:
    """Rewrite, in place, a captured graph from ``src`` to ``dst`` float dtype (see module doc).

    ``gm``'s parameters must already be in ``dst``; ``example_inputs`` are keyword
    inputs matching the graph's placeholders by name.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n.target for n in placeholders if n.target not in example_inputs]
    if missing:
        raise ValueError(f"example inputs lack {missing} needed to retarget the graph dtype")
    interp = _Retarget(gm, src, dst)
    with torch.no_grad():
        interp.run(*[example_inputs[n.target] for n in placeholders])
    for n in interp.dead:
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def retarget_dtype_pass(gm: torch.fx.GraphModule, src: torch.dtype, dst: torch.dtype,
                        example_inputs: dict[str, Any]) -> PassResult:
    """:func:`retarget_graph_dtype` under the pass contract (run it with :func:`graphadapt.passes.run_pass`)."""
    before = len(gm.graph.nodes)
    retarget_graph_dtype(gm, src, dst, example_inputs)
    return PassResult(gm, True, {"nodes_before": before, "nodes_after": len(gm.graph.nodes)})


class _Retarget(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, src: torch.dtype, dst: torch.dtype):
        # no value GC: inserted cast nodes are unknown to the interpreter's last-use table
        super().__init__(gm, garbage_collect_values=False)
        self.src, self.dst = src, dst
        self.dead: list[torch.fx.Node] = []
        s, d = torch.finfo(src), torch.finfo(dst)
        self.scalar_map = {s.min: d.min, s.max: d.max, -s.max: -d.max}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function":
            if n.target is aten._assert_tensor_metadata.default:
                self.dead.append(n)  # erased after the run; erasing while iterating is unsafe
                return None
            self._retarget_call(n)
        if n.op in ("call_function", "call_module", "call_method"):
            self._repair_mixed(n)
        if n.op == "output":
            self._cast_outputs(n)
        return super().run_node(n)

    # -- helpers -----------------------------------------------------------
    def _val(self, a: Any) -> Any:
        return self.env.get(a) if isinstance(a, torch.fx.Node) else a

    def _retarget_call(self, n: torch.fx.Node) -> None:
        if n.target in _CAST_POSITIONAL:
            i = _CAST_POSITIONAL[n.target]
            if len(n.args) > i and n.args[i] == self.src and self._is_downcast(n.args[0]):
                n.update_arg(i, self.dst)
        elif n.target in _CAST_KEYWORD:
            if n.kwargs.get("dtype") == self.src and self._is_downcast(n.args[0]):
                n.update_kwarg("dtype", self.dst)
        elif n.kwargs.get("dtype") == self.src:  # factories: full, zeros, arange, scalar_tensor ...
            n.update_kwarg("dtype", self.dst)
        # finfo(src).min as a mask fill would overflow (or error) in dst
        n.args = tuple(self._map_scalar(a) for a in n.args)
        n.kwargs = {k: self._map_scalar(v) for k, v in n.kwargs.items()}

    def _is_downcast(self, arg: Any) -> bool:
        """A cast to ``src`` means "to the model dtype" unless it upcasts a ``dst`` value or an int."""
        v = self._val(arg)
        if not isinstance(v, torch.Tensor):
            return True
        return v.dtype == self.src

    def _map_scalar(self, a: Any) -> Any:
        if isinstance(a, float) and a in self.scalar_map:
            return self.scalar_map[a]
        return a

    def _repair_mixed(self, n: torch.fx.Node) -> None:
        if n.op == "call_function" and n.target not in _SAME_DTYPE_OPS:
            return
        if n.op == "call_method":
            return
        float_args = [
            a for a in n.all_input_nodes if isinstance(self._val(a), torch.Tensor) and self._val(a).is_floating_point()
        ]
        dtypes = {self._val(a).dtype for a in float_args}
        if n.op == "call_module":
            sub = self.module.get_submodule(n.target)
            dtypes |= {p.dtype for p in sub.parameters() if p.is_floating_point()}
        if not (self.src in dtypes and self.dst in dtypes):
            return
        for a in float_args:
            if self._val(a).dtype == self.src:
                n.replace_input_with(a, self._insert_cast(a, n))

    def _insert_cast(self, a: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
        with self.module.graph.inserting_before(before):
            c = self.module.graph.call_function(aten.to.dtype, (a, self.dst))
        self.env[c] = self._val(a).to(self.dst)
        return c

    def _cast_outputs(self, n: torch.fx.Node) -> None:
        def fix(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                v = self._val(a)
                if isinstance(v, torch.Tensor) and v.dtype == self.src:
                    return self._insert_cast(a, n)
            return a

        n.args = torch.fx.node.map_aggregate(n.args, fix)
