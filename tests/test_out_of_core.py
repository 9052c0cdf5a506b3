"""Out-of-core merge: base weights streamed from a sharded checkpoint, one tensor at a time (graphadapt.outofcore)."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

import graphadapt as ga
from graphadapt.errors import CheckpointError, MergeError
from graphadapt.outofcore import Checkpoint, check_merged_against_in_memory, hollow_model, save_merged_from_checkpoint

from helpers import text_inputs, tiny_llama

SPEC = ga.LoRA(r=4, alpha=8, targets=("all-linear",))
SMALL = 64  # the tiny model's linear weights (>= 32x32) stay hollow; norms are read


def _nonzero_b(adapted, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _all_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny fp16 Llama saved in shards (Hugging Face's layout), and an in-memory merge of it."""
    root = tmp_path_factory.mktemp("ooc")
    model = tiny_llama(causal_lm=True).half()
    model.save_pretrained(root / "ckpt", max_shard_size="30KB")
    shards = sorted((root / "ckpt").glob("model-*.safetensors"))
    assert len(shards) >= 2
    # the in-memory reference: the whole model loaded, adapted, merged by save_merged
    import transformers as T

    loaded = T.AutoModelForCausalLM.from_pretrained(root / "ckpt", dtype=torch.float16).eval()
    adapted = ga.apply(loaded, SPEC).eval()
    _nonzero_b(adapted)
    adapted.save_merged(root / "ref")
    ga.save_adapters(adapted, root / "adapters")
    return {"root": root, "dir": root / "ckpt", "ref": _all_tensors(root / "ref"), "base": _all_tensors(root / "ckpt"),
            "adapted": adapted, "shards": [s.name for s in shards], "loaded": loaded}


@pytest.fixture(scope="module")
def streamed(ckpt):
    hollow = hollow_model(ckpt["dir"], small=SMALL)
    adapted = ga.apply(hollow, SPEC).eval()
    with torch.no_grad():
        own = dict(adapted.named_parameters())
        for name, p in ckpt["adapted"].named_parameters():
            if "lora_" in name:
                own[name].copy_(p)
    return hollow, adapted


