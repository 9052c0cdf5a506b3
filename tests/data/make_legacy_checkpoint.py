"""Writes ``tests/data/checkpoint_v0/``: a ``save_pretrained`` checkpoint in the format graphadapt wrote
before the versioned structure signature (``structure_fingerprint`` = sha256 of the inspect report's
layers, display strings included), plus the logits the adapted model gave.

It was run once on the code of commit e1952f1 (main, 2026-12-07); running it on later code writes the
current format instead, so do not re-run it to "refresh" the fixture. ``tests/test_checkpoint_compat.py``
loads the committed files.

    OMP_NUM_THREADS=1 python tests/data/make_legacy_checkpoint.py
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import graphadapt as ga  # noqa: E402
from helpers import perturb_adapters, text_inputs, tiny_bert  # noqa: E402

OUT = Path(__file__).resolve().parent / "checkpoint_v0"


def build():
    model = tiny_bert(num_labels=3)
    spec = ga.Spec({"lora": ga.LoRA(r=2), "bn": ga.SeqBn(reduction_factor=4)}, modules_to_save=["classifier"])
    return model, spec


if __name__ == "__main__":
    model, spec = build()
    adapted = ga.apply(model, spec)
    perturb_adapters(adapted, seed=7)
    adapted.eval()
    adapted.save_pretrained(OUT)
    with torch.no_grad():
        logits = adapted(**text_inputs()).logits
    save_file({"logits": logits.contiguous()}, str(OUT / "expected_logits.safetensors"),
              metadata={"inputs": "tests.helpers.text_inputs()", "torch": torch.__version__})
    print(sorted(os.listdir(OUT)), logits)
