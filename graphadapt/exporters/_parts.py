"""Run an ONNX file in onnxruntime part by part, so a check never holds all its weights at once.

``(model.onnx, feeds) → outputs``, like one session, but the graph's nodes (already in
topological order) are cut into consecutive parts whose initializers add up to at most a
budget; each part runs in its own session, which is dropped before the next one loads.
Values crossing a cut are passed from one part's outputs to the next part's inputs and
released after their last reader. Every node of the file runs exactly once, with the file's
own weights (read through its external data, never rewritten): it is the same computation,
only split between sessions (graph fusions cannot cross a cut: outputs agree to rounding).
Why: onnxruntime's CPU session for an fp16 model adds fp32 copies of the weights (its cast
insertion for fp16 MatMul, constant-folded): 1.8-2x the fp16 weights measured, which for a 7B
model does not fit beside the PyTorch model on a 24 GB machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

# Below this many bytes of weights the file runs in one session (every test model does).
PARTS_ABOVE = 256 << 20
# Parts per file when the budget is not given (the session's extra memory falls by about this
# factor), each reading at most PART_CAP bytes of weights (a 7B fp16 model: 13 parts).
PARTS = 8
PART_CAP = 1 << 30


def _tensor_bytes(t) -> int:
    from onnx import helper

    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # noqa: BLE001 - dtypes numpy lacks (bf16 is 2 bytes, 8-bit floats 1)
        itemsize = 2
    return itemsize * math.prod(t.dims)


def _reads(node) -> set[str]:
    """Names a node reads, including outer-scope names used inside its If/Loop/Scan bodies."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            defined = {v.name for v in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                defined |= set(inner.output)
            for inner in g.node:
                names |= _reads(inner) - defined
            names |= {v.name for v in g.output} - defined
    return names


def plan_parts(graph, budget: int) -> list[list[int]]:
    """Consecutive node index ranges, each reading at most ``budget`` bytes of initializers
    (a node that alone reads more gets a part of its own)."""
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    parts: list[list[int]] = []
    current: list[int] = []
    held: set[str] = set()
    total = 0
    for i, node in enumerate(graph.node):
        weights = {r for r in _reads(node) if r in sizes}
        extra = sum(sizes[w] for w in weights - held)
        if current and total + extra > budget:
            parts.append(current)
            current, held, total = [], set(), 0
            extra = sum(sizes[w] for w in weights)
        current.append(i)
        held |= weights
        total += extra
    if current:
        parts.append(current)
    return parts


def default_budget(graph) -> int | None:
    """Bytes of weights per part, or None to run the whole file in one session."""
    sizes = [_tensor_bytes(t) for t in graph.initializer]
    total = sum(sizes)
    if total <= PARTS_ABOVE:
        return None
    return max(max(sizes), min(total // PARTS, PART_CAP))


def run_in_parts(model, feeds: dict[str, np.ndarray], budget: int,
                 session: Callable[[bytes], object]) -> tuple[list[np.ndarray], list[str], list[str], int]:
    """Run ``model`` (the file's ModelProto, loaded without its external data) on ``feeds``;
    ``session(model_bytes)`` opens an onnxruntime session for one part, resolving external data
    beside the file. Returns (outputs, output names, providers, number of parts)."""
    from onnx import ValueInfoProto, helper

    graph = model.graph
    parts = plan_parts(graph, budget)
    init_by_name = {t.name: t for t in graph.initializer}
    out_names = [v.name for v in graph.output]
    reads = [_reads(n) for n in graph.node]
    last_read: dict[str, int] = {}
    for k, idxs in enumerate(parts):
        for i in idxs:
            for r in reads[i]:
                last_read[r] = k
    values: dict[str, np.ndarray] = dict(feeds)
    providers: list[str] = []
    for k, idxs in enumerate(parts):
        nodes = [graph.node[i] for i in idxs]
        produced = {o for n in nodes for o in n.output if o}
        needed = set().union(*(reads[i] for i in idxs)) - produced
        inputs = sorted(r for r in needed if r not in init_by_name)
        missing = [r for r in inputs if r not in values]
        if missing:
            raise KeyError(missing[0])
        wanted = [o for n in nodes for o in n.output if o and (last_read.get(o, -1) > k or o in out_names)]
        part_graph = helper.make_graph(
            nodes, f"{graph.name}_part{k}",
            [helper.make_tensor_value_info(r, helper.np_dtype_to_tensor_dtype(values[r].dtype),
                                           [None] * values[r].ndim) for r in inputs],
            [ValueInfoProto(name=o) for o in wanted],
            [init_by_name[r] for r in sorted(needed) if r in init_by_name],
        )
        part = helper.make_model(part_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        part.functions.extend(model.functions)
        sess = session(part.SerializeToString())
        del part, part_graph
        results = sess.run(wanted, {r: values[r] for r in inputs})
        providers = providers or list(sess.get_providers())
        del sess
        values.update(zip(wanted, results))
        for name in [n for n in values if last_read.get(n, -1) <= k and n not in out_names]:
            del values[name]
    return [values[n] for n in out_names], out_names, providers, len(parts)


def can_split(model) -> bool:
    """Whether the file's graph can run in parts: every output comes from a node, no sparse initializers."""
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    return not graph.sparse_initializer and all(v.name in produced for v in graph.output)


def graph_inputs(model) -> Iterable[str]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits]
