"""Methods as plugins: a toy method living outside the package (tests/plugins/channel_scale) is one
folder plus one registry entry, and apply, plan, merge, save/load and ONNX export work on it with no
graphadapt file changed. Also: the plan is data, the pass contract, and the registry's errors."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import graphadapt as ga
from graphadapt import methods
from graphadapt.passes import AdapterRecord, PassResult, run_pass

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "plugins"))
sys.path.insert(0, str(HERE))
from channel_scale import ChannelScale, ChannelScaleMethod  # noqa: E402
from helpers import text_inputs, tiny_bert, tiny_gpt2  # noqa: E402

PKG = Path(ga.__file__).resolve().parent


def _randomize(adapted, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_toy_plugin_is_registered_from_outside_the_package():
    assert methods.get_method("channel_scale").__class__ is ChannelScaleMethod
    assert methods.get_method(ChannelScale()).name == "channel_scale"
    # a spec dict / JSON names it like any built-in method
    spec = ga.Spec.from_json(ga.Spec({"cs": ChannelScale(init=0.5)}).to_json())
    assert spec.adapters["cs"] == ChannelScale(init=0.5)
    # nothing in the package names the toy method: it really lives in its own folder
    assert not any("channel_scale" in p.read_text() for p in PKG.rglob("*.py"))


def test_toy_plugin_apply_identity_then_effect_merge_save_load(tmp_path):
    model, inputs = tiny_bert(), text_inputs(2, 7)
    base = _out(model, inputs)
    adapted = ga.apply(model, ga.Spec({"cs": ChannelScale(targets=("o", "down"))}))
    recs = adapted.adapter_records
    assert len(recs) == 4 and {r.method for r in recs} == {"channel_scale"} and {r.role for r in recs} == {"o", "down"}
    assert all(isinstance(r, AdapterRecord) and r.kind == "linear" for r in recs)
    torch.testing.assert_close(_out(adapted, inputs), base, atol=0, rtol=0)  # init 0: identity
    _randomize(adapted)
    adapted.eval()
    unmerged = _out(adapted, inputs)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter does something
    # gradients reach exactly the plugin's parameters
    adapted.train()
    adapted(**inputs).last_hidden_state.sum().backward()
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert grads == {n for n in adapted.trainable_parameters()} and all(n.endswith(".scale") for n in grads)
    adapted.eval()
    # merge through the module's fold: exact and the adapter nodes are gone
    report = adapted.merge()
    assert len(report.folded) == 4 and not report.kept
    torch.testing.assert_close(_out(adapted, inputs), unmerged, atol=1e-5, rtol=1e-5)
    assert not [n for n in adapted.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
    adapted.unmerge()
    # save/load through the registry (spec.json names the method)
    adapted.save_adapters(tmp_path / "ckpt")
    again = ga.load(tiny_bert(), tmp_path / "ckpt")
    torch.testing.assert_close(_out(again.eval(), inputs), unmerged, atol=0, rtol=0)


def test_toy_plugin_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    adapted = ga.apply(tiny_gpt2(), ga.Spec({"cs": ChannelScale(targets=("o",), init=0.25)}))
    for merge in (False, True):
        rep = ga.export_onnx(adapted, tmp_path / f"m{merge}.onnx", merge=merge, verify=True)
        assert rep.verified and rep.merged == merge and max(rep.max_abs_diff.values()) < 1e-4


def test_plan_is_data_and_names_how_shared_sites_combine():
    model = tiny_bert()
    spec = ga.Spec({"a": ga.LoRA(r=2, targets=("q",)), "s": ChannelScale(targets=("q", "o")),
                    "bn": ga.SeqBn()})
    plan = ga.plan(model, spec)
    assert [a.name for a in plan.adapters] == ["a", "s", "bn"]  # linear-site methods before residual ones
    shared = {c.site: c for c in plan.combinations}
    assert len(shared) == 2 and all(c.adapters == ("a", "s") and c.mode == "chain" and c.kind == "linear"
                                    for c in shared.values())
    assert "shared site" in str(plan) and "a → s (chain)" in str(plan)
    # the adapted model keeps the plan it was built from, and its graph follows it: s reads a's output
    adapted = ga.apply(model, spec)
    assert adapted.plan.combinations == plan.combinations
    site = next(iter(shared))
    nodes = {n.target: n for n in adapted.graph.nodes if n.op == "call_module"}
    assert nodes[f"adapters.s.{site}"].args[1] is nodes[f"adapters.a.{site}"]


def test_two_residual_adapters_at_one_point_are_refused_by_the_plan():
    with pytest.raises(ga.SpecError, match="Stack/Parallel") as e:
        ga.plan(tiny_bert(), ga.Spec({"x": ga.SeqBn(), "y": ga.SeqBn()}))
    assert e.value.field == "adapters"


def test_registry_errors_are_clear():
    with pytest.raises(ga.SpecError, match="no registered plugin.*registered: .*lora"):
        methods.get_method("no_such_method")

    class Bad(methods.LinearSiteMethod):
        name = "other_name"
        spec_class = ChannelScale

    with pytest.raises(TypeError, match="differs from its spec's method"):
        methods.register(Bad)

    class Dup(methods.LinearSiteMethod):
        name = "lora"
        spec_class = ga.LoRA

    with pytest.raises(TypeError, match="already registered"):
        methods.register(Dup)


def test_pass_contract_names_the_failing_pass_and_check():
    gm = ga.capture(tiny_bert())

    def sneaky(g):  # adds an adapter call whose result nobody reads
        g.add_submodule("adapters.x.m", torch.nn.Identity())
        node = next(n for n in g.graph.nodes if n.op == "placeholder")
        with g.graph.inserting_after(node):
            g.graph.call_module("adapters.x.m", (node,))
        return PassResult(g, True)

    with pytest.raises(ga.PassError, match=r"`sneaky`.*adapters_connected.*disconnected"):
        run_pass("sneaky", sneaky, gm)
    with pytest.raises(ga.PassError, match="returned dict, not PassResult"):
        run_pass("wrong", lambda g: {}, ga.capture(tiny_bert()))
    with pytest.raises(ga.PassError, match="unknown check"):
        run_pass("typo", lambda g: PassResult(g, False), ga.capture(tiny_bert()), ensures=("lnit",))


_BUILTIN = {m.name for m in methods.registered()} | {"dora"}
_FACADE = {"__init__.py", "demo.py"}  # the public re-exports and the demo's own spec


def test_no_module_outside_a_method_folder_names_a_method():
    """Dispatch on method names lives in the registry: core modules neither import a method folder nor
    compare against / key on a built-in method's name. (checkpoints/adapterhub.py reads AdapterHub's own
    config vocabulary — ``architecture: "lora"`` — which is AdapterHub's word, not a dispatch on ours.)"""
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "methods" and len(rel.parts) > 2 or rel.name in _FACADE and len(rel.parts) == 1:
            continue
        if rel.as_posix() in ("methods/__init__.py", "checkpoints/adapterhub.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else ",".join(a.name for a in node.names)
                names = [a.name for a in node.names]
                if any(f"methods.{b}" in (mod or "") for b in _BUILTIN) or (
                        mod in ("methods", "graphadapt.methods") and set(names) & _BUILTIN):
                    offenders.append(f"{rel}:{node.lineno} imports a method folder")
            if isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    if isinstance(c, ast.Constant) and c.value in _BUILTIN:
                        offenders.append(f"{rel}:{node.lineno} compares with {c.value!r}")
            if isinstance(node, ast.Dict):
                for k in node.keys:
                    if isinstance(k, ast.Constant) and k.value in _BUILTIN:
                        offenders.append(f"{rel}:{node.lineno} keys on {k.value!r}")
    assert not offenders, offenders
