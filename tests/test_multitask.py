"""MultiTask (AdapterHub's block): rows routed to their task's adapter by a ``task_ids`` input (no base id).

Every row must equal the model with only its task's adapter active, for MTL-LoRA tasks (gathered through their
``routed_form``), a gated MTL-LoRA (the selection fallback) and a bottleneck, in PyTorch and onnxruntime;
gradients reach only each row's task adapter; bad ids are named. AdapterHub parity: tests/oracle/
test_adapterhub_mtl_lora_oracle.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.composition.route import LinearRoute, ResidualRoute  # noqa: E402
from graphadapt.contract import InputError  # noqa: E402
from graphadapt.errors import SpecError  # noqa: E402
from helpers import text_inputs, tiny_bert  # noqa: E402

TASKS = ("t0", "t1", "gated", "seq")
ADAPTERS = {
    "t0": ga.MTLLoRA(r=4, n_up_projection=3, weights_sharpness=0.5, targets=("q", "v")),
    "t1": ga.MTLLoRA(r=2, n_up_projection=2, targets=("q", "v", "o")),
    "gated": ga.MTLLoRA(r=2, use_gating=True, targets=("v", "o")),
    "seq": ga.SeqBn(reduction_factor=4),
}
IDS = torch.tensor([0, 1, 2, 3, 1, 0])


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    adapted = ga.apply(model, ga.Spec(dict(ADAPTERS), active=ga.MultiTask(*TASKS)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    adapted.eval()
    batch = text_inputs(len(IDS), 6, pad=2)
    refs = {}
    for i, n in enumerate(TASKS):
        adapted.set_active(n)
        refs[i] = adapted(**batch).last_hidden_state.detach()
    plain = model(**batch).last_hidden_state.detach()
    adapted.set_active(ga.MultiTask(*TASKS))
    return adapted, batch, refs, plain


def _run(adapted, batch, ids):
    return adapted(**batch, task_ids=ids).last_hidden_state


def test_rows_equal_their_task_adapter(bert):
    adapted, batch, refs, plain = bert
    assert adapted.input_names[-1] == "task_ids" and "adapter_ids" not in adapted.input_names
    kinds = {type(m) for m in adapted.modules()}
    assert LinearRoute in kinds and ResidualRoute in kinds
    with torch.no_grad():
        out = _run(adapted, batch, IDS)
        by_name = _run(adapted, batch, [TASKS[i] for i in IDS.tolist()])  # AdapterHub's list-of-names form
    torch.testing.assert_close(by_name, out, atol=0, rtol=0)
    for row, i in enumerate(IDS.tolist()):
        assert (refs[i][row] - plain[row]).abs().max() > 1e-3, TASKS[i]  # each task changes its rows
        torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_rows_tasks(bert):
    adapted, batch, _, _ = bert
    adapted.train()
    try:
        adapted.zero_grad()
        _run(adapted, batch, torch.tensor([1, 1, 2, 1, 2, 1])).pow(2).mean().backward()
        grads = {}
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                grads.setdefault(n.split(".")[1], []).append(0.0 if p.grad is None else float(p.grad.abs().sum()))
        assert sum(grads["t1"]) > 0 and sum(grads["gated"]) > 0
        assert sum(grads["t0"]) == 0 and sum(grads["seq"]) == 0
    finally:
        adapted.zero_grad()
        adapted.eval()


@pytest.mark.parametrize("ids,match", [
    (None, "pass task_ids"),
    (torch.tensor([0, 1, -1, 0, 0, 0]), "holds -1, outside \\[0, 3\\]"),
    (torch.tensor([0, 1, 4, 0, 0, 0]), "holds 4, outside \\[0, 3\\]"),
    (torch.zeros(3, dtype=torch.long), "3 entries but the batch has 6"),
    (torch.tensor([0.0, 1, 0, 0, 0, 0]), "integers"),
    (["t0", "t9", "t0", "t0", "t0", "t0"], "'t9'"),
])
def test_bad_task_ids_are_named(bert, ids, match):
    adapted, batch, _, _ = bert
    with pytest.raises(InputError, match=match):
        adapted(**batch) if ids is None else _run(adapted, batch, ids)


def test_onnx_export_takes_task_ids(bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from graphadapt.exporters import DEFAULT_TOLERANCES

    adapted, batch, refs, _ = bert
    path = tmp_path / "mt.onnx"
    report = ga.export_onnx(adapted, path, example_inputs={**batch, "task_ids": IDS}, verify=False)
    assert "task_ids" in report.input_names and "adapter_ids" not in report.input_names
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    atol, rtol = DEFAULT_TOLERANCES[torch.float32]
    for ids in (IDS, torch.flip(IDS, [0])):
        got = sess.run(["last_hidden_state"], {**{k: v.numpy() for k, v in batch.items()}, "task_ids": ids.numpy()})[0]
        for row, i in enumerate(ids.tolist()):
            torch.testing.assert_close(torch.from_numpy(got[row]), refs[i][row], atol=atol, rtol=rtol)


def test_verification_inputs_draw_task_ids():
    from graphadapt.exporters.verify import _make_input

    ids = _make_input("task_ids", (9,), torch.int64, IDS, None, torch.Generator())
    assert ids.min() == 0 and ids.max() == len(TASKS) - 1


def test_multitask_spec_checks(bert):
    with pytest.raises(SpecError, match="twice"):
        ga.MultiTask("a", "a")
    with pytest.raises(SpecError, match="adapter names only"):
        ga.MultiTask("a", ga.Stack("b", "c"))
    with pytest.raises(SpecError, match="cannot contain a MultiTask"):
        ga.Stack("a", ga.MultiTask("b", "c"))
    with pytest.raises(SpecError, match="MultiTask routes adapters at linear sites and residual points only"):
        ga.plan(tiny_bert(), ga.Spec({"t0": ADAPTERS["t0"], "p": ga.PrefixTuning()}, active=ga.MultiTask("t0", "p")))
    block = ga.MultiTask("t0", "t1")
    assert ga.Spec(dict(ADAPTERS), active=block).to_dict()["active"] == {"multi_task": ["t0", "t1"]}
    assert ga.Spec.from_dict(ga.Spec(dict(ADAPTERS), active=block).to_dict()).composition == block
    adapted, batch, _, _ = bert
    adapted, batch, refs, _ = bert
    try:  # leaving MultiTask drops task_ids; Route brings adapter_ids instead (a bottleneck left dormant beside it)
        adapted.set_active(ga.Route("t0", "t1"))
        assert "adapter_ids" in adapted.input_names and "task_ids" not in adapted.input_names
        with torch.no_grad():
            out = adapted(**batch, adapter_ids=torch.zeros(len(IDS), dtype=torch.long)).last_hidden_state
        torch.testing.assert_close(out, refs[0], atol=1e-5, rtol=1e-5)
    finally:
        adapted.set_active(ga.MultiTask(*TASKS))
    assert adapted.input_names[-1] == "task_ids"


def test_several_heads_at_once_and_average_head():
    """AdapterHub's flexible heads (no AdapterHub needed; parity: tests/oracle/test_adapterhub_heads_oracle.py): a
    list of active heads or a BatchSplit of heads gives a MultiHeadOutput; average_head is Σ wᵢ·headᵢ."""
    from graphadapt.heads import MultiHeadOutput, add_head, head_config

    m = add_head(tiny_bert(), "classification", "h1", num_labels=3)
    m.add_head("h2", head_config("classification", num_labels=3), seed=1)
    m.add_head("tag", head_config("tagging", num_labels=5), seed=2)
    m.eval()  # dropout off: the outputs are compared
    x = text_inputs(3, 6)
    with torch.no_grad():
        single = {n: m.heads[n] for n in ("h1", "h2")}
        outs = {}
        for n in ("h1", "h2", "tag"):
            m.active_head = n
            outs[n] = m(**x).logits
        m.active_head = ["h1", "tag"]
        both = m(**x)
        m.active_head = ga.BatchSplit("h1", "h2", batch_sizes=[1, 2])
        split = m(**x)
    assert isinstance(both, MultiHeadOutput) and isinstance(split, MultiHeadOutput)
    torch.testing.assert_close(both[0].logits, outs["h1"])
    torch.testing.assert_close(both[1].logits, outs["tag"])
    torch.testing.assert_close(split.logits, torch.cat([outs["h1"][:1], outs["h2"][1:]]))
    assert (outs["h1"] - outs["h2"]).abs().max() > 1e-4
    m.average_head("avg", ["h1", "h2"], weights=[1, 3], set_active=True)
    for k, v in m.heads["avg"].state_dict().items():
        torch.testing.assert_close(v, 0.25 * single["h1"].state_dict()[k] + 0.75 * single["h2"].state_dict()[k])
    with pytest.raises(SpecError, match="different configurations"):
        m.average_head("bad", ["h1", "tag"])
    m.active_head = ["h1", "nope"]
    with pytest.raises(SpecError, match="names no head"):
        m(**x)


def test_generate_routes_rows_by_task_ids():
    """``adapted.generate(..., task_ids=...)`` decodes each prompt with its own task's adapter: the same tokens as
    that task's adapter alone; a bad id is named."""
    from helpers import perturb_adapters, tiny_llama

    model = tiny_llama(causal_lm=True).eval()
    spec = ga.Spec({"a": ga.MTLLoRA(r=2, targets=("q", "v")), "b": ga.MTLLoRA(r=2, targets=("q", "v"))},
                   active=ga.MultiTask("a", "b"))
    adapted = ga.apply(model, spec)
    perturb_adapters(adapted, seed=3, std=0.5, replace=True)
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    out = adapted.generate(ids, max_new_tokens=6, eos_token_id=[], task_ids=["b", "a"])
    alone = {}
    for name in ("a", "b"):
        adapted.set_active([name])
        alone[name] = adapted.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out[0], alone["b"][0]) and torch.equal(out[1], alone["a"][1])
    assert not torch.equal(alone["a"], alone["b"])                    # the tasks decode differently
    adapted.set_active(ga.MultiTask("a", "b"))
    with pytest.raises(InputError):
        adapted.generate(ids, max_new_tokens=2, task_ids=[0, 5])
