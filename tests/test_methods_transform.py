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
from graphadapt.methods.oft import OFT

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
         ("delora", "bert"), ("delora", "llama"),
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


# ----------------------------------------------------------------------------------- all six in one model
def _all_six(**extra):
    """One adapter of each method, on its own role, initialised non-zero by graphadapt's own seeded init."""
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
    }, **extra)


def _alone(adapted, name, x):
    """The model's output with only ``name`` active."""
    with torch.no_grad():
        adapted.set_active([name])
        try:
            return adapted(**x)
        finally:
            adapted.set_active(None)


@pytest.fixture(scope="module")
def six_on_bert():
    return tiny_bert(), ga.apply(tiny_bert(), _all_six(seed=3))


def test_seeded_init_each_adapter_acts_and_save_load(six_on_bert, tmp_path):
    base, adapted = six_on_bert
    x = text_inputs(2, 5, pad=1)
    with torch.no_grad():
        plain, y = base(**x), adapted(**x)
    for name in adapted.spec.adapters:          # every one of them changes the output by itself
        assert max_diff(_alone(adapted, name, x), plain) > 1e-4, name
    again = ga.apply(tiny_bert(), _all_six(seed=3))
    other = ga.apply(tiny_bert(), _all_six(seed=4))
    with torch.no_grad():
        assert max_diff(again(**x), y) == 0     # seeded: the same weights again
        assert max_diff(other(**x), y) > 1e-4
    adapted.save_adapters(tmp_path / "six")
    other.load_adapters(tmp_path / "six")
    with torch.no_grad():
        assert max_diff(other(**x), y) == 0


def test_merge_roundtrip_on_gpt2_fused_slices():
    """GPT-2's Conv1D weights ([in, out]) and its fused c_attn (q, k, v are slices of one weight)."""
    from helpers import tiny_gpt2

    base = tiny_gpt2()
    adapted = ga.apply(base, _all_six(seed=1))      # the same roles: q, k, v are slices of c_attn
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
