"""Methods as plugins: toy methods living outside the package are one folder plus one registry entry each —
a linear-site one (tests/plugins/channel_scale, fused projections included) and a residual-site one
(tests/plugins/residual_scale) — and apply, plan, merge, save/load, composition and ONNX export work on them
with no graphadapt file changed. Also: the plan is data, the pass contract, typed records and node annotations,
the registry's errors, and the guard that keeps method names (and their parameters) inside method folders."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import graphadapt as ga
from graphadapt import methods
from graphadapt.plan import PlanMode
from graphadapt.passes import AdapterRecord, PassResult, SiteAnnotation, annotation_of, run_pass
from graphadapt.vocab import SiteKind

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "plugins"))
sys.path.insert(0, str(HERE))
from channel_scale import ChannelScale, ChannelScaleMethod  # noqa: E402
from residual_scale import ResidualScale, ResidualScaleMethod  # noqa: E402
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
    assert methods.get_method("residual_scale").__class__ is ResidualScaleMethod
    # nothing in the package names the toy methods: they really live in their own folders
    assert not any("channel_scale" in p.read_text() or "residual_scale" in p.read_text() for p in PKG.rglob("*.py"))


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


def test_toy_linear_plugin_on_a_fused_projection_merges_exactly():
    """GPT-2's c_attn is one [in, 3·out] Conv1D weight: q and v are slices of it. The toy module only
    subclasses SlicedSiteModule and passes the site's slice on; the k channels stay bit-identical."""
    model, inputs = tiny_gpt2(), text_inputs(2, 6)
    base = _out(model, inputs)
    adapted = ga.apply(model, ga.Spec({"cs": ChannelScale(targets=("q", "v"))}))
    assert {r.site.rsplit(".", 1)[-1] for r in adapted.adapter_records} == {"q", "v"}
    assert all(r.layout == "conv1d" and r.kind == SiteKind.LINEAR for r in adapted.adapter_records)
    torch.testing.assert_close(_out(adapted, inputs), base, atol=0, rtol=0)
    _randomize(adapted)
    adapted.eval()
    unmerged = _out(adapted, inputs)
    assert (unmerged - base).abs().max() > 1e-2
    w_name = adapted.adapter_records[0].weight
    before = adapted.get_parameter(w_name).detach().clone()
    report = adapted.merge()
    assert sorted(report.folded) == sorted(r.target for r in adapted.adapter_records) and not report.kept
    torch.testing.assert_close(_out(adapted, inputs), unmerged, atol=1e-5, rtol=1e-5)
    after = adapted.get_parameter(w_name).detach()
    d = before.shape[1] // 3  # [in, q | k | v]: the k block is untouched, q and v changed
    assert torch.equal(after[:, d:2 * d], before[:, d:2 * d])
    assert not torch.equal(after[:, :d], before[:, :d]) and not torch.equal(after[:, 2 * d:], before[:, 2 * d:])
    adapted.unmerge()
    assert torch.equal(adapted.get_parameter(w_name), before)


