"""LoRA end to end through ``graphadapt.apply`` on tiny BERT / GPT-2 / Llama.

Parity with PEFT (plain, rsLoRA, DoRA; Conv1D and GQA), identity at init, gradients and
training, the caller's model left alone, RNG isolation and order independence, spec
errors, train/eval and dtype moves, several named adapters, site selection, gating, PiSSA.
Every numeric test sets non-zero adapter weights and asserts that the output moved.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from helpers import max_diff, randomize_lora, output_tensors, run_no_grad, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

ATOL = 1e-5
R, ALPHA = 8, 16


# --------------------------------------------------------------------------- helpers




def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool, int]]:
    return {n: (p.detach().clone(), p.requires_grad, id(p)) for n, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, snap) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for n, (val, rg, pid) in snap.items():
        p = now[n]
        assert id(p) == pid, f"{n}: Parameter object replaced"
        assert p.requires_grad == rg, f"{n}: requires_grad changed"
        assert p.dtype == val.dtype and torch.equal(p.detach(), val), f"{n}: value changed"


def _adapter_params(adapted, name: str | None = None) -> dict[str, torch.Tensor]:
    prefix = "adapters." + (f"{name}." if name else "")
    return {n: p for n, p in adapted.named_parameters() if n.startswith(prefix)}


def _sites(adapted, name: str) -> set[str]:
    return {r.site for r in adapted.adapter_records if r.adapter == name}



def _peft(model, target_modules, seed=0, adapter_name="default", peft_model=None, std=0.1, **cfg):
    """PEFT LoRA on a deepcopy of ``model`` (or a new adapter on ``peft_model``) with random
    non-zero A, B (and DoRA magnitude) for ``adapter_name``; eval mode."""
    config = LoraConfig(r=cfg.pop("r", R), lora_alpha=cfg.pop("lora_alpha", ALPHA),
                        target_modules=list(target_modules), lora_dropout=0.0, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out ... Conv1D" and deprecations
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name=adapter_name)
        else:
            peft_model.add_adapter(adapter_name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in sorted(peft_model.named_parameters()):
            if f".{adapter_name}." not in k:
                continue
            if ".lora_A." in k or ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif ".lora_magnitude_vector." in k:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return peft_model.eval()


_PEFT_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)"
                       r"\.(?P<adapter>[^.]+)\.weight")
_OURS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


def _copy_from_peft(peft_model, adapted, adapter_name="default", ours_name=None) -> int:
    """Copy PEFT's weights of ``adapter_name`` into ours; the two site sets must be identical."""
    ours_name = ours_name or adapter_name
    ours = _adapter_params(adapted, ours_name)
    copied = set()
    with torch.no_grad():
        for k, v in peft_model.state_dict().items():
            m = _PEFT_KEY.fullmatch(k)
            if m is None or m["adapter"] != adapter_name:
                continue
            dst = f"adapters.{ours_name}.{m['path']}.{_OURS[m['kind']]}"
            assert dst in ours, f"PEFT adapts {m['path']}, graphadapt does not ({sorted(ours)[:4]} …)"
            assert ours[dst].shape == v.shape, (dst, ours[dst].shape, v.shape)
            ours[dst].copy_(v)
            copied.add(dst)
    assert copied == set(ours), f"graphadapt-only params: {sorted(set(ours) - copied)}"
    return len(copied)


# --------------------------------------------------------------------------- parity with PEFT
_MODELS = {
    # name: (builder, PEFT target_modules, graphadapt targets)
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"], ("q", "v", "up")),
    # GPT-2 Conv1D: a module-path target on the fused c_attn is one LoRA on the whole projection
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], ("*.c_attn", "o", "down", "up")),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
              ("all-linear",)),
}
_VARIANTS = {
    # name: (PEFT LoraConfig kwargs, graphadapt LoRA kwargs, expected scaling)
    "lora": (dict(), dict(), ALPHA / R),
    "rslora": (dict(use_rslora=True, init_lora_weights="gaussian"), dict(use_rslora=True, init="gaussian"),
               ALPHA / math.sqrt(R)),
    "dora": (dict(use_dora=True), dict(use_dora=True), ALPHA / R),
}


