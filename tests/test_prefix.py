"""Prefix tuning (methods/prefix, passes/attention.py) and unions (methods/union) in the main environment:
effect, padding, GQA, eager vs SDPA, eject, seeded init, gradients, save/load, merge, spec round trip, PEFT
parity and ONNX export. AdapterHub parity lives in tests/oracle/test_prefix_oracle.py / test_union_oracle.py."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.methods.prefix import FlatPrefix, PrefixGenerator, PrefixTuning, eject_prefix
from helpers import t5_inputs, text_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

SMALL = dict(prefix_length=3, bottleneck_size=8)


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _inputs(kind):
    x = text_inputs(3, 6, seed=3, pad=2)
    if kind == "t5":
        x = {**t5_inputs(3, 6, 4, seed=3), "attention_mask": x["attention_mask"]}
    return x


BUILD = {"bert": tiny_bert, "gpt2-lm": lambda: tiny_gpt2(causal_lm=True), "llama": tiny_llama, "t5": tiny_t5,
         "bert-eager": lambda: tiny_bert(attn_implementation="eager")}


@pytest.mark.parametrize("kind", list(BUILD))
def test_prefix_changes_outputs_and_keeps_padding_masked(kind):
    model = BUILD[kind]()
    x = _inputs(kind)
    base = _out(model, x)
    adapted = ga.apply(model, PrefixTuning(**SMALL)).eval()
    got = _out(adapted, x)
    assert (got - base).abs().max() > 1e-3  # the prefix does something
    # every query sees the prefix, padded keys stay masked: changing a padded token's id changes nothing
    ids = x["input_ids"].clone()
    ids[1, -2:] = (ids[1, -2:] + 17) % 100
    moved = _out(adapted, {**x, "input_ids": ids})
    keep = x["attention_mask"].bool() if kind != "t5" else torch.ones(moved.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(moved[keep], got[keep], atol=1e-6, rtol=0)
    adapted.set_active([])
    torch.testing.assert_close(_out(adapted, x), base, atol=0, rtol=0)
    if kind == "t5":  # self (encoder, decoder) and cross attention all get a prefix
        assert {r.role for r in adapted.adapter_records} == {"encoder_prefix", "self_prefix", "cross_prefix"}
    if kind == "bert-eager":  # the eager core computes what the SDPA one does
        sdpa = ga.apply(tiny_bert(), PrefixTuning(**SMALL)).eval()
        torch.testing.assert_close(_out(sdpa, x), got, atol=1e-5, rtol=1e-5)


def test_gqa_prefix_has_key_value_heads():
    adapted = ga.apply(tiny_llama(), PrefixTuning(prefix_length=3, flat=True))
    flat = adapted.get_submodule("adapters.default.prefix.generators.self_prefix")
    assert isinstance(flat, FlatPrefix) and flat.control_trans.numel() == 3 * 2 * 2 * 2 * 8  # P·L·2·kv_heads·d
    assert all(adapted.get_submodule(r.target).n_rep == 2 for r in adapted.adapter_records)


def test_eject_keeps_outputs_and_leaves_a_flat_prefix(tmp_path):
    adapted = ga.apply(tiny_gpt2(), ga.Spec({"p": PrefixTuning(**SMALL, use_gating=True)})).eval()
    x = _inputs("gpt2")
    before = _out(adapted, x)
    assert isinstance(adapted.get_submodule("adapters.p.prefix.generators.self_prefix"), PrefixGenerator)
    assert eject_prefix(adapted, "p") == 1
    assert isinstance(adapted.get_submodule("adapters.p.prefix.generators.self_prefix"), FlatPrefix)
    assert not any("control_trans.0" in n for n, _ in adapted.named_parameters())
    torch.testing.assert_close(_out(adapted, x), before, atol=1e-6, rtol=1e-6)
    assert eject_prefix(adapted, "p") == 0
    assert adapted.spec.adapters["p"] == PrefixTuning(**SMALL, use_gating=True, flat=True)
    adapted.save_adapters(tmp_path / "p")
    torch.testing.assert_close(_out(ga.load(tiny_gpt2(), tmp_path / "p").eval(), x), before, atol=1e-6, rtol=1e-6)
    with pytest.raises(ga.GraphAdaptError, match="unknown adapter"):
        eject_prefix(adapted, "nope")


def test_init_is_seeded_and_isolated():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    spec = lambda s: ga.Spec({"u": ga.UniPELT()}, seed=s)  # noqa: E731
    a, b, c = (ga.apply(tiny_bert(), spec(s)) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (dict(m.trainable_parameters()) for m in (a, b, c))
    assert pa.keys() == pb.keys() == pc.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa if pa[k].abs().sum() > 0)
    # members and layers draw from their own streams
    g0, g1 = (pa[f"adapters.u.prefix_tuning.encoder.layer.{i}.self_prefix.gate.weight"] for i in (0, 1))
    assert not torch.equal(g0, g1)


def test_union_gradients_reach_exactly_its_parameters():
    spec = ga.Spec({"u": ga.UniPELT(members=(PrefixTuning(**SMALL, use_gating=True),
                                             ga.SeqBn(reduction_factor=8, use_gating=True),
                                             ga.LoRA(r=2, alpha=2, use_gating=True, init="bert"))),
                    "other": ga.LoRA(r=2)})
    adapted = ga.apply(tiny_bert(), spec)
    adapted.set_active("u")
    adapted.train()
    adapted(**_inputs("bert")).last_hidden_state.pow(2).sum().backward()
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    union = {n for n, _ in adapted.named_parameters() if n.startswith("adapters.u.")}
    assert grads == union
    assert {n.split(".")[2] for n in union} == {"prefix_tuning", "bottleneck", "lora"}
    assert {r.adapter for r in adapted.adapter_records} == {"u", "other"}


def test_union_activate_save_load_merge(tmp_path):
    x = _inputs("bert")
    base = _out(tiny_bert(), x)
    spec = ga.Spec({"u": ga.Union(PrefixTuning(**SMALL), ga.LoRA(r=2, init="bert"), ga.ParBn(reduction_factor=4))})
    adapted = ga.apply(tiny_bert(), spec).eval()
    got = _out(adapted, x)
    assert (got - base).abs().max() > 1e-3
    adapted.set_active([])
    assert adapted.active_adapters() == [] and torch.equal(_out(adapted, x), base)
    adapted.set_active("u")
    adapted.save_adapters(tmp_path / "u")
    again = ga.load(tiny_bert(), tmp_path / "u").eval()
    assert again.spec == spec
    torch.testing.assert_close(_out(again, x), got, atol=0, rtol=0)
    report = adapted.merge()
    assert all(".lora." in t for t in report.folded) and len(report.folded) == 4
    assert any("prefix tuning" in why for why in report.kept.values())
    torch.testing.assert_close(_out(adapted, x), got, atol=1e-5, rtol=1e-5)
    adapted.unmerge()
    assert eject_prefix(adapted, "u") == 1 and adapted.spec.adapters["u"].members[0].flat
    torch.testing.assert_close(_out(adapted, x), got, atol=1e-6, rtol=1e-6)


def test_union_specs_round_trip_and_validate():
    for u in (ga.UniPELT(), ga.MAM(), ga.Union(PrefixTuning(flat=True), ga.IA3(), seed=3)):
        spec = ga.Spec({"u": u})
        assert ga.Spec.from_json(spec.to_json()) == spec and ga.Spec.from_yaml(spec.to_yaml()) == spec
        assert ga.Spec.from_dict(spec.to_dict()).adapters["u"] == u
    d = ga.UniPELT().to_dict()
    assert d["preset"] == "unipelt" and [m["method"] for m in d["members"]] == ["prefix_tuning", "bottleneck", "lora"]
    assert all(m["use_gating"] for m in d["members"]) and d["members"][0]["prefix_length"] == 10
    assert ga.MAM().members == (PrefixTuning(bottleneck_size=800), ga.ParBn())
    with pytest.raises(ga.SpecError, match="itself a Union"):
        ga.Union(ga.MAM())
    with pytest.raises(ga.SpecError, match="at least one member"):
        ga.Union()
    with pytest.raises(ga.SpecError, match=r"members 0 \(lora_0\) and 1 \(lora_1\) both claim the linear site"):
        ga.plan(tiny_bert(), ga.Spec({"u": ga.Union(ga.LoRA(targets=("q",)), ga.LoRA(targets=("q", "v")))}))
    with pytest.raises(ga.SpecError, match="prefix_length") as e:
        PrefixTuning(prefix_length=0)
    assert e.value.field == "prefix_length"
    with pytest.raises(ga.SpecError, match="non_linearity"):
        PrefixTuning(non_linearity="nope")
    # q and k from one projection (shared-QK attention): no role gets it, so there is no key projection
    # (head-interleaved fused QKV, GPT-NeoX, is recognised now: tests/test_fused_rows.py)

    class SharedQK(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qk, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            heads = lambda t: t.view(*t.shape[:2], 4, 8).transpose(1, 2)
            qk = heads(self.qk(x))
            a = torch.nn.functional.scaled_dot_product_attention(qk, qk, heads(self.v(x)))
            return x + self.o(a.transpose(1, 2).reshape(x.shape))

    with pytest.raises(ga.SpecError, match="no recognised key/value projection"):
        ga.apply(SharedQK(), PrefixTuning(), example_kwargs={"x": torch.randn(2, 5, 32)})


def test_peft_prefix_tuning_checkpoint_parity(tmp_path):
    peft = pytest.importorskip("peft")
    x = text_inputs(3, 6, seed=5, pad=2)
    keep = x["attention_mask"].bool()
    for i, build in enumerate((lambda: tiny_gpt2(causal_lm=True), lambda: tiny_llama(causal_lm=True))):
        pm = peft.get_peft_model(build(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "prompt_encoder" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        pm.eval().save_pretrained(tmp_path / str(i))
        adapted = ga.import_peft(build(), tmp_path / str(i)).eval()
        assert adapted.spec.adapters["default"] == PrefixTuning(prefix_length=4, flat=True, position_offset=True)
        with torch.no_grad():
            want = pm(**x).logits
        got = _out(adapted, x)
        torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
        assert (got - _out(build(), x)).abs().max() > 1e-2
        # AdapterHub's form (positions from 0) is PEFT called with position_ids -4… (PEFT adds 4 back)
        ah_form = ga.apply(build(), PrefixTuning(prefix_length=4, flat=True)).eval()
        ah_form.load_state_dict({k: v for k, v in adapted.state_dict().items() if k.startswith("adapters.")},
                                strict=False)
        with torch.no_grad():
            shifted = pm(**x, position_ids=(torch.arange(6) - 4).expand(3, -1)).logits
        torch.testing.assert_close(_out(ah_form, x)[keep], shifted[keep], atol=1e-5, rtol=1e-5)
        adapted.set_active([])  # the position shift is part of the adapter: inactive = base model
        torch.testing.assert_close(_out(adapted, x), _out(build(), x), atol=0, rtol=0)


def test_onnx_export_of_prefix_and_union(tmp_path):
    pytest.importorskip("onnxruntime")
    # one export covers both: a union on a causal model, merged for export — LoRA folds, the gated prefix
    # and the parallel bottleneck stay in the graph (onnxruntime verifies against PyTorch)
    spec = ga.Union(PrefixTuning(**SMALL, use_gating=True), ga.LoRA(r=2, init="bert"), ga.ParBn())
    adapted = ga.apply(tiny_gpt2(), ga.Spec({"a": spec}))
    rep = ga.export_onnx(adapted, tmp_path / "union.onnx", merge=True, verify=True)
    assert rep.verified and rep.merged and max(rep.max_abs_diff.values()) < 1e-4
    assert not adapted.is_merged  # export merged a copy of the state and restored it


def test_causal_core_gets_an_explicit_mask_that_shows_the_prefix():
    """An ``is_causal`` SDPA core (no mask tensor) becomes causal-over-the-tokens plus a fully visible prefix."""
    from graphadapt.methods.prefix import PrefixAttention

    g = torch.Generator().manual_seed(0)
    b, h, t, p, d = 2, 4, 5, 3, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    kv = torch.randn(2, 2, p, d, generator=g)  # one layer, 2 kv heads → n_rep 2
    mod = PrefixAttention(0, p, n_rep=2, mask_kinds=("bool",)).eval()
    k2, v2, mask = mod(kv, k, v, None, q, [None])
    assert mask.shape == (t, p + t) and mask[:, :p].all() and torch.equal(mask[:, p:], torch.ones(t, t).tril().bool())
    got = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    pk, pv = (x.repeat_interleave(2, dim=0).expand(b, -1, -1, -1) for x in (kv[0], kv[1]))
    scores = torch.cat([q @ pk.transpose(-1, -2), (q @ k.transpose(-1, -2)).masked_fill(
        ~torch.ones(t, t).tril().bool(), float("-inf"))], dim=-1) / d ** 0.5
    want = scores.softmax(-1) @ torch.cat([pv, v], dim=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mod.active = False  # inactive: the plain causal mask, keys untouched
    k3, _, mask3 = mod(kv, k, v, None, q, [None])
    assert k3 is k and torch.equal(mask3, torch.ones(t, t).tril().bool())


def test_position_offset_needs_position_ids_computed_in_the_graph():
    with pytest.raises(ga.SpecError, match="position_offset") as e:
        ga.apply(tiny_bert(), PrefixTuning(prefix_length=2, position_offset=True))  # BERT: positions from a buffer
    assert e.value.field == "position_offset"
