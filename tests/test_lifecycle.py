"""Adapter lifecycle: add/delete, disable_adapters, print_trainable_parameters, save subsets, guard rails,
save_pretrained/from_pretrained, Trainer checkpoints, to_peft."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import CheckpointError, GraphAdaptError, MergeError, SpecError

from helpers import max_diff, perturb_adapters, text_inputs, tiny_bert



@pytest.fixture(scope="module")
def two():
    base = tiny_bert()
    adapted = ga.apply(base, ga.Spec({"lora": ga.LoRA(r=2), "bn": ga.SeqBn(reduction_factor=4)}))
    perturb_adapters(adapted)
    return base, adapted, text_inputs()


def test_disable_adapters_gives_base_and_restores(two):
    base, adapted, x = two
    with torch.no_grad():
        ref, want = adapted(**x), base(**x)
        assert max_diff(ref, want) > 1e-3
        with adapted.disable_adapters():
            assert max_diff(adapted(**x), want) == 0.0
        assert max_diff(adapted(**x), ref) == 0.0
        adapted.set_active("lora")
        only = adapted(**x)
        with pytest.raises(RuntimeError, match="boom"), adapted.disable_adapters():
            raise RuntimeError("boom")
        assert adapted.active_adapters() == ["lora"] and max_diff(adapted(**x), only) == 0.0
        adapted.set_active(None)


def test_disable_adapters_with_composition():
    base = tiny_bert()
    adapted = ga.apply(base, ga.Spec({"a": ga.SeqBn(reduction_factor=4), "b": ga.SeqBn(reduction_factor=4)},
                                     active=ga.Stack("a", "b")))
    perturb_adapters(adapted)
    x = text_inputs()
    with torch.no_grad():
        ref = adapted(**x)
        with adapted.disable_adapters():
            assert max_diff(adapted(**x), base(**x)) == 0.0
        assert max_diff(adapted(**x), ref) == 0.0


def test_add_and_delete_adapter_keep_weights(two, tmp_path):
    base, adapted, x = two
    with torch.no_grad():
        ref = adapted(**x)
    adapted.add_adapter("extra", ga.IA3())
    assert "extra" in adapted.spec.adapters and "extra" not in adapted.active_adapters()
    with torch.no_grad():
        assert max_diff(adapted(**x), ref) == 0.0          # trained weights kept, new one inactive
        adapted.set_active(["lora", "bn", "extra"])
        adapted.get_parameter(next(n for n, _ in adapted.named_parameters() if n.startswith("adapters.extra."))
                              ).mul_(1.5)
        assert max_diff(adapted(**x), ref) > 1e-4
    with pytest.raises(GraphAdaptError, match="already exists"):
        adapted.add_adapter("lora", ga.LoRA(r=2))
    with pytest.raises(SpecError):                       # the plan refuses: model unchanged
        adapted.add_adapter("bad", ga.LoRA(r=2, targets=("no_such_module",)))
    assert "bad" not in adapted.spec.adapters and not hasattr(adapted.adapters, "bad")
    adapted.delete_adapter("extra")
    assert "extra" not in adapted.spec.adapters and not hasattr(adapted.adapters, "extra")
    assert not any(n.startswith("adapters.extra.") for n, _ in adapted.named_parameters())
    with torch.no_grad():
        assert max_diff(adapted(**x), ref) == 0.0
    with pytest.raises(GraphAdaptError, match="unknown adapter"):
        adapted.delete_adapter("extra")


def test_print_trainable_parameters(two):
    _, adapted, _ = two
    line = adapted.print_trainable_parameters(print_fn=None)
    train = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    assert line == f"trainable params: {train:,d} || all params: {total:,d} || trainable%: {100 * train / total:.4f}"


def test_save_subset_and_active_set(two, tmp_path):
    base, adapted, x = two
    with pytest.raises(CheckpointError, match="nope"):
        adapted.save_adapters(tmp_path / "bad", names=["nope"])
    assert not (tmp_path / "bad" / "adapters.safetensors").exists()
    adapted.save_adapters(tmp_path / "lora", names=["lora"])
    spec = ga.checkpoints.read_spec(tmp_path / "lora")
    assert list(spec.adapters) == ["lora"]
    only = ga.load(tiny_bert(), tmp_path / "lora")
    adapted.set_active("lora")
    try:
        with torch.no_grad():
            assert max_diff(only(**x), adapted(**x)) == 0.0
        adapted.save_adapters(tmp_path / "all")           # the active set travels with the checkpoint
    finally:
        adapted.set_active(None)
    back = ga.load(tiny_bert(), tmp_path / "all")
    assert back.active_adapters() == ["lora"]


def test_merge_guard_rails():
    adapted = ga.apply(tiny_bert(), ga.Spec({"lora": ga.LoRA(r=2), "bn": ga.SeqBn(reduction_factor=4)}))
    adapted.eval()
    lora = [p for n, p in adapted.named_parameters() if n.startswith("adapters.lora.")]
    adapted.merge()
    assert not any(p.requires_grad for p in lora)       # folded: no optimizer sees them
    with pytest.raises(MergeError, match="unmerge"):
        adapted.train()
    with pytest.raises(MergeError, match="bn"):         # SeqBn cannot fold: refused, not dropped
        adapted.to_base_model()
    adapted.unmerge()
    assert all(p.requires_grad for p in lora)
    adapted.train()
    with pytest.raises(MergeError, match="bn"):
        adapted.to_base_model()


def test_save_pretrained_cross_class_and_fingerprint(tmp_path):
    import json

    import transformers as T

    cls = tiny_bert(num_labels=3)
    adapted = ga.apply(cls, ga.Spec({"t": ga.LoRA(r=2), "b": ga.SeqBn(reduction_factor=4)},
                                    modules_to_save=["classifier"]))
    perturb_adapters(adapted)
    # Trainer's call: extras accepted / validated
    adapted.save_pretrained(tmp_path / "cls", state_dict=adapted.state_dict(), safe_serialization=True)
    with pytest.raises(GraphAdaptError, match="safetensors"):
        adapted.save_pretrained(tmp_path / "x", safe_serialization=False)
    cfg = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    assert cfg["base_model_class"].endswith("BertForSequenceClassification") and len(cfg["structure_fingerprint"]) == 64
    from safetensors.torch import load_file

    assert not any(k.startswith("bert.") for k in load_file(str(tmp_path / "cls" / "adapters.safetensors")))
    x = text_inputs()
    bare = T.BertModel(cls.config)
    bare.load_state_dict(cls.bert.state_dict())
    bare.eval()
    with pytest.warns(UserWarning, match="classifier"):
        enc = ga.from_pretrained(bare, tmp_path / "cls")     # paths bert.encoder… → encoder…
    with torch.no_grad():
        pooled = enc(**x).pooler_output
        logits = torch.nn.functional.linear(pooled, adapted.get_parameter("classifier.weight"),
                                            adapted.get_parameter("classifier.bias"))
        assert max_diff(logits, adapted(**x).logits) == 0.0
    enc.save_pretrained(tmp_path / "enc")                    # and back: encoder… → bert.encoder…
    back = ga.from_pretrained(tiny_bert(num_labels=3), tmp_path / "enc")
    with torch.no_grad():
        want = torch.nn.functional.linear(pooled, cls.classifier.weight, cls.classifier.bias)
        assert max_diff(back(**x).logits, want) < 1e-6
    with pytest.raises(CheckpointError, match="structure differs"):
        ga.from_pretrained(tiny_bert(num_hidden_layers=3), tmp_path / "enc")


def test_trainer_checkpoint_holds_adapters_and_resumes_exactly(tmp_path):
    T = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            x = text_inputs(batch=16, seq=6, seed=3)
            self.ids, self.mask, self.y = x["input_ids"], x["attention_mask"], torch.arange(16) % 3

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}

    def loss_fn(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    def make():
        base = tiny_bert(num_labels=3)
        adapted = ga.apply(base, ga.Spec({"t": ga.LoRA(r=2)}, modules_to_save=["classifier"])).trainable_state_dict()
        args = T.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                                   logging_steps=1, learning_rate=1e-2, report_to=[], remove_unused_columns=False,
                                   use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
        return base, adapted, T.Trainer(model=adapted, args=args, train_dataset=DS(), compute_loss_func=loss_fn)

    base, adapted, trainer = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert set(saved) == {k for k in adapted.state_dict() if k.startswith("adapters.") or k.startswith("classifier.")}
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    _, resumed, trainer2 = make()
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    again = [h["loss"] for h in trainer2.state.log_history if "loss" in h and h.get("step", 0) > 2]
    assert again == losses[2:]
    assert all(torch.equal(p, q) for p, q in zip(adapted.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize("method", [ga.LoRA(r=2, targets=("q", "v", "down")), ga.IA3()], ids=["lora", "ia3"])
def test_to_peft_round_trip(method, tmp_path):
    peft = pytest.importorskip("peft")
    adapted = ga.apply(tiny_bert(num_labels=3), ga.Spec({"t": method}, modules_to_save=["classifier"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapted.to_peft(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(num_labels=3), tmp_path)
    theirs.eval()
    back = ga.import_peft(tiny_bert(num_labels=3), tmp_path)
    x = text_inputs()
    with torch.no_grad():
        ours = adapted(**x)
        assert max_diff(theirs(**x), ours) < 1e-6
        assert max_diff(back(**x), ours) == 0.0
    with pytest.raises(CheckpointError, match="no PEFT format"):
        ga.apply(tiny_bert(), ga.Spec({"b": ga.SeqBn(reduction_factor=4)})).to_peft(tmp_path / "bn")


def test_load_maps_module_path_targets_across_heads(tmp_path):
    import transformers as T

    cls = tiny_bert(num_labels=3)
    adapted = ga.apply(cls, ga.Spec({"t": ga.LoRA(r=2, targets=("bert.encoder.layer.1.attention.self.query",))}))
    perturb_adapters(adapted)
    adapted.save_adapters(tmp_path)
    bare = T.BertModel(cls.config)
    bare.load_state_dict(cls.bert.state_dict())
    bare.eval()
    enc = ga.load(bare, tmp_path)
    assert enc.spec.adapters["t"].targets == ("encoder.layer.1.attention.self.query",)
    x = text_inputs()
    with torch.no_grad():
        logits = torch.nn.functional.linear(enc(**x).pooler_output, cls.classifier.weight, cls.classifier.bias)
        assert max_diff(logits, adapted(**x).logits) == 0.0


@pytest.mark.parametrize("method", [ga.LoRA(r=2, targets=("q",)), ga.IA3(targets=("q",), feedforward=())])
def test_to_peft_refuses_part_of_a_fused_projection(tmp_path, method):
    """PEFT adapts whole modules: q's rows of GPT-NeoX's fused query_key_value cannot be written as PEFT."""
    import transformers as T

    from helpers import build_seeded

    model = build_seeded(lambda: T.GPTNeoXModel(T.GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64)))
    adapted = ga.apply(model, method)
    with pytest.raises(CheckpointError, match="part of a fused projection"):
        adapted.to_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
