"""``graphadapt pack --adapterhub``: a real AdapterHub SeqBn checkpoint (``adapters`` 1.3.0, this oracle venv)
packed into a swappable ONNX export's bottleneck slot; onnxruntime with the packed file equals AdapterHub's own
model on the same inputs.

The ONNX export cannot run in this venv (transformers 4.57's ``ModelOutput`` pytree registration lacks
``flatten_with_keys``, which torch.export needs), so the export, ``pack`` and the onnxruntime run happen in the
main venv (a sibling ``.venv`` of this one, or ``GRAPHADAPT_MAIN_PYTHON``), in a subprocess; skipped without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adapters
from adapters import SeqBnConfig

from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
MAIN_PYTHON = Path(os.environ.get("GRAPHADAPT_MAIN_PYTHON", Path(sys.prefix).parent / ".venv" / "bin" / "python"))

SCRIPT = textwrap.dedent('''
    import sys, numpy as np, torch, onnxruntime as ort
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import graphadapt as ga
    from graphadapt.cli import main
    from helpers import perturb_adapters, tiny_bert
    d = sys.argv[1]
    base = tiny_bert(seed=0)
    base.save_pretrained(d + "/base")
    slot = ga.apply(base, ga.Spec({"slot": ga.SeqBn(reduction_factor=8)}))   # width 4; AdapterHub's is 2: padded
    perturb_adapters(slot, seed=2, std=0.2)
    slot.eval()
    ga.export_onnx(slot, d + "/swap.onnx", swappable=True, max_rank=4)
    assert main(["pack", d + "/swap.onnx", "--model", d + "/base", "--adapterhub", d + "/ah", "-o", d + "/out"]) == 0
    x = {k: v.numpy() for k, v in torch.load(d + "/inputs.pt").items()}
    sess = ort.InferenceSession(d + "/swap.onnx", providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(d + "/out/ah.onnx_adapter")
    run = ort.RunOptions()
    run.add_active_adapter(adapter)
    feeds = {i.name: x[i.name] for i in sess.get_inputs()}
    np.save(d + "/swapped.npy", sess.run(None, feeds, run)[0])
    np.save(d + "/default.npy", sess.run(None, feeds)[0])
''')


@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"no main venv python at {MAIN_PYTHON}")
def test_pack_adapterhub_seqbn_into_swappable_export(tmp_path):
    import numpy as np

    ah = tiny_bert(seed=0)
    adapters.init(ah)
    ah.add_adapter("a", config=SeqBnConfig(reduction_factor=16))  # width 2
    assert randomize_adapterhub(ah, "a", seed=1) > 0
    ah.set_active_adapters("a")
    ah.eval()
    ah.save_adapter(str(tmp_path / "ah"), "a")
    x = oracle_inputs("bert")
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    torch.save(x, tmp_path / "inputs.pt")
    with torch.no_grad():
        want = ah(**x).last_hidden_state.numpy()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(MAIN_PYTHON), "-c", SCRIPT, str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, default = np.load(tmp_path / "swapped.npy"), np.load(tmp_path / "default.npy")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(default - want).max() > 1e-3  # the defaults are another adapter: the swap does something
