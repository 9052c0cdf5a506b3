"""Weight-transform methods (wave 4: OFT, BOFT, HRA, MiSS, DeLoRA, RoAd): PEFT checkpoints import exactly,
merged equals unmerged, one shared ONNX export, save/load, and a do-nothing adapter fails the tests.

Every PEFT model gets seeded non-zero adapter weights (zero-initialised parameters perturbed) before
``save_pretrained``; ``graphadapt.import_peft`` must reproduce PEFT's outputs within 1e-5 (fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graphadapt as ga
from graphadapt import import_peft
from graphadapt.methods.ln_tuning import LNTuning
from graphadapt.methods.oft import OFT
from graphadapt.methods.trainable_tokens import TrainableTokens

from helpers import max_diff, text_inputs, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

ARCHS = {"bert": (tiny_bert, ["query", "value", "intermediate.dense"]),
         "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"])}


def _cfg(method: str, targets):
    """The PEFT config of one case (non-default options where they change the math)."""
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets)
    if method == "oft-exact-coft-share":
        return peft.OFTConfig(r=4, oft_block_size=0, target_modules=targets, use_cayley_neumann=False, coft=True,
                              eps=0.05, block_share=True)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=4, target_modules=targets)
    if method == "boft-butterfly":
        return peft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                               target_modules=targets)
    if method == "hra":
        return peft.HRAConfig(r=4, target_modules=targets)
    if method == "hra-gs":
        return peft.HRAConfig(r=3, apply_GS=True, target_modules=targets)
    if method == "miss":
        return peft.MissConfig(r=5, target_modules=targets)      # 32 = 6·5 + 2: the padded remainder block
    if method == "miss-bat":
        return peft.MissConfig(r=4, init_weights="bat", target_modules=targets)
    if method == "miss-mini":
        return peft.MissConfig(r=8, init_weights="mini", mini_r=4, target_modules=targets)
    if method == "delora":
        return peft.DeloraConfig(r=4, delora_lambda=3, target_modules=targets)
    if method == "delora-patterns":
        return peft.DeloraConfig(r=4, delora_lambda=3, rank_pattern={"v_proj": 2}, lambda_pattern={"q_proj": 7},
                                 target_modules=targets)
    if method == "road":
        return peft.RoadConfig(variant="road_1", group_size=8, target_modules=targets)
    if method == "road-4":
        return peft.RoadConfig(variant="road_4", group_size=4, target_modules=targets)
    if method == "road-2":
        return peft.RoadConfig(variant="road_2", group_size=16, target_modules=targets)
    raise KeyError(method)


# each method on both architectures; its variants on one (test time)
CASES = [("oft", "bert"), ("oft", "llama"), ("oft-exact-coft-share", "llama"),
         ("boft", "bert"), ("boft", "llama"), ("boft-butterfly", "bert"),
         ("hra", "bert"), ("hra", "llama"), ("hra-gs", "llama"),
         ("miss", "bert"), ("miss", "llama"), ("miss-bat", "bert"), ("miss-mini", "llama"),
         ("delora", "bert"), ("delora", "llama"), ("delora-patterns", "llama"),
         ("road", "bert"), ("road", "llama"), ("road-4", "bert"), ("road-2", "llama")]


class _TorchBlockDiag:
    """Stands in for PEFT BOFT's CUDA extension (block-diagonal of [N, D, H, H]), so that PEFT builds more
    than one butterfly factor on CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*torch.unbind(x[i])) for i in range(x.shape[0])])]


@pytest.fixture(autouse=True)
def _butterflies(request, monkeypatch):
    """PEFT's BOFT tries to compile its CUDA extension for every layer it builds (seconds each, and it fails on
    CPU): plain cases get the CPU answer (no extension) at once, butterfly cases the torch stand-in."""
    if "boft" in request.node.name:
        import peft.tuners.boft.layer as boft_layer

        fake = _TorchBlockDiag if "butterfly" in request.node.name else None
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: fake)


def _peft_model(method, arch, tmp_path):
    make, targets = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), _cfg(method, targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:   # the adapter's parameters: perturbed, so zero-initialised ones matter too
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path)
    return pm


def _kw(adapted):
    return {"use_cache": False} if "use_cache" in adapted.constant_inputs else {}