@pytest.mark.parametrize("arch", list(_MODELS))
def test_parity_with_peft(arch):
    """One named adapter per variant (plain, rsLoRA, DoRA) on the same sites, on both sides;
    each compared alone (set_active / set_adapter), in eval mode, on a batch/sequence
    length other than the capture's. One capture per architecture keeps this fast."""
    build, peft_targets, our_targets = _MODELS[arch]
    model = build()
    inputs = text_inputs(batch=3, seq=5, pad=2, seed=7)  # capture used batch 2, seq 9
    base_out = run_no_grad(model, inputs)

    pm = None
    for i, (name, (peft_kw, _, _)) in enumerate(_VARIANTS.items()):
        pm = _peft(model, peft_targets, seed=i, adapter_name=name, peft_model=pm, **peft_kw)
    spec = ga.Spec({name: ga.LoRA(r=R, alpha=ALPHA, targets=our_targets, **kw)
                    for name, (_, kw, _) in _VARIANTS.items()})
    adapted = ga.apply(model, spec).eval()
    n_sites = len(_sites(adapted, "lora"))
    assert n_sites == {"bert": 6, "gpt2": 8, "llama": 14}[arch]
    for name, (_, _, scaling) in _VARIANTS.items():
        n = _copy_from_peft(pm, adapted, name)
        assert n == n_sites * (3 if name == "dora" else 2)
        for r in adapted.adapter_records:
            if r.adapter != name:
                continue
            assert adapted.get_submodule(r.target).scaling == pytest.approx(scaling, rel=0, abs=1e-12)
            peft_layer = pm.base_model.model.get_submodule(r.site)
            assert peft_layer.scaling[name] == pytest.approx(scaling, rel=0, abs=1e-12)
    assert _VARIANTS["lora"][2] == 2.0 and _VARIANTS["dora"][2] == 2.0  # r=8, alpha=16
    assert _VARIANTS["rslora"][2] == pytest.approx(16 / math.sqrt(8))

    outs = {}
    for name in _VARIANTS:
        adapted.set_active(name)
        pm.base_model.set_adapter(name)
        ref, outs[name] = run_no_grad(pm, inputs), run_no_grad(adapted, inputs)
        assert type(outs[name]) is type(base_out)
        assert max_diff(outs[name], ref) <= ATOL, name
        assert max_diff(outs[name], base_out) > 1e-3, name  # the adapter really did something
    assert max_diff(outs["lora"], outs["rslora"]) > 1e-3 and max_diff(outs["lora"], outs["dora"]) > 1e-3

    # All three on the same layers: adapters run in spec order, as PEFT runs its active list;
    # DoRA (last) rescales a result that already holds the plain/rsLoRA deltas.
    adapted.set_active(None)
    pm.base_model.set_adapter(list(_VARIANTS))
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(pm, inputs)) <= ATOL


def test_gpt2_role_targets_touch_only_q_and_v_slices():
    """Roles q, v on the fused c_attn = [q | k | v]: two LoRAs on the q and v column blocks;
    the k block is untouched (reference: the base model with exactly those columns edited)."""
    model = tiny_gpt2()
    d = model.config.n_embd
    adapted = ga.apply(model, ga.LoRA(r=R, alpha=ALPHA, targets=("q", "v"))).eval()
    assert _sites(adapted, "default") == {f"h.{i}.attn.c_attn.{s}" for i in range(2) for s in "qv"}
    randomize_lora(adapted, seed=3)

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for r in adapted.adapter_records:
            mod = adapted.get_submodule(r.target)
            start = {"q": 0, "v": 2 * d}[r.site[-1]]
            assert mod.out_slice == (start, start + d) and mod.total_out == 3 * d and mod.fan_in_fan_out
            delta = mod.delta_weight()  # [in, 3d] in Conv1D layout
            assert delta[:, d:2 * d].abs().max() == 0  # k block untouched
            assert delta[:, start:start + d].abs().max() > 0
            block = mod.scaling * (mod.lora_B @ mod.lora_A).t()
            assert torch.allclose(delta[:, start:start + d], block, atol=0, rtol=0)
            ref.get_submodule(r.site[:-2]).weight[:, start:start + d] += block

    inputs = text_inputs(batch=3, seq=6, seed=11)
    out, want, base = run_no_grad(adapted, inputs), run_no_grad(ref, inputs), run_no_grad(model, inputs)
    assert max_diff(out, want) <= ATOL
    assert max_diff(out, base) > 1e-3


