"""Memory options of merge and the streaming / low-memory outputs (docs/scale.md).

Irreversible in-place merge (``merge(in_place=True, keep_backup=False)``), overflow handling
of the in-place modes, ``save_merged`` round trips through ``from_pretrained`` and the
export's low-memory path (no fp32 copy of a half model, peak memory in the report).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from helpers import max_diff, perturb_adapters, randomize_lora, run_no_grad, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

ATOL = 1e-5


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- merge modes
def test_irreversible_in_place_merge_writes_callers_storage_and_refuses_unmerge():
    model = tiny_llama()
    caller = _params(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    adapted = ga.apply(model, ga.LoRA(targets=("q", "v", "down"))).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=2, seq=6)
    before = run_no_grad(adapted, inputs)

    report = adapted.merge(in_place=True, keep_backup=False)
    assert len(report.folded) == 6 and adapted.is_merged
    assert max_diff(run_no_grad(adapted, inputs), before) <= ATOL
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), caller[n])}
    assert changed == {r.weight for r in adapted.adapter_records}
    assert all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())  # no new storage
    assert not adapted._merge_state["backups"]  # nothing kept
    assert max_diff(run_no_grad(model, inputs), before) <= ATOL  # the caller's model is merged
    with pytest.raises(ga.MergeError, match="without a backup"):
        adapted.unmerge()
    with pytest.raises(ga.MergeError, match="without a backup"):
        adapted.merge()
    with pytest.raises(ga.MergeError, match="in_place=True"):
        ga.apply(tiny_llama(), ga.LoRA()).merge(keep_backup=False)


def test_irreversible_merge_refuses_nan_adapter_before_writing():
    model = tiny_llama()
    caller = _params(model)
    adapted = ga.apply(model, ga.LoRA(targets=("q", "v"))).eval()
    randomize_lora(adapted)
    target = "adapters.default.layers.1.self_attn.v_proj"
    with torch.no_grad():
        adapted.get_submodule(target).lora_A[0, 1] = float("inf")
    with pytest.raises(ga.MergeError, match="non-finite") as e:
        adapted.merge(in_place=True, keep_backup=False)
    assert target in str(e.value) and not adapted.is_merged
    assert all(torch.equal(p.detach(), caller[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("keep_backup", [True, False])
def test_in_place_merge_overflow_never_installs_non_finite(keep_backup):
    """Finite factors whose fold overflows fp16: reversible in place restores every weight,
    irreversible stops before writing the bad one and names the weights it already merged."""
    model = tiny_llama().to(torch.float16)
    caller = _params(model)
    adapted = ga.apply(model, ga.LoRA(targets=("q",), r=2, alpha=2)).eval()
    randomize_lora(adapted)
    last = adapted.adapter_records[-1].target
    with torch.no_grad():
        mod = adapted.get_submodule(last)
        mod.lora_A.fill_(300.0)
        mod.lora_B.fill_(300.0)  # 2 · 300 · 300 = 180000 > fp16 max
    with pytest.raises(ga.MergeError, match="non-finite") as e:
        adapted.merge(in_place=True, keep_backup=keep_backup)
    assert not adapted.is_merged
    now = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in now.values())
    first_w = adapted.adapter_records[0].weight
    if keep_backup:
        assert all(torch.equal(now[n].detach(), v) for n, v in caller.items())
    else:
        assert "your model changed" in str(e.value) and first_w in str(e.value)
        assert not torch.equal(now[first_w].detach(), caller[first_w])  # merged before the failure
        assert torch.equal(now[adapted.adapter_records[-1].weight].detach(),
                           caller[adapted.adapter_records[-1].weight])  # the bad one untouched


# --------------------------------------------------------------------------- save_merged
def _round_trip(adapted, cls, directory, inputs, **kw):
    files = adapted.save_merged(directory, **kw)
    loaded = cls.from_pretrained(directory).eval()
    return files, loaded, max_diff(run_no_grad(adapted, inputs), run_no_grad(loaded, inputs))


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_merged_llama_tied_round_trip(tmp_path, shard):
    import transformers as T

    model = tiny_llama(causal_lm=True, tie_word_embeddings=True)
    caller = _params(model)
    adapted = ga.apply(model, ga.LoRA(targets=("all-linear",))).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=2, seq=6)
    kw = {} if shard is None else {"max_shard_size": shard}
    files, loaded, diff = _round_trip(adapted, T.LlamaForCausalLM, tmp_path / "m", inputs, **kw)
    assert diff <= ATOL
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again on load
    names = {f.name for f in files}
    if shard is None:
        assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    else:
        assert "model.safetensors.index.json" in names and sum(n.startswith("model-0") for n in names) > 1
    from safetensors import safe_open

    keys = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                keys |= set(st.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # written once
    assert not adapted.is_merged
    assert all(torch.equal(p.detach(), caller[n]) for n, p in model.named_parameters())  # untouched
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(names)  # no temp files left
    # merged weights really differ from the base ones
    assert not torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, caller["model.layers.0.self_attn.q_proj.weight"])


def test_save_merged_bert_and_gpt2_and_resave_replaces_shards(tmp_path):
    import transformers as T

    inputs = text_inputs(batch=2, seq=5, pad=1)
    bert = ga.apply(tiny_bert(), ga.LoRA(targets=("q", "v", "up"))).eval()
    randomize_lora(bert)
    _, _, diff = _round_trip(bert, T.BertModel, tmp_path / "b", inputs, max_shard_size=30_000)
    assert diff <= ATOL
    _, _, diff = _round_trip(bert, T.BertModel, tmp_path / "b", inputs)  # unsharded over the sharded save
    assert diff <= ATOL
    assert not list((tmp_path / "b").glob("model-0*")) and not (tmp_path / "b" / "model.safetensors.index.json").exists()

    gpt2 = ga.apply(tiny_gpt2(causal_lm=True), ga.LoRA(targets=("q", "v", "o"))).eval()  # fused c_attn, Conv1D
    randomize_lora(gpt2)
    _, loaded, diff = _round_trip(gpt2, T.GPT2LMHeadModel, tmp_path / "g", text_inputs(batch=2, seq=5),
                                  dtype="fp32")
    assert diff <= ATOL and loaded.lm_head.weight is loaded.transformer.wte.weight


def test_save_merged_streams_one_weight_at_a_time(tmp_path, monkeypatch):
    import weakref

    from graphadapt.passes import merge as merge_pass

    adapted = ga.apply(tiny_llama(), ga.LoRA(targets=("all-linear",))).eval()
    randomize_lora(adapted)
    live, peak, real = [], [0], merge_pass.fold_chain

    def counting(*a, **k):
        out = real(*a, **k)
        live.append(weakref.ref(out[0]))
        peak[0] = max(peak[0], sum(r() is not None for r in live))
        return out

    monkeypatch.setattr(merge_pass, "fold_chain", counting)
    adapted.save_merged(tmp_path / "m", dtype=torch.float16)
    assert len(live) == 14 and peak[0] == 1  # 7 linears x 2 layers, never two merged weights alive


def test_save_merged_refuses_unfoldable_and_bad_adapters_writing_nothing(tmp_path):
    adapted = ga.apply(tiny_llama(), ga.Spec({"l": ga.LoRA(targets=("q",)), "b": ga.SeqBn()})).eval()
    with pytest.raises(ga.MergeError, match="do not fold"):
        adapted.save_merged(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    adapted.save_merged(tmp_path / "m", names=["l"])  # the foldable one alone is fine
    assert (tmp_path / "m" / "model.safetensors").exists()

    lora = ga.apply(tiny_llama(), ga.LoRA(targets=("q",))).eval()
    randomize_lora(lora)
    with torch.no_grad():
        lora.get_submodule(lora.adapter_records[0].target).lora_B[0, 0] = float("nan")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    with pytest.raises(ga.MergeError, match="non-finite"):
        lora.save_merged(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before  # earlier save intact
    with pytest.raises(ga.CheckpointError, match="max_shard_size"):
        lora.save_merged(tmp_path / "x", max_shard_size="lots")


# --------------------------------------------------------------------------- export memory
class _BigFloatTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records real (not fake/meta) tensors of ``dtype`` with at least ``numel`` elements in new
    memory (not views or in-place results) that torch ops create, and how many were alive at once."""

    def __init__(self, dtype, numel):
        import weakref

        super().__init__()
        self.dtype, self.numel, self.live, self.made, self.most_alive = dtype, numel, weakref.WeakValueDictionary(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        out = func(*args, **(kwargs or {}))
        inputs = set()
        for x in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type != "meta":
                try:
                    inputs.add(x.untyped_storage().data_ptr())
                except RuntimeError:  # tensors without real storage (tracing)
                    pass
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta"
                    and t.dtype == self.dtype and t.numel() >= self.numel
                    and _storage_ptr(t) not in inputs):  # new memory, not a view / in place
                if self.live.get(id(t)) is not t:
                    self.made += 1
                    self.live[id(t)] = t
                self.most_alive = max(self.most_alive, len(self.live))
        return out