@pytest.mark.parametrize("method,arch", CASES)
def test_peft_import_matches_and_merges(method, arch, tmp_path):
    pm = _peft_model(method, arch, tmp_path)
    make, _ = ARCHS[arch]
    base = make()
    adapted = import_peft(base, tmp_path)
    x = text_inputs(2, 6, pad=1)
    with torch.no_grad():
        ref = pm(**x, **_kw(adapted))
        got = adapted(**x)
        plain = base(**x, **_kw(adapted))
        assert max_diff(got, ref) < 1e-5
        assert max_diff(got, plain) > 1e-3          # the adapter does something
        adapted.merge()
        assert max_diff(adapted(**x), got) < 1e-5   # merged == unmerged
        adapted.unmerge()
        assert max_diff(adapted(**x), got) == 0


# ----------------------------------------------------------------------------------- norms and tokens
NORM_TOKEN_CASES = {
    "ln_tuning-bert": (tiny_bert, lambda: peft.LNTuningConfig(target_modules=["LayerNorm"])),
    "ln_tuning-llama": (tiny_llama, lambda: peft.LNTuningConfig(
        target_modules=["input_layernorm", "post_attention_layernorm", "norm"])),
    "trainable_tokens-bert": (tiny_bert, lambda: peft.TrainableTokensConfig(target_modules=["word_embeddings"],
                                                                            token_indices=[3, 7, 11])),
    "trainable_tokens-llama-tied": (lambda: tiny_llama(causal_lm=True, tie_word_embeddings=True),
                                    lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                       token_indices=[3, 7, 11])),
}