# --------------------------------------------------------------------------- identity / change
def test_identity_at_init_and_nonzero_b_changes_output():
    model = tiny_bert()
    inputs = text_inputs(batch=3, seq=5, pad=1)
    adapted = ga.apply(model, ga.LoRA(r=R, alpha=ALPHA, targets=("q", "k", "v", "o", "up", "down"))).eval()
    params = _adapter_params(adapted)
    assert all(p.abs().max() > 0 for n, p in params.items() if n.endswith("lora_A"))
    assert all(p.abs().max() == 0 for n, p in params.items() if n.endswith("lora_B"))
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(model, inputs)) <= 1e-6

    with torch.no_grad():
        adapted.get_submodule("adapters.default.encoder.layer.0.attention.self.value").lora_B.fill_(0.05)
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(model, inputs)) > 1e-3


# --------------------------------------------------------------------------- gradients / training
def test_gradients_reach_only_adapter_parameters():
    model = tiny_bert()
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q", "v", "down"), init="bert"))
    adapted.train()
    base_names = [n for n, _ in adapted.named_parameters() if not n.startswith("adapters.")]
    adapter = _adapter_params(adapted)
    assert adapter and set(adapted.trainable_parameters()) == set(adapter)
    assert all(p.requires_grad for p in adapter.values())
    base_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if not n.startswith("adapters.")}
    adapter_before = {n: p.detach().clone() for n, p in adapter.items()}

    opt = torch.optim.SGD(adapted.trainable_parameters().values(), lr=0.1)
    out = adapted(**text_inputs(batch=2, seq=6))
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    params = dict(adapted.named_parameters())
    for n in base_names:
        assert params[n].grad is None and not params[n].requires_grad, n
    for n, p in adapter.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
    opt.step()
    params = dict(adapted.named_parameters())
    for n, v in base_before.items():
        assert torch.equal(params[n], v), n
    assert all(not torch.equal(adapter[n], v) for n, v in adapter_before.items())


def test_training_lowers_loss_and_leaves_callers_model_alone():
    """30 Adam steps on a teacher-student regression: the target is the logits of this adapted
    Llama CausalLM (LoRA on q, v) with random LoRA weights (so it is reachable); the student restarts from
    B = 0 with a different A. The caller's model is bit-identical afterwards.

    (Next-token cross-entropy is no good here: with the tiny model's frozen lm_head of std 0.02
    after an RMSNorm, no hidden state can push the loss far below log(vocab).)"""
    model = tiny_llama(causal_lm=True)
    snap = _snapshot(model)
    adapted = ga.apply(model, ga.LoRA(r=8, alpha=16, targets=("q", "v")))
    _assert_unchanged(model, snap)
    adapted.train()
    batch = text_inputs(batch=4, seq=8, seed=5)
    g = torch.Generator().manual_seed(0)
    params = adapted.trainable_parameters()
    with torch.no_grad():
        for n, p in params.items():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        target = adapted(**batch).logits
        for n, p in params.items():
            if n.endswith("lora_B"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        assert (target - model(**batch).logits).abs().max() > 1e-2  # something to learn
    opt = torch.optim.Adam(params.values(), lr=1e-2)

    def loss_fn():
        return (adapted(**batch).logits - target).square().mean()

    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.2 * losses[0], losses  # measured: about 0.04 x
    _assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())


