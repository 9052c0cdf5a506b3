"""Reliability III (issue #28): a call never touches files that are not its own, forwards stay consistent
while another thread changes the model, and every input is checked at the adapted model's boundary.
docs/reliability.md lists every case with its test."""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
import time

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import CheckpointError, ExportError, GraphAdaptError, MergeError
from helpers import max_diff, perturb_adapters, text_inputs, tiny_bert


def tree(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def bert():
    """Tiny BERT with LoRA (q, v) and a SeqBn adapter, non-zero weights, LoRA active."""
    adapted = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2), "b": ga.SeqBn(reduction_factor=4)}, active=["l"]))
    perturb_adapters(adapted, std=0.3)
    return adapted


# ----------------------------------------------------------------------------- write policy
@pytest.fixture
def hf_dir(tmp_path):
    """A user's Hugging Face model folder, with a legacy pytorch_model.bin next to model.safetensors."""
    d = tmp_path / "hf"
    tiny_bert().save_pretrained(d)
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    return d


def test_save_merged_into_a_hf_model_folder_is_refused(bert, hf_dir):
    before = tree(hf_dir)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*overwrite=True"):
        bert.save_merged(hf_dir, "l")
    assert tree(hf_dir) == before  # nothing deleted, nothing overwritten
    written = bert.save_merged(hf_dir, "l", overwrite=True)  # asked for: replaced, the stale .bin removed
    assert {p.name for p in written} <= set(os.listdir(hf_dir)) and "pytorch_model.bin" not in os.listdir(hf_dir)


def test_save_merged_again_into_its_own_folder_is_allowed(bert, tmp_path):
    bert.save_merged(tmp_path / "m", "l")
    first = tree(tmp_path / "m")
    bert.save_merged(tmp_path / "m", "l")  # graphadapt's own merged checkpoint: replaced without overwrite=True
    assert tree(tmp_path / "m") == first


@pytest.mark.parametrize("writer, foreign", [
    ("save_pretrained", "peft"), ("save_adapters", "peft"), ("to_peft", "graphadapt"),
    ("save_pretrained", "hf"), ("to_peft", "hf"), ("save_adapters", "hf")])
def test_adapter_writers_refuse_another_tools_checkpoint(bert, tmp_path, writer, foreign, hf_dir):
    if foreign == "peft":  # a PEFT checkpoint written by PEFT itself
        import peft

        d = tmp_path / "peft"
        peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(d)
    elif foreign == "graphadapt":
        d = tmp_path / "ga"
        bert.save_pretrained(d)
    else:
        d = hf_dir
    before = tree(d)
    single = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2)}))
    with pytest.raises(CheckpointError, match="overwrite=True"):
        getattr(single, writer)(d)
    assert tree(d) == before


def test_own_checkpoints_are_saved_again_in_place(bert, tmp_path):
    single = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2)}))
    for writer in ("save_pretrained", "save_adapters", "to_peft"):
        d = tmp_path / writer
        getattr(single, writer)(d)
        getattr(single, writer)(d)  # the same kind of graphadapt output: replaced
    with pytest.raises(CheckpointError, match="overwrite must be True or False"):
        single.save_adapters(tmp_path / "x", overwrite="yes")


def test_export_onto_a_file_graphadapt_did_not_write_is_refused_before_work(tmp_path):
    from graphadapt.writes import claim_export

    target = tmp_path / "model.onnx"
    target.write_bytes(b"the user's own file")
    with pytest.raises(ExportError, match=r"model\.onnx already exists.*overwrite=True"):
        ga.export_onnx(ga.apply(tiny_bert(), ga.LoRA(r=2)), target)
    assert target.read_bytes() == b"the user's own file"
    claim_export(target, True, ExportError)  # overwrite=True lets it through
    (tmp_path / "w.onnx.data").write_bytes(b"someone's weights")
    with pytest.raises(ExportError, match=r"w\.onnx\.data"):
        claim_export(tmp_path / "w.onnx", False, ExportError)


def test_edited_alpha_in_spec_json_is_detected(bert, tmp_path):
    bert.save_pretrained(tmp_path / "p")
    bert.save_adapters(tmp_path / "a")
    for d in (tmp_path / "p", tmp_path / "a"):
        spec = json.loads((d / "spec.json").read_text())
        spec["spec"]["adapters"]["l"]["alpha"] = 99
        (d / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="spec.json was modified"):
        ga.from_pretrained(tiny_bert(), tmp_path / "p")
    with pytest.raises(CheckpointError, match="spec.json was modified"):
        ga.load(tiny_bert(), tmp_path / "a")
    cfg = tmp_path / "p" / "adapter_config.json"
    c = json.loads(cfg.read_text())
    c["adapters"] = ["l"]
    cfg.write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="adapter_config.json was modified"):
        from graphadapt.checkpoints.pretrained import read_pretrained_config

        read_pretrained_config(tmp_path / "p")


def test_save_merged_on_a_read_only_directory_is_a_checkpoint_error(bert, tmp_path, monkeypatch):
    import errno

    import graphadapt.checkpoints.merged as merged

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)  # the writability probe
    called = []
    monkeypatch.setattr(merged, "_plan_items", lambda *a, **k: called.append(1))
    with pytest.raises(CheckpointError, match="read-only"):
        bert.save_merged(tmp_path / "m", "l")
    assert not called and not (tmp_path / "m").exists()  # refused before any work