def test_streamed_merge_equals_in_memory_merge_bit_for_bit(ckpt, streamed, monkeypatch):
    hollow, adapted = streamed
    assert any("q_proj" in n for n in hollow.graphadapt_hollow)  # large weights were never read
    assert not any("norm" in n for n in hollow.graphadapt_hollow)
    live, peak, reads = [0], [0], [0]
    orig = Checkpoint.read

    def counting_read(self, name):  # how many checkpoint tensors are alive at once
        t = orig(self, name)
        reads[0] += 1
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    out = ckpt["root"] / "streamed"
    save_merged_from_checkpoint(ckpt["dir"], adapted, out)
    monkeypatch.undo()
    base, ref = ckpt["base"], ckpt["ref"]
    assert reads[0] == len(base) and peak[0] <= 2  # each tensor read once, one (weight + bias) at a time
    # same shard layout and index as the input
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == ckpt["shards"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((ckpt["dir"] / "model.safetensors.index.json").read_text())["weight_map"]
    got = _all_tensors(out)
    assert set(got) == set(ref) == set(base)
    folded = [k for k in got if "proj" in k]
    assert folded
    for k in got:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    for k in folded:  # the adapter did something: a do-nothing merge would fail here
        assert not torch.equal(got[k], base[k]), k
    # and the per-shard check used by the benchmark agrees
    counts = check_merged_against_in_memory(ckpt["dir"], adapted, out)
    assert counts["tensors"] == len(base) and counts["folded"] == len(folded)
    assert counts["shards"] == len(ckpt["shards"])


def test_merged_checkpoint_loads_and_matches_the_adapted_model(ckpt, streamed):
    import transformers as T

    out = ckpt["root"] / "from_adapters"
    save_merged_from_checkpoint(ckpt["dir"], ckpt["root"] / "adapters", out, dtype="fp32")  # an adapter folder
    got = _all_tensors(out)
    assert all(torch.equal(got[k], v.float()) for k, v in ckpt["ref"].items())
    assert json.loads((out / "config.json").read_text()).get("dtype") == "float32"
    merged = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = text_inputs(2, 7)
    with torch.no_grad():
        want = ckpt["adapted"](**inputs).logits.float()
        base = ckpt["loaded"](**inputs).logits.float()
        have = merged(**inputs, use_cache=False).logits
    assert (have - want).abs().max() < 2e-2 < (base - want).abs().max()


def test_refusals(ckpt, streamed, tmp_path):
    _, adapted = streamed
    with pytest.raises(CheckpointError, match="checkpoint being read"):
        save_merged_from_checkpoint(ckpt["dir"], adapted, ckpt["dir"])
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_merged_from_checkpoint(ckpt["dir"], adapted, foreign)
    assert (foreign / "config.json").read_text() == "{}"
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        save_merged_from_checkpoint(tmp_path, adapted, tmp_path / "out")
    bn = ga.apply(hollow_model(ckpt["dir"], small=SMALL), ga.SeqBn(reduction_factor=4))
    with pytest.raises(MergeError, match="do not fold"):
        save_merged_from_checkpoint(ckpt["dir"], bn, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_in_memory_save_merged_refuses_a_hollow_model(streamed, tmp_path):
    _, adapted = streamed
    with pytest.raises(CheckpointError, match="save_merged_from_checkpoint"):
        adapted.save_merged(tmp_path / "m")  # would write the hollow (unread) weights


@pytest.fixture(scope="module")
def fp16(ckpt, streamed):
    """Out-of-core export writes the checkpoint's dtype: the fp16 checkpoint of ``ckpt``."""
    return {"root": ckpt["root"], "dir": ckpt["dir"], "in_memory": ckpt["adapted"], "adapted": streamed[1],
            "loaded": ckpt["loaded"]}


def test_streamed_reference_equals_the_in_memory_model(fp16):
    from graphadapt.outofcore import StreamedReference, weight_source

    inputs = text_inputs(2, 7)
    ref = StreamedReference(fp16["adapted"], weight_source(fp16["adapted"]))
    with torch.no_grad():
        got = ref(**inputs).logits
        want = fp16["in_memory"](**inputs).logits
        with pytest.raises(CheckpointError, match="never read"):  # without the checkpoint: refused, not garbage
            fp16["adapted"](**inputs)
    assert torch.equal(got, want)
    # under the verifier's fp32 upcast too: the checkpoint reads keep their dtype
    from graphadapt.exporters.verify import _Upcast

    with torch.no_grad(), _Upcast(torch.float16):
        got32 = ref(**inputs).logits
        want32 = fp16["in_memory"](**inputs).logits
    assert got32.dtype == torch.float32 and torch.equal(got32, want32)


def test_out_of_core_onnx_export_verifies_and_matches_the_in_memory_merge(fp16):
    import onnxruntime as ort

    from graphadapt.exporters import export_onnx

    path = fp16["root"] / "model.onnx"
    inputs = text_inputs(2, 7)
    reads = []
    orig = Checkpoint.read
    try:
        Checkpoint.read = lambda self, name: reads.append(name) or orig(self, name)
        rep = export_onnx(fp16["adapted"], path, dtype="fp16", example_inputs=inputs, weights_from=fp16["dir"])
    finally:
        Checkpoint.read = orig
    assert rep.verified and rep.merged
    assert any("q_proj" in n for n in reads)  # the hollow weights came from the checkpoint
    # fp16 is verified against fp32 compute over the same weights, with PyTorch fp16's own error as the
    # noise floor, as for an in-memory model (the streamed reference once fell back to plain fp16 silently)
    assert rep.reference_dtype == "fp16 weights, fp32 compute" and rep.noise_floor["logits"] > 0
    # independent of the streamed reference: the file against the in-memory adapted model (fp16)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feeds)[0]).float()
    with torch.no_grad():
        want = fp16["in_memory"](**inputs).logits.float()
        base = fp16["loaded"](**inputs).logits.float()
    assert (got - want).abs().max() < 2e-2 < (base - want).abs().max()


def test_out_of_core_export_refuses_another_dtype(fp16):
    from graphadapt.exporters import export_onnx

    with pytest.raises(ga.ExportError, match="checkpoint's tensors as they are"):
        export_onnx(fp16["adapted"], fp16["root"] / "x.onnx", dtype="fp32", weights_from=fp16["dir"])


def test_hollow_model_keeps_tied_weights_tied(tmp_path):
    tiny_llama(causal_lm=True, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    model = hollow_model(tmp_path / "tied", small=SMALL)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(CheckpointError, match="lacks"):  # a checkpoint missing a weight is named
        (tmp_path / "tied" / "config.json").write_text(
            (tmp_path / "tied" / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
        hollow_model(tmp_path / "tied")