def test_apply_does_not_modify_callers_model():
    model = tiny_gpt2()
    model.h[1].mlp.c_fc.weight.requires_grad_(False)  # a mixed pattern of flags must survive
    snap = _snapshot(model)
    inputs = text_inputs(batch=2, seq=5)
    before = run_no_grad(model, inputs)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v", "o", "*.c_fc")))
    _assert_unchanged(model, snap)
    # adapted holds its own Parameter objects (over the same storage), frozen
    ours = dict(adapted.named_parameters())
    for n, p in model.named_parameters():
        assert ours[n] is not p and not ours[n].requires_grad
    randomize_lora(adapted)
    adapted.train()
    adapted(**inputs).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for p in adapted.trainable_parameters().values())
    _assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert max_diff(run_no_grad(model, inputs), before) == 0


# --------------------------------------------------------------------------- RNG and seeds
def test_rng_isolation_and_order_independence():
    model = tiny_bert()
    la = ga.LoRA(r=4, alpha=8, targets=("q", "v"), init="bert")  # A and B both drawn
    lb = ga.LoRA(r=2, targets=("k", "q"))

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    alone = ga.apply(model, ga.Spec({"a": la}, seed=0))
    assert torch.equal(torch.get_rng_state(), state)
    b_first = ga.apply(model, ga.Spec({"b": lb, "a": la}, seed=0))
    a_first = ga.apply(model, ga.Spec({"a": la, "b": lb}, seed=0))
    seed1 = ga.apply(model, ga.Spec({"a": la}, seed=1))
    assert torch.equal(torch.get_rng_state(), state)

    pa = _adapter_params(alone, "a")
    assert len(pa) == 8
    for other in (b_first, a_first):
        po = _adapter_params(other, "a")
        assert set(po) == set(pa)
        assert all(torch.equal(po[n], pa[n]) for n in pa)
    # different sites draw different weights; seed 0 is a real seed, distinct from seed 1
    a_mats = [p for n, p in pa.items() if n.endswith("lora_A")]
    assert all(not torch.equal(x, y) for i, x in enumerate(a_mats) for y in a_mats[i + 1:])
    p1 = _adapter_params(seed1, "a")
    assert all(not torch.equal(p1[n], pa[n]) for n in pa)
    assert all(p.abs().max() > 0 for p in pa.values())
    # adapter b at q: same site as a, different name -> different weights
    q = "encoder.layer.0.attention.self.query"
    assert not torch.equal(_adapter_params(a_first, "b")[f"adapters.b.{q}.lora_A"][:2],
                           pa[f"adapters.a.{q}.lora_A"][:2])


# --------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize("make", [
    lambda: ga.LoRA(r=0),
    lambda: ga.LoRA(r=-2),
    lambda: ga.LoRA(targets=("query_key",)),  # unknown role
    lambda: ga.LoRA(dropout=1.0),
    lambda: ga.LoRA(dropout=-0.1),
    lambda: ga.Spec({"a": {"method": "lora", "r": 0}}),
], ids=["r0", "r-neg", "unknown-role", "dropout1", "dropout-neg", "dict-r0"])
def test_bad_spec_values_raise_spec_error(make):
    with pytest.raises(ga.SpecError):
        make()


