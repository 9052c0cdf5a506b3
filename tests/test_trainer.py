"""transformers.Trainer runs a graphadapt model with no extra arguments: labels → loss, train, evaluate, predict.

The same script runs on a PEFT model and on a graphadapt model; only the model construction differs.
"""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga

from helpers import tiny_bert

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class _Toy(torch.utils.data.Dataset):
    """Label = whether token 7 occurs in the sequence (learnable by attention adapters)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, 100, (n, 8), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        self.ids[flip, torch.randint(0, 8, (int(flip.sum()),), generator=g)] = 7
        self.labels = flip.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _script(model, out_dir):
    """An ordinary Trainer script (save_strategy="no": checkpoints are another feature's business)."""
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=60,
        learning_rate=5e-2, save_strategy="no", report_to=[], logging_steps=10, disable_tqdm=True, seed=0,
        use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Toy(256, 0), eval_dataset=_Toy(64, 1))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    pred = trainer.predict(_Toy(64, 1))
    return before, after, pred


def _peft_model():
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value"])
    return peft.get_peft_model(tiny_bert(num_labels=2), cfg)


def _graphadapt_model():
    return ga.apply(tiny_bert(num_labels=2), ga.LoRA(r=8, alpha=16, targets=("q", "k", "v")))


@pytest.mark.parametrize("build", [_peft_model, _graphadapt_model], ids=["peft", "graphadapt"])
def test_same_trainer_script_loss_falls(build, tmp_path):
    model = build()
    before, after, pred = _script(model, tmp_path)
    assert after < before - 0.02, (before, after)
    assert pred.predictions.shape == (64, 2) and pred.label_ids.shape == (64,)
    assert "test_loss" in pred.metrics
