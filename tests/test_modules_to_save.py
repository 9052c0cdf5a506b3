"""``Spec.modules_to_save``: trainable copies of whole base modules (classifier, lm_head)."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import SpecError

from helpers import max_diff, text_inputs, tiny_bert, tiny_gpt2


def _train(adapted, inputs, steps=2, seed=0):
    opt = torch.optim.SGD(adapted.trainable_parameters().values(), lr=0.5)
    adapted.train()
    for _ in range(steps):
        out = adapted(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()


def test_spec_round_trip_and_validation(tmp_path):
    spec = ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["classifier"])
    assert spec.modules_to_save == ("classifier",)
    assert spec.to_dict()["modules_to_save"] == ["classifier"]
    assert ga.Spec.from_json(spec.to_json()) == spec
    assert ga.Spec.from_yaml(spec.to_yaml()) == spec
    assert "modules_to_save" not in ga.Spec({"t": ga.LoRA(r=2)}).to_dict()
    assert ga.as_spec({"adapters": {"t": {"method": "lora", "r": 2}}, "modules_to_save": ["score"]}
                      ).modules_to_save == ("score",)
    with pytest.raises(SpecError, match="modules_to_save"):
        ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["not a path"])
    with pytest.raises(SpecError, match="no module"):
        ga.apply(tiny_bert(num_labels=3), ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["nonexistent_head"]))


@pytest.fixture(scope="module")
def trained_cls():
    base = tiny_bert(num_labels=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = ga.apply(base, ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["classifier"]))
    assert adapted.get_parameter("classifier.weight").requires_grad
    assert not adapted.get_parameter("bert.pooler.dense.weight").requires_grad
    x = text_inputs()
    with torch.no_grad():
        assert max_diff(adapted(**x), base(**x)) == 0.0   # a copy: same outputs at init
    _train(adapted, x)
    return base, before, adapted, x


def test_classifier_trains_caller_untouched(trained_cls):
    base, before, adapted, x = trained_cls
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged
    assert not torch.equal(adapted.get_parameter("classifier.weight"), base.classifier.weight)
    assert base.classifier.weight.requires_grad  # the caller's flags are not touched either


def test_save_load_merge_and_base_model(trained_cls, tmp_path):
    base, _, adapted, x = trained_cls
    with torch.no_grad():
        ref = adapted(**x).logits
    adapted.save_adapters(tmp_path)
    from safetensors.torch import load_file

    assert "classifier.weight" in load_file(str(tmp_path / "adapters.safetensors"))
    loaded = ga.load(tiny_bert(num_labels=3), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, ref)
    adapted.merge()
    try:
        with torch.no_grad():
            assert torch.allclose(adapted(**x).logits, ref, atol=1e-6)
    finally:
        adapted.unmerge()
    hf = adapted.to_base_model()
    assert torch.equal(hf.classifier.weight, adapted.get_parameter("classifier.weight"))
    with torch.no_grad():
        assert torch.allclose(hf(**x).logits, ref, atol=1e-5)


def test_tied_lm_head_is_a_copy_equal_at_init():
    base = tiny_gpt2(causal_lm=True)
    assert base.lm_head.weight is base.transformer.wte.weight
    adapted = ga.apply(base, ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["lm_head"]))
    x = text_inputs()
    with torch.no_grad():
        assert max_diff(adapted(**x), base(**x)) == 0.0
    wte = base.transformer.wte.weight.clone()
    _train(adapted, x, steps=1)
    assert torch.equal(base.transformer.wte.weight, wte)
    assert torch.equal(adapted.get_parameter("transformer.wte.weight"), wte)  # embedding frozen
    assert not torch.equal(adapted.get_parameter("lm_head.weight"), wte)       # head trained


def test_import_peft_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_bert(num_labels=3), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    pm.save_pretrained(tmp_path)
    pm.eval()
    x = text_inputs()
    ours = ga.import_peft(tiny_bert(num_labels=3), tmp_path)
    assert ours.spec.modules_to_save == ("classifier",)
    with torch.no_grad():
        assert max_diff(ours(**x), pm(**x)) < 1e-6
        skipped = ga.import_peft(tiny_bert(num_labels=3), tmp_path, ignore_modules_to_save=True)
        assert skipped.spec.modules_to_save == ()
        assert max_diff(skipped(**x), pm(**x)) > 1e-3  # the base's classifier, not PEFT's trained one


def test_onnx_export_uses_the_trained_classifier(trained_cls, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    base, _, adapted, x = trained_cls
    ga.export_onnx(adapted, tmp_path / "m.onnx", merge=True, verify=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = {**x, "token_type_ids": torch.zeros_like(x["input_ids"])}  # a graph input of BERT exports by default
    feeds = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    logits = torch.from_numpy(sess.run(None, feeds)[0])
    with torch.no_grad():
        assert torch.allclose(logits, adapted(**x).logits, atol=1e-5)
        assert not torch.allclose(logits, base(**x).logits, atol=1e-3)
    assert not adapted.is_merged  # export merged a copy / restored