def test_bad_specs_through_apply_leave_model_untouched():
    model = tiny_bert()
    snap = _snapshot(model)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ga.SpecError, match="r"):
        ga.apply(model, {"method": "lora", "r": 0})
    with pytest.raises(ga.SpecError, match="dropout"):
        ga.apply(model, {"method": "lora", "dropout": 1.5})
    with pytest.raises(ga.SpecError) as e:
        ga.apply(model, ga.LoRA(targets=("*.no_such_layer",)))
    assert "*.no_such_layer" in str(e.value)
    assert "encoder.layer.0.attention.self.query" in str(e.value)  # lists what exists
    with pytest.raises(ga.SpecError) as e:
        ga.apply(model, ga.LoRA(targets=("q", "gate")))  # BERT has no gated FFN
    assert "'gate'" in str(e.value) and "Roles found in this model: q, k, v, o, up, down" in str(e.value)
    with pytest.raises(ga.SpecError) as e:
        ga.apply(model, ga.Spec({"ok": ga.LoRA(), "bad": ga.LoRA(targets=("re:nothing.*",))}))
    assert "'bad'" in str(e.value)
    _assert_unchanged(model, snap)
    assert model.training is False
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- modes and dtypes
@pytest.mark.parametrize("where", ["base", "lora"])
def test_train_eval_flip_dropout(where):
    """Dropout in the captured base graph (hidden/attention) and in the LoRA branch both
    follow .train()/.eval()."""
    p_base = 0.2 if where == "base" else 0.0
    model = tiny_bert(hidden_dropout_prob=p_base, attention_probs_dropout_prob=p_base)
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q", "v"), dropout=0.0 if where == "base" else 0.5))
    randomize_lora(adapted, std=0.3)
    inputs = text_inputs(batch=2, seq=6)
    assert not adapted.training
    e1 = run_no_grad(adapted.eval(), inputs)
    adapted.train()
    assert adapted.training and all(m.training for m in adapted.modules())
    t1, t2 = run_no_grad(adapted, inputs), run_no_grad(adapted, inputs)
    assert max_diff(t1, t2) > 1e-4
    adapted.eval()
    assert not any(m.training for m in adapted.modules())
    e2, e3 = run_no_grad(adapted, inputs), run_no_grad(adapted, inputs)
    assert max_diff(e2, e3) == 0 and max_diff(e1, e2) == 0
    assert max_diff(e2, t1) > 1e-4


def test_to_float64_matches_float32():
    model = tiny_llama()
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q", "v", "down"))).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=3, seq=5, pad=2)
    f32 = run_no_grad(adapted, inputs)
    adapted.to(torch.float64)
    f64 = run_no_grad(adapted, inputs)
    assert all(t.dtype == torch.float64 for t in output_tensors(f64))
    assert all(p.dtype == torch.float64 for p in adapted.parameters())
    assert max_diff(f64, f32) <= ATOL
    assert max_diff(f64, run_no_grad(model, inputs)) > 1e-3
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's copy stays


# --------------------------------------------------------------------------- several adapters
def test_several_adapters_match_peft_multi_adapter_and_set_active():
    """Adapters a (q, v) and b (q, rsLoRA, another rank) both on q: all active equals PEFT
    with both active (the sum of the deltas at each layer); set_active switches."""
    model = tiny_bert()
    inputs = text_inputs(batch=3, seq=5, pad=2, seed=2)
    pm = _peft(model, ["query", "value"], adapter_name="a", seed=1)
    pm = _peft(model, ["query"], adapter_name="b", seed=2, peft_model=pm, r=4, lora_alpha=8, use_rslora=True,
               std=0.3)
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(r=8, alpha=16, targets=("q", "v")),
                                       "b": ga.LoRA(r=4, alpha=8, targets=("q",), use_rslora=True)})).eval()
    _copy_from_peft(pm, adapted, "a")
    _copy_from_peft(pm, adapted, "b")
    assert adapted.active_adapters() == ["a", "b"]

    base = run_no_grad(model, inputs)
    pm.base_model.set_adapter(["a", "b"])
    both = run_no_grad(adapted, inputs)
    assert max_diff(both, run_no_grad(pm, inputs)) <= ATOL
    outs = {}
    for name in ("a", "b"):
        adapted.set_active(name)
        assert adapted.active_adapters() == [name]
        pm.base_model.set_adapter(name)
        outs[name] = run_no_grad(adapted, inputs)
        assert max_diff(outs[name], run_no_grad(pm, inputs)) <= ATOL
        assert max_diff(outs[name], base) > 1e-3
    assert max_diff(outs["a"], outs["b"]) > 1e-3 and max_diff(outs["a"], both) > 1e-3
    adapted.set_active([])
    assert adapted.active_adapters() == [] and max_diff(run_no_grad(adapted, inputs), base) == 0
    adapted.set_active(None)
    assert max_diff(run_no_grad(adapted, inputs), both) == 0
    with pytest.raises(ga.GraphAdaptError, match="unknown"):
        adapted.set_active(["c"])