def test_toy_residual_plugin_apply_merge_refused_save_load_compose(tmp_path):
    model, inputs = tiny_bert(), text_inputs(2, 7)
    base = _out(model, inputs)
    adapted = ga.apply(model, ga.Spec({"rs": ResidualScale(position="mh")}))
    recs = adapted.adapter_records
    assert len(recs) == 2 and {(r.kind, r.role, r.placement) for r in recs} == {(SiteKind.RESIDUAL, "mh", "post_ln")}
    torch.testing.assert_close(_out(adapted, inputs), base, atol=0, rtol=0)  # gain 0: identity, bit-exact
    _randomize(adapted)
    adapted.eval()
    unmerged = _out(adapted, inputs)
    assert (unmerged - base).abs().max() > 1e-2
    # the typed annotation on the node it inserted
    nodes = [n for n in adapted.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.rs.")]
    assert len(nodes) == 2 and all(annotation_of(n) == SiteAnnotation(n.target.split(".", 2)[2], SiteKind.RESIDUAL)
                                   for n in nodes)
    # no weight to fold into: merge keeps it and says why
    report = adapted.merge()
    assert not report.folded and set(report.kept) == {r.target for r in recs}
    assert all("residual point" in why for why in report.kept.values())
    adapted.unmerge()
    adapted.save_adapters(tmp_path / "ckpt")
    again = ga.load(tiny_bert(), tmp_path / "ckpt")
    torch.testing.assert_close(_out(again.eval(), inputs), unmerged, atol=0, rtol=0)
    # the residual-site protocol (pre/core/post) lets a composition block drive it next to a bottleneck adapter
    spec = ga.Spec({"rs": ResidualScale(position="output", init=0.5), "bn": ga.SeqBn(reduction_factor=8)},
                   active=ga.Stack("rs", "bn"))
    stacked = ga.apply(model, spec)
    _randomize(stacked, seed=3)
    stacked.eval()
    both = _out(stacked, inputs)
    stacked.set_active("bn")
    only_bn = _out(stacked, inputs)
    assert torch.isfinite(both).all() and (both - only_bn).abs().max() > 1e-3


@pytest.fixture(scope="module")
def toy_onnx_exports(tmp_path_factory):
    """One GPT-2 with both toys (fused q/v slices and o for the linear toy; the FFN residual point for the
    residual one), exported unmerged and merged."""
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("toys")
    adapted = ga.apply(tiny_gpt2(), ga.Spec({"cs": ChannelScale(targets=("q", "v", "o"), init=0.25),
                                             "rs": ResidualScale(init=0.5)}))
    return {merge: ga.export_onnx(adapted, tmp / f"m{merge}.onnx", merge=merge, verify=True) for merge in (False, True)}


@pytest.mark.parametrize("merge", [False, True])
def test_toy_plugins_export_to_onnx(toy_onnx_exports, merge):
    rep = toy_onnx_exports[merge]
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
    assert all(c.mode is PlanMode.CHAIN and c.kind is SiteKind.LINEAR for c in shared.values())
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
# files that speak an external format's vocabulary (AdapterHub's ``architecture: "lora"``, its ``loras`` keys), which
# coincides with our method names; not a dispatch on ours
_EXTERNAL_VOCABULARY = {"checkpoints/adapterhub.py", "methods/adapterhub_loras.py"}
_GENERIC = {"weight", "bias", "scale", "scaling", "gate", "active", "dropout"}


def _folder_of(plugin) -> str | None:
    parts = type(plugin).__module__.split(".")
    return parts[2] if parts[:2] == ["graphadapt", "methods"] and len(parts) > 3 or (
        parts[:2] == ["graphadapt", "methods"] and len(parts) == 3 and parts[2] not in ("base", "registry")) else None


def _vocabulary() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per built-in method folder: (names: the method name and every class it defines; parameters: the attribute
    names of its parameters/buffers and its ``use_*`` flags). Names shared by several folders (``use_gating``,
    AdapterHub's gate option) are options, not a method's own."""
    names: dict[str, set[str]] = {}
    params: dict[str, set[str]] = {}
    for plugin in methods.registered():
        folder = _folder_of(plugin)
        if folder is None:
            continue
        n, p = names.setdefault(folder, {plugin.name}), params.setdefault(folder, set())
        for path in (PKG / "methods" / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    n.add(node.name)
                elif isinstance(node, ast.Assign):
                    call = node.value if isinstance(node.value, ast.Call) else None
                    is_param = call is not None and getattr(call.func, "attr", getattr(call.func, "id", "")) == "Parameter"
                    for t in node.targets:
                        if isinstance(t, ast.Attribute) and (is_param or t.attr.startswith("use_")):
                            p.add(t.attr)
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("register_parameter",
                                                                                       "register_buffer"):
                    if node.args and isinstance(node.args[0], ast.Constant):
                        p.add(node.args[0].value)
    names.setdefault("lora", set()).add("dora")
    for table in (names, params):
        count: dict[str, int] = {}
        for v in table.values():
            for x in v:
                count[x] = count.get(x, 0) + 1
        for k in table:
            table[k] = {x for x in table[k] if count[x] == 1 and x not in _GENERIC and not x.startswith("_")}
    return names, params


def _owner(table: dict[str, set[str]], word: str) -> str | None:
    return next((f for f, v in table.items() if word in v), None)


def test_no_module_outside_a_method_folder_names_a_method_or_its_parameters():
    """Dispatch on methods lives in the registry and the module protocols: a module outside
    ``graphadapt/methods/<m>/`` neither imports a method folder, nor names a method or one of its classes, nor
    touches a method's parameters or flags by attribute name (``lora_A``, ``ia3_l``, ``use_dora``…), nor compares
    with, keys on or passes such a word as a string (``getattr(mod, "lora_A")``). Inside a method folder, another
    method is used only through the registry (no import of its folder, none of its classes or parameters)."""
    names, params = _vocabulary()
    assert {"lora_A", "lora_B", "use_dora"} <= params["lora"] and "ia3_l" in params["ia3"]  # the guard sees them
    assert "BottleneckAdapter" in names["bottleneck"] and "lora" in names["lora"]
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        own = rel.parts[1] if rel.parts[0] == "methods" and len(rel.parts) > 2 else None
        if rel.name in _FACADE and len(rel.parts) == 1 or rel.as_posix() == "methods/__init__.py":
            continue
        tree = ast.parse(path.read_text())
        external = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.level == 0 and not (node.module or "").startswith("graphadapt") for a in node.names}
        strings_checked = own is None and rel.as_posix() not in _EXTERNAL_VOCABULARY

        def flag(word, lineno, how, tables):
            for table in tables:
                owner = _owner(table, word)
                if owner is not None and owner != own:
                    offenders.append(f"{rel}:{lineno} {how} {word!r} ({owner})")

        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                for part in ([mod] if mod else []) + [a.name for a in node.names]:
                    for w in part.split("."):
                        if w not in external:
                            flag(w, node.lineno, "imports", (names,))
            elif isinstance(node, ast.Name) and node.id not in external and node.id not in _BUILTIN:
                flag(node.id, node.lineno, "names", (names,))  # a class (a local variable may be called ``bottleneck``)
            elif isinstance(node, ast.Attribute):
                flag(node.attr, node.lineno, "touches attribute", (params,))
            elif strings_checked and isinstance(node, ast.Constant) and isinstance(node.value, str):
                flag(node.value, node.lineno, "spells", (names, params))
    assert not offenders, offenders


def test_typed_layers_services_tree_and_module_protocols():
    """The typed data between layers: services injected (no hook registry), the composition tree as typed nodes
    (BatchSplit and Parallel one node type), and the merge fast path asked of the module (``low_rank_delta``)."""
    import graphadapt.model as model_mod
    from graphadapt.api import SERVICES
    from graphadapt.composition.site import FuseNode, Leaf, SplitNode, StackNode, prune
    from graphadapt.passes.modules import LowRankDelta, low_rank_delta

    assert not hasattr(model_mod, "EXTENSIONS")
    adapted = ga.apply(tiny_bert(), ga.LoRA(r=2, targets=("q",)))
    assert adapted.services is SERVICES and SERVICES.recapture is ga.apply
    bare = model_mod.AdaptedModel.__new__(model_mod.AdaptedModel)  # no services injected
    with pytest.raises(ga.GraphAdaptError, match="without the generate service"):
        model_mod.ModelServices().need("generate", "graphadapt.generation")
    assert bare.services.generate is None

    block = ga.Stack("a", ga.Fuse("b", "c"), ga.BatchSplit("a", "c", batch_sizes=[1, 2]))
    tree = prune(block, {"a", "c"})
    assert isinstance(tree, StackNode) and tree.children[0] == Leaf("a")
    assert isinstance(tree.children[1], FuseNode) and tree.children[1].names == ("c",)
    split = tree.children[2]
    assert isinstance(split, SplitNode) and split.label == "BatchSplit" and split.bounds(3) == [(0, 1), (1, 3)]
    assert tree.describe() == "Stack(a, Fuse(c), BatchSplit(a, c))"
    with pytest.raises(ValueError, match="sum to 3, but the batch has 4 rows"):
        split.bounds(4)
    par = prune(ga.Parallel("a", "b"), {"a"})
    assert par == SplitNode((Leaf("a"), None), channels=2) and par.bounds(4) == [(0, 2), (2, 4)]

    mods = {r.target: adapted.get_submodule(r.target) for r in adapted.adapter_records}
    deltas = [low_rank_delta(m) for m in mods.values()]
    assert deltas and all(isinstance(d, LowRankDelta) and d.scale == 4.0 for d in deltas)  # alpha 8 / r 2
    dora = ga.apply(tiny_bert(), ga.LoRA(r=2, targets=("q",), use_dora=True))
    assert all(low_rank_delta(dora.get_submodule(r.target)) is None for r in dora.adapter_records)