# ----------------------------------------------------------------------------- pickling
def test_torch_save_of_an_adapted_model_round_trips_and_keeps_the_file(bert, tmp_path):
    x = text_inputs(2, 6)
    want = bert(**x).last_hidden_state
    target = tmp_path / "existing.pt"
    target.write_bytes(b"old")
    torch.save(bert, target)
    back = torch.load(target, weights_only=False)
    assert torch.equal(back(**x).last_hidden_state, want)
    assert back.active_adapters() == ["l"] and back.adapter_names() == ["l", "b"]
    assert max_diff(back(**x), bert(**x)) == 0.0
    with bert.disable_adapters():
        base = bert(**x).last_hidden_state
    assert not torch.allclose(base, want)  # the adapters did something


def test_pickle_of_a_merged_model_rebuilds_merged_and_unmerges_exactly():
    x = text_inputs(2, 6)
    adapted = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2)}))
    perturb_adapters(adapted, std=0.3)
    want = adapted(**x).last_hidden_state
    adapted.merge(in_place=True)  # the source now holds merged weights: the pickle carries the originals
    merged_out = adapted(**x).last_hidden_state
    back = pickle.loads(pickle.dumps(adapted))
    assert back.is_merged and torch.equal(back(**x).last_hidden_state, merged_out)
    back.unmerge()
    assert torch.equal(back(**x).last_hidden_state, want)
    adapted.unmerge()
    gone = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2)}))
    gone.merge(in_place=True, keep_backup=False)
    with pytest.raises(MergeError, match="cannot be pickled"):
        pickle.dumps(gone)


# ----------------------------------------------------------------------------- concurrency
def test_forwards_during_set_active_merge_and_disable_see_a_valid_state():
    """1000 forwards in two threads while a third switches adapters, merges/unmerges, disables and
    composes: every output equals the output of one of the valid states within 1e-6."""
    torch.set_num_threads(1)
    adapted = ga.apply(tiny_bert(num_hidden_layers=1),
                       ga.Spec({"l1": ga.LoRA(r=2), "l2": ga.LoRA(r=2, targets=("q", "k", "v"))}))
    perturb_adapters(adapted, std=0.5)
    x = text_inputs(2, 5)

    def out():
        return adapted(**x).last_hidden_state.detach()

    valid = {}
    with torch.no_grad():
        for name, setup in (("l1", "l1"), ("l2", "l2"), ("both", None), ("stack", ga.Stack("l2", "l1"))):
            adapted.set_active(setup)
            valid[name] = out()
        with adapted.disable_adapters():
            valid["base"] = out()
        adapted.set_active(None)
        adapted.merge()
        valid["merged"] = out()
        adapted.unmerge()
    names = list(valid)
    assert all((valid[a] - valid[b]).abs().max() > 1e-3 for i, a in enumerate(names) for b in names[i + 1:]
               if {a, b} not in ({"both", "merged"}, {"both", "stack"}, {"merged", "stack"}))  # LoRAs add up

    stop = threading.Event()
    errors: list = []
    bad: list = []
    i_max = [0]

    def writer():
        try:
            i = 0
            while not stop.is_set():
                step = i % 5
                if step == 0:
                    adapted.set_active("l1")
                elif step == 1:
                    adapted.set_active("l2")
                elif step == 2 and i % 20 == 2:  # merge/unmerge copy the graph (slower): every 4th round
                    adapted.set_active(None)
                    adapted.merge()
                    adapted.unmerge()
                elif step == 3:
                    with adapted.disable_adapters():
                        pass
                elif i in (4, 104):  # a re-plan (slowest): twice
                    adapted.set_active(ga.Stack("l2", "l1"))
                    adapted.set_active(None)
                i += 1
                i_max[0] = i
                time.sleep(0.002)  # writers are preferred: let the readers in between changes
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    def reader(n):
        try:
            with torch.no_grad():
                for _ in range(n):
                    y = out()
                    if not any((y - v).abs().max() <= 1e-6 for v in valid.values()):
                        bad.append(min((y - v).abs().max().item() for v in valid.values()))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    w = threading.Thread(target=writer)
    readers = [threading.Thread(target=reader, args=(500,)) for _ in range(2)]
    w.start()
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    stop.set()
    w.join()
    assert not errors, errors
    assert i_max[0] > 20, "the writer barely ran: the test proves nothing"
    assert not bad, f"{len(bad)} of 1000 outputs match no valid state (closest {max(bad):.2e} off)"


# ----------------------------------------------------------------------------- merged models do not train
@pytest.mark.parametrize("train_first", [False, True])
def test_optimizer_built_before_merge_is_refused_after_it(train_first):
    adapted = ga.apply(tiny_bert(), ga.Spec({"l": ga.LoRA(r=2)}))
    perturb_adapters(adapted, std=0.3)
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    if train_first:
        adapted.train()
    x = text_inputs(2, 6)
    adapted(**x).last_hidden_state.sum().backward()
    opt.step()  # unmerged: trains
    adapted.merge()
    adapted(**x).last_hidden_state.sum()
    with pytest.raises(MergeError, match=r"optimizer.step\(\).*merged.*unmerge\(\)"):
        opt.step()
    adapted.unmerge()
    before = [p.detach().clone() for p in adapted.parameters() if p.requires_grad]
    adapted(**x).last_hidden_state.sum().backward()
    opt.step()  # unmerged again: trains again
    after = [p for p in adapted.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