# --------------------------------------------------------------------------- site selection
def test_path_targets_and_layer_selection():
    model = tiny_bert()
    L = "encoder.layer.{}."
    spec = ga.Spec({
        "glob": ga.LoRA(r=2, targets=("*.attention.self.query",)),
        "regex": ga.LoRA(r=2, targets=(r"re:encoder\.layer\.1\.attention\.self\.(key|value)",)),
        "dotted": ga.LoRA(r=2, targets=("encoder.layer.0.output.dense",)),
        "suffix": ga.LoRA(r=2, targets=("attention.output.dense",)),
        "layers": ga.LoRA(r=2, targets=("q", "v"), layers=(1,)),
        "leave": ga.LoRA(r=2, targets=("all-linear",), leave_out=(0,)),
        "both": ga.LoRA(r=2, targets=("*.value", "up"), layers=(0, 1), leave_out=(1,)),
    })
    adapted = ga.apply(model, spec)
    want = {
        "glob": {L.format(i) + "attention.self.query" for i in (0, 1)},
        "regex": {L.format(1) + "attention.self.key", L.format(1) + "attention.self.value"},
        "dotted": {L.format(0) + "output.dense"},
        "suffix": {L.format(i) + "attention.output.dense" for i in (0, 1)},
        "layers": {L.format(1) + "attention.self.query", L.format(1) + "attention.self.value"},
        "leave": {L.format(1) + s for s in ("attention.self.query", "attention.self.key", "attention.self.value",
                                            "attention.output.dense", "intermediate.dense", "output.dense")},
        "both": {L.format(0) + "attention.self.value", L.format(0) + "intermediate.dense"},
    }
    for name, sites in want.items():
        assert _sites(adapted, name) == sites, name
        mods = {n[len(f"adapters.{name}."):] for n, m in adapted.named_modules()
                if n.startswith(f"adapters.{name}.") and hasattr(m, "lora_A")}
        assert mods == sites, name
    roles = {r.site: (r.role, r.layer) for r in adapted.adapter_records if r.adapter == "leave"}
    assert roles[L.format(1) + "intermediate.dense"] == ("up", 1)
    assert roles[L.format(1) + "output.dense"] == ("down", 1)


def test_llama_roles_and_layers():
    model = tiny_llama()
    adapted = ga.apply(model, ga.Spec({"g": ga.LoRA(r=2, targets=("gate", "k"), layers=(1,)),
                                       "d": ga.LoRA(r=2, targets=("down", "o"), leave_out=(1,))}))
    assert _sites(adapted, "g") == {"layers.1.mlp.gate_proj", "layers.1.self_attn.k_proj"}
    assert _sites(adapted, "d") == {"layers.0.mlp.down_proj", "layers.0.self_attn.o_proj"}
    k = adapted.get_submodule("adapters.g.layers.1.self_attn.k_proj")
    assert (k.in_features, k.out_features) == (32, 16)  # GQA: 2 kv heads of 8