def _storage_ptr(t):
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _wide_llama(dtype=torch.float32):
    model = tiny_llama(hidden_size=64, intermediate_size=512)
    return model.to(dtype)


def test_half_model_exports_without_fp32_copies_and_reports_peak_memory(tmp_path, monkeypatch):
    from graphadapt.exporters import export_onnx
    from graphadapt.exporters import verify as verify_mod

    # the fp32-compute reference of verification upcasts each weight for its op (one at a time):
    # counted separately below; here only the export path is watched
    upcasts = _BigFloatTensors(torch.float32, max(p.numel() for p in _wide_llama().parameters()))
    real = verify_mod._high_precision_outputs

    def counted(*args):
        with upcasts:
            return real(*args)

    monkeypatch.setattr(verify_mod, "_high_precision_outputs", lambda *a: None)

    model = _wide_llama(torch.float16)
    adapted = ga.apply(model, ga.LoRA(targets=("all-linear",))).eval()
    randomize_lora(adapted, std=0.02)
    big = max(p.numel() for p in model.parameters())  # 64 x 512 MLP weights
    watch = _BigFloatTensors(torch.float32, big)
    with watch:
        report = export_onnx(adapted, tmp_path / "m.onnx", dtype="fp16")
    assert report.verified and report.merged
    assert watch.made == 0  # merged in fp16, no fp32 round trip of any weight
    monkeypatch.setattr(verify_mod, "_high_precision_outputs", counted)
    report = export_onnx(adapted, tmp_path / "m2.onnx", dtype="fp16")
    assert report.reference_dtype == "fp16 weights, fp32 compute" and report.noise_floor
    assert upcasts.made >= 2 and upcasts.most_alive == 1
    assert not adapted.is_merged  # the export merged a copy, never the model
    assert set(report.peak_rss) >= {"prepare", "export", "save", "verify"}
    assert report.rss_start > 0 and report.peak_rss_delta >= 0
    assert all(v >= report.rss_start // 2 for v in report.peak_rss.values())
    assert "peak memory" in report.summary()


def test_fp32_to_fp16_export_converts_one_weight_at_a_time(tmp_path):
    """The fp16 export copy is made tensor by tensor: never two fp32 weight-sized temporaries
    alive at once (a deepcopy-then-convert, the old way, held the whole fp32 model twice)."""
    from graphadapt.exporters import export_onnx

    model = _wide_llama(torch.float32)
    adapted = ga.apply(model, ga.LoRA(targets=("all-linear",))).eval()
    randomize_lora(adapted, std=0.02)
    big = max(p.numel() for p in model.parameters())
    watch = _BigFloatTensors(torch.float32, big)
    with watch:
        report = export_onnx(adapted, tmp_path / "m.onnx", dtype="fp16", verify=False)
    assert report.merged
    assert watch.made >= 2 and watch.most_alive == 1  # each merged fp32 weight, freed before the next


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_lazy_merge_export_writes_the_same_weights_and_holds_no_merged_copy(tmp_path, monkeypatch):
    """Merged weights above the exporter's folding limit are computed while the file is written,
    one at a time: the file is bitwise the one an eager merge writes (LoRA + IA3 on one weight),
    and when the exporter keeps a placeholder in a form not covered the export falls back to
    real values, still bitwise equal."""
    from graphadapt.exporters import dtype as dtype_mod
    from graphadapt.exporters import export_onnx
    from graphadapt.exporters import onnx as onnx_mod

    model = _wide_llama(torch.float16)
    adapted = ga.apply(model, {"l": ga.LoRA(targets=("all-linear",)), "i": ga.IA3()}).eval()
    perturb_adapters(adapted, seed=1, std=0.05)  # lora_B and the IA3 scales away from their identity init
    computed = []
    real_value = dtype_mod.LazyFold.value
    monkeypatch.setattr(dtype_mod.LazyFold, "value", lambda self: computed.append(self.name) or real_value(self))
    lazy = export_onnx(adapted, tmp_path / "lazy.onnx", dtype="fp16")
    assert lazy.verified and lazy.merged and computed  # the MLP weights (64 x 512) were lazy
    assert all(n.startswith("layers.") and n.endswith(".weight") for n in computed)

    monkeypatch.setattr(dtype_mod, "lazy_min_elements", lambda: None)  # eager: merged values in the copy
    eager = export_onnx(adapted, tmp_path / "eager.onnx", dtype="fp16", verify=False)
    monkeypatch.undo()
    monkeypatch.setattr(onnx_mod, "_buffer_view", lambda const: None)  # no placeholder found: fall back
    fallback = export_onnx(adapted, tmp_path / "fallback.onnx", dtype="fp16", verify=False)
    a, b, c = (_initializers(tmp_path / f"{x}.onnx") for x in ("lazy", "eager", "fallback"))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and (a[k] == b[k]).all() and (c[k] == b[k]).all(), k
    assert eager.merged and fallback.merged and not adapted.is_merged


def test_verification_in_parts_runs_every_node_once_and_still_catches_wrong_weights(tmp_path):
    """onnxruntime run part by part (bounded weights per session) gives the one-session outputs
    (to rounding: graph fusions cannot cross a cut), and verification in parts still fails a file
    whose adapter differs."""
    from graphadapt.errors import VerificationError
    from graphadapt.exporters import export_onnx
    from graphadapt.exporters.verify import fresh_inputs, run_onnxruntime, verify_onnx

    adapted = ga.apply(tiny_llama(), ga.LoRA(targets=("all-linear",))).eval()
    randomize_lora(adapted, std=0.05)
    path = tmp_path / "m.onnx"
    report = export_onnx(adapted, path, external_data=True, verify_part_bytes=20_000)
    assert report.verified and report.verify_parts > 3 and "parts" in report.summary()
    inputs = fresh_inputs(path, adapted.example_inputs(), adapted)
    whole, names, _ = run_onnxruntime(path, inputs)
    stats: dict = {}
    parts, names2, _ = run_onnxruntime(path, inputs, part_bytes=1, stats=stats)
    assert stats["parts"] > 20 and names2 == names  # about one node per part
    assert max(float(abs(a - b).max()) for a, b in zip(whole, parts)) < 1e-5  # fusions differ per session
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if n.endswith("lora_B")).mul_(3)
    with pytest.raises(VerificationError, match="disagrees"):
        verify_onnx(path, adapted, part_bytes=20_000)
