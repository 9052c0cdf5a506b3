"""PEFT checkpoints load into graphadapt with the same outputs as PEFT itself."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import graphadapt as ga
from graphadapt import import_peft

from helpers import max_diff, text_inputs, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert-lora": (tiny_bert, dict(target_modules=["query", "value"])),
    "bert-dora-rslora": (tiny_bert, dict(target_modules=["query", "key", "dense"], use_dora=True, use_rslora=True)),
    "gpt2-conv1d-fused": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(q_proj|down_proj)")),
    "llama-layers": (tiny_llama, dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers")),
}


def _trained_peft(make, cfg, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(tmp_path)
    return pm


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_peft(case, tmp_path):
    make, cfg = CASES[case]
    pm = _trained_peft(make, cfg, tmp_path)
    base = make()
    adapted = import_peft(base, tmp_path)
    x = text_inputs(3, 6, pad=2)
    with torch.no_grad():
        ref = pm(**x, **({"use_cache": False} if "use_cache" in adapted.constant_inputs else {}))
        got = adapted(**x)
        plain = base(**x, **({"use_cache": False} if "use_cache" in adapted.constant_inputs else {}))
    assert max_diff(got, ref) < 1e-5
    assert max_diff(got, plain) > 1e-3  # the adapter is really there
    n_peft = len({k.rsplit(".lora_", 1)[0] for k in pm.state_dict() if ".lora_A." in k})
    assert len({r.target for r in adapted.adapter_records}) == n_peft


def test_import_onto_an_unwrapped_model(tmp_path):
    """A checkpoint trained on BertForSequenceClassification (paths bert.encoder…) loads onto BertModel."""
    pm = _trained_peft(lambda: tiny_bert(num_labels=2), dict(target_modules=["query", "value"]), tmp_path)
    adapted = import_peft(tiny_bert(), tmp_path)
    x = text_inputs(2, 5)
    with torch.no_grad():
        ref = pm.base_model.model.bert(**x).last_hidden_state
    assert max_diff(adapted(**x).last_hidden_state, ref) < 1e-5


def test_clear_errors(tmp_path):
    with pytest.raises(ga.CheckpointError, match="not a PEFT checkpoint"):
        import_peft(tiny_bert(), tmp_path)
    _trained_peft(tiny_bert, dict(target_modules=["query"]), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "layer_replication": [[0, 1]]}))
    with pytest.raises(ga.CheckpointError, match="layer_replication"):
        import_peft(tiny_bert(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ga.CheckpointError, match="do not exist"):
        import_peft(tiny_llama(), tmp_path)  # trained on BERT


def test_cli_exports_a_peft_checkpoint(tmp_path, capsys):
    from graphadapt.cli import main
    from graphadapt.zoo import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load_model("tiny-bert"), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "tiny-bert", "--peft", str(tmp_path / "peft"), "-o", str(out)]) == 0
    assert "import PEFT checkpoint" in capsys.readouterr().out and out.exists()