# --------------------------------------------------------------------------- gating, PiSSA
def test_gated_lora_runs_and_gate_matters():
    model = tiny_bert()
    inputs = text_inputs(batch=3, seq=5, pad=2)
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q", "v"), use_gating=True)).eval()
    names = set(_adapter_params(adapted))
    assert "adapters.default.encoder.layer.0.attention.self.query.gate.weight" in names
    assert set(adapted.trainable_parameters()) == names
    base = run_no_grad(model, inputs)
    assert max_diff(run_no_grad(adapted, inputs), base) <= 1e-6  # B = 0 at init
    randomize_lora(adapted, std=0.3)
    gated = run_no_grad(adapted, inputs)
    assert max_diff(gated, base) > 1e-3
    with torch.no_grad():
        for r in adapted.adapter_records:
            adapted.get_submodule(r.target).gate.bias.fill_(-40.0)  # gate -> 0: branch off
    assert max_diff(run_no_grad(adapted, inputs), base) <= 1e-5
    # the gate trains
    adapted.train()
    adapted.get_submodule("adapters.default.encoder.layer.0.attention.self.query").gate.bias.data.fill_(0.0)
    # (not .sum(): BERT ends in a LayerNorm, whose output sums to a constant)
    adapted(**inputs).last_hidden_state.square().mean().backward()
    g = adapted.get_submodule("adapters.default.encoder.layer.0.attention.self.query").gate
    assert g.weight.grad is not None and g.weight.grad.abs().max() > 0


def test_pissa_keeps_output_and_changes_only_the_adapted_weight():
    model = tiny_bert()
    snap = _snapshot(model)
    inputs = text_inputs(batch=3, seq=5, pad=2)
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q", "v"), init="pissa")).eval()
    _assert_unchanged(model, snap)
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(model, inputs)) <= ATOL
    ours = dict(adapted.named_parameters())
    for r in adapted.adapter_records:
        w = r.weight
        mod = adapted.get_submodule(r.target)
        assert mod.lora_B.abs().max() > 0 and mod.lora_A.abs().max() > 0
        assert (ours[w] - snap[w][0]).abs().max() > 1e-3  # residual, not W
        assert torch.allclose(ours[w] + mod.delta_weight(), snap[w][0], atol=1e-5)
        assert ours[w].data_ptr() != dict(model.named_parameters())[w].data_ptr()
    untouched = "encoder.layer.0.attention.self.key.weight"
    assert torch.equal(ours[untouched], snap[untouched][0])
    with torch.no_grad():  # and the branch is live
        adapted.get_submodule("adapters.default.encoder.layer.1.attention.self.value").lora_B.mul_(1.5)
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(model, inputs)) > 1e-3


def test_plain_torch_model_by_module_name():
    """Any torch.export-able module works with path targets; '*.fc1' selects a top-level fc1."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = MLP().eval()
    with pytest.raises(ga.SpecError, match=r"\*\.fc1"):
        ga.LoRA(targets=("fc1",))  # a bare word is taken for a mistyped role; the message shows the fix
    adapted = ga.apply(mlp, ga.LoRA(r=2, targets=("*.fc1",)), example_inputs=(torch.randn(3, 8),))
    assert [r.site for r in adapted.adapter_records] == ["fc1"]
    randomize_lora(adapted)
    x = torch.randn(5, 8)
    y = adapted(x)
    assert (y - mlp(x)).abs().max() > 1e-3
    adapted.merge()
    torch.testing.assert_close(adapted(x), y, atol=1e-6, rtol=0)


def test_task_model_with_labels_in_the_graph():
    """Inputs like ``labels`` are captured on request; the HF loss is then computed in the graph."""
    model = tiny_bert(num_labels=2)
    x, y = text_inputs(4, 7), torch.tensor([0, 1, 1, 0])
    plain = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    # labels not captured: captured on first use (graphadapt.signatures), the same loss as the base model
    torch.testing.assert_close(plain(**x, labels=y).loss, model(**x, labels=y).loss)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")), example_kwargs={**x, "labels": y})
    assert adapted.dynamic_dims["labels"] == {0: "batch"}
    out = adapted(**text_inputs(6, 9), labels=torch.tensor([0, 1, 1, 0, 1, 0]))  # new batch and length
    ref = model(**text_inputs(6, 9), labels=torch.tensor([0, 1, 1, 0, 1, 0]))
    assert type(out).__name__ == "SequenceClassifierOutput"
    torch.testing.assert_close(out.loss, ref.loss)  # B = 0 at init: the same loss as the base model
    out.loss.backward()
    assert all(p.grad is not None for n, p in adapted.named_parameters() if n.endswith("lora_A") or n.endswith("lora_B"))
    assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("adapters."))