@pytest.mark.parametrize("case", list(NORM_TOKEN_CASES))
def test_norm_and_token_methods_import(case, tmp_path):
    """PEFT's LN tuning and trainable tokens import exactly; the norms are found by pattern (no per-architecture
    names); trainable rows reach the tied LM head too (the logits differ where they would not without it)."""
    make, cfg = NORM_TOKEN_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), cfg())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval().save_pretrained(tmp_path)
    base = make()
    adapted = import_peft(base, tmp_path)
    x = text_inputs(2, 6, pad=1)
    x["input_ids"][0, :3] = torch.tensor([3, 7, 11])
    with torch.no_grad():
        got = adapted(**x)
        assert max_diff(got, pm(**x, **_kw(adapted))) < 1e-5
        assert max_diff(got, base(**x, **_kw(adapted))) > 1e-3
        n_norms = sum(isinstance(m, (torch.nn.LayerNorm, type(getattr(base, "norm", None)))) for m in base.modules())
        if case.startswith("ln_tuning"):
            assert len(adapted.adapter_records) == n_norms
        report = adapted.merge()                        # PEFT merges both: the copies / rows become the weights
        assert report.kept == {} and not any(n.op == "call_module" and str(n.target).startswith("adapters.")
                                             for n in adapted.graph.nodes)
        assert max_diff(adapted(**x), got) < 1e-5
        adapted.unmerge()
        assert max_diff(adapted(**x), got) == 0
        if case.endswith("tied"):   # one module feeds the lookup and the LM head (PEFT's logits match above)
            calls = [n for n in adapted.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
            assert len(calls) == 1 and len(calls[0].users) == 2


# ----------------------------------------------------------------------------------- all six in one model
def _all_six(gpt2=False, **extra):
    """One adapter of each method, on its own role (parameters: its own norms and token rows), initialised non-zero
    by graphadapt's own seeded init (LN tuning starts as a copy: perturbed by the tests that use it)."""
    from graphadapt.methods.boft import BOFT
    from graphadapt.methods.delora import DeLoRA
    from graphadapt.methods.hra import HRA
    from graphadapt.methods.miss import MiSS
    from graphadapt.methods.road import RoAd

    return ga.Spec({
        "oft": OFT(r=0, oft_block_size=8, targets=("q",), init_weights=False),
        "miss": MiSS(r=8, targets=("k",), init_weights=False),
        "hra": HRA(r=2, targets=("v",), init_weights=False),
        "boft": BOFT(boft_block_size=4, targets=("o",), init_weights=False),
        "delora": DeLoRA(r=4, delora_lambda=2.0, targets=("up",), init_weights=False),
        "road": RoAd(variant="road_2", group_size=8, targets=("down",), init_weights=False),
        "tokens": TrainableTokens(token_indices=(3, 7, 11), init_weights=False),
        **({} if gpt2 else {"norms": LNTuning(targets=("re:.*output\\.LayerNorm",))}),
    }, **extra)


def _each_module_acts(adapted):
    """Every adapter module changes what it is called on (linear sites: ``(x, y, W, b)``; parameter sites: the
    parameter), so an adapter that does nothing fails."""
    g = torch.Generator().manual_seed(5)
    for r in adapted.adapter_records:
        mod = adapted.get_submodule(r.target)
        w = adapted.get_parameter(r.weight)
        with torch.no_grad():
            if str(r.kind) == "linear":
                b = adapted.get_parameter(r.bias) if r.bias else None
                x = torch.randn(3, w.shape[1], generator=g)
                y = torch.nn.functional.linear(x, w, b)
                assert (mod(x, y, w, b) - y).abs().max() > 1e-4, r.adapter
            else:
                assert (mod(w, r.weight.rpartition(".")[2]) - w).abs().max() > 1e-4, r.adapter


def _perturb_norm_copies(adapted):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters.norms."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def six_on_bert():
    adapted = ga.apply(tiny_bert(), _all_six(seed=3))
    _perturb_norm_copies(adapted)
    return tiny_bert(), adapted


def test_seeded_init_each_adapter_acts_and_save_load(six_on_bert, tmp_path):
    base, adapted = six_on_bert
    x = text_inputs(2, 5, pad=1)
    with torch.no_grad():
        plain, y = base(**x), adapted(**x)
    assert max_diff(y, plain) > 1e-3
    _each_module_acts(adapted)
    again = ga.apply(tiny_bert(), _all_six(seed=3))
    other = ga.apply(tiny_bert(), _all_six(seed=4))
    _perturb_norm_copies(again)
    with torch.no_grad():
        assert max_diff(again(**x), y) == 0     # seeded: the same weights again
        assert max_diff(other(**x), y) > 1e-4
    again.train()
    again(**x).last_hidden_state.square().mean().backward()   # every adapter trains; DeLoRA's column norms do not
    grads = {n.split(".")[1] for n, p in again.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(adapted.spec.adapters)
    assert not any(p.requires_grad for n, p in again.named_parameters() if n.endswith("delora_w_norm"))
    adapted.save_adapters(tmp_path / "six")
    other.load_adapters(tmp_path / "six")
    with torch.no_grad():
        assert max_diff(other(**x), y) == 0


def test_merge_roundtrip_on_gpt2_fused_slices():
    """GPT-2's Conv1D weights ([in, out]) and its fused c_attn (q, k, v are slices of one weight)."""
    from helpers import tiny_gpt2

    base = tiny_gpt2()
    adapted = ga.apply(base, _all_six(gpt2=True, seed=1))   # the same roles: q, k, v are slices of c_attn
    x = text_inputs(2, 5)
    with torch.no_grad():
        y = adapted(**x)
        assert max_diff(y, base(**x)) > 1e-3
        adapted.merge()
        assert max_diff(adapted(**x), y) < 1e-5
        adapted.unmerge()
        assert max_diff(adapted(**x), y) == 0


def test_onnx_export_verified(six_on_bert, tmp_path):
    _, adapted = six_on_bert
    report = ga.export_onnx(adapted, tmp_path / "six.onnx", example_inputs=adapted.example_inputs(), merge=False,
                            verify=True)
    assert report.verified


def test_bad_specs_name_the_field():
    from graphadapt.methods.boft import BOFT
    from graphadapt.methods.miss import MiSS
    from graphadapt.methods.road import RoAd

    for make, field in ((lambda: OFT(r=4), "r"), (lambda: BOFT(boft_block_num=2), "boft_block_size"),
                        (lambda: MiSS(init_weights="fast"), "init_weights"), (lambda: RoAd(group_size=3), "group_size"),
                        (lambda: TrainableTokens(token_indices=[1, 1]), "token_indices"),
                        (lambda: LNTuning(targets=[3]), "targets")):
        with pytest.raises(ga.SpecError) as e:
            make()
        assert e.value.field == field
    with pytest.raises(ga.SpecError, match="not divisible by group_size=64") as e:   # checked per site at apply
        ga.apply(tiny_bert(), RoAd(group_size=64, targets=("q",)))
    assert e.value.field == "group_size"
