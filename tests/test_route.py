"""Route: per-row adapter routing through one graph (``adapter_ids`` input; ``-1`` = base model).

Every routed row must equal the model with only its adapter active (and ``-1`` rows the base model) for
LoRA, DoRA, IA3 (output and input scaling), gated LoRA (the selection fallback) and SeqBn, on tiny BERT and
tiny Llama, in PyTorch and onnxruntime; gradients reach only each row's adapter; greedy generate with mixed
ids equals each adapter's own generate.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.composition.route import LinearRoute, ResidualRoute  # noqa: E402
from graphadapt.contract import InputError  # noqa: E402
from graphadapt.errors import GraphAdaptError, SpecError  # noqa: E402
from graphadapt.generation import cached_twin  # noqa: E402
from graphadapt.kvcache import onnx_io_names, past_input_name  # noqa: E402
from helpers import text_inputs, tiny_bert, tiny_llama  # noqa: E402

NAMES = ("lora", "lora8", "dora", "ia3", "seq")
ADAPTERS = {
    "lora": ga.LoRA(r=4, alpha=6, targets=("q", "v")),
    "lora8": ga.LoRA(r=8, alpha=3, targets=("q", "v", "o")),       # another rank, more sites
    "dora": ga.LoRA(r=2, use_dora=True, targets=("q", "v")),
    "ia3": ga.IA3(targets=("k", "v", "down"), feedforward=("down",)),  # output and input scaling
    "seq": ga.SeqBn(reduction_factor=4),
}
IDS = torch.tensor([0, 1, 2, 3, 4, -1, 2, 0])


def _perturb(adapted, seed=0):
    """Non-zero, distinct weights on every adapter (B of LoRA, DoRA magnitudes, IA3 vectors, bottlenecks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _references(adapted, model, call, names):
    """name → output with only that adapter active; None → the source model's."""
    out = {}
    for i, n in enumerate(names):
        adapted.set_active(n)
        out[i] = call(adapted)
    out[-1] = call(model)
    return out


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    adapted = ga.apply(model, ga.Spec(dict(ADAPTERS), active=ga.Route(*NAMES)))
    _perturb(adapted)
    adapted.eval()
    batch = text_inputs(len(IDS), 6, pad=2)
    refs = _references(adapted, model, lambda m: m(**batch).last_hidden_state.detach(), NAMES)
    adapted.set_active(ga.Route(*NAMES))
    return model, adapted, batch, refs


def _routed(adapted, batch, ids):
    return adapted(**batch, adapter_ids=ids).last_hidden_state


def test_bert_rows_equal_single_adapter_models(bert):
    model, adapted, batch, refs = bert
    assert adapted.input_names[-1] == "adapter_ids"
    kinds = {type(m) for m in adapted.modules()}
    assert LinearRoute in kinds and ResidualRoute in kinds
    with torch.no_grad():
        out = _routed(adapted, batch, IDS)
    for row, i in enumerate(IDS.tolist()):
        torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)
    # the adapters do something, and differently: a router that ignored the ids could not pass the above
    for i in range(len(NAMES)):
        assert (refs[i] - refs[-1]).abs().max() > 1e-2
    assert (refs[0] - refs[1]).abs().max() > 1e-2


def test_bert_output_follows_the_ids(bert):
    _, adapted, batch, refs = bert
    ids = torch.roll(IDS, 1)
    with torch.no_grad():
        out = _routed(adapted, batch, ids)
    for row, i in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        base = _routed(adapted, batch, torch.full_like(IDS, -1))
    torch.testing.assert_close(base, refs[-1], atol=1e-5, rtol=1e-5)


def test_selection_fallback_for_modules_without_a_stacked_form():
    """A gated LoRA has no stacked form: its site runs every adapter and selects per row, exactly."""
    model = tiny_bert()
    names = ("gated", "plain")
    spec = ga.Spec({"gated": ga.LoRA(r=2, use_gating=True, targets=("q",)), "plain": ga.LoRA(r=4, targets=("q",))},
                   active=ga.Route(*names))
    adapted = ga.apply(model, spec)
    _perturb(adapted, seed=3)
    adapted.eval()
    batch = text_inputs(3, 5)
    refs = _references(adapted, model, lambda m: m(**batch).last_hidden_state.detach(), names)
    adapted.set_active(ga.Route(*names))
    ids = torch.tensor([1, -1, 0])
    with torch.no_grad():
        out = _routed(adapted, batch, ids)
    for row, i in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)
    assert (refs[0] - refs[1]).abs().max() > 1e-3


def test_gradients_reach_only_the_rows_adapters(bert):
    _, adapted, batch, _ = bert
    adapted.train()
    try:
        adapted.zero_grad()
        ids = torch.tensor([2, 2, -1, 0, 2, -1, 0, 2])  # dora and lora only
        _routed(adapted, batch, ids).pow(2).mean().backward()
        grads = {}
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                grads.setdefault(n.split(".")[1], []).append(0.0 if p.grad is None else float(p.grad.abs().sum()))
        assert sum(grads["dora"]) > 0 and sum(grads["lora"]) > 0
        for other in ("lora8", "ia3", "seq"):
            assert sum(grads[other]) == 0, other
    finally:
        adapted.zero_grad()
        adapted.eval()


def test_routed_gradients_equal_the_single_adapter_gradients(bert):
    """The gradient an adapter gets from its rows of a mixed batch is the one it gets alone on those rows."""
    _, adapted, batch, _ = bert
    ids = torch.tensor([2, -1, 0, 2, -1, 2, 0, 2])
    rows = ids == 2

    def grads(call):
        adapted.zero_grad()
        out = call()
        out[rows].pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in adapted.named_parameters() if n.startswith("adapters.dora.")}

    routed = grads(lambda: _routed(adapted, batch, ids))
    adapted.set_active("dora")
    try:
        alone = grads(lambda: adapted(**batch).last_hidden_state)
    finally:
        adapted.zero_grad()
        adapted.set_active(ga.Route(*NAMES))
    assert routed.keys() == alone.keys() and routed
    for n in routed:
        assert alone[n].abs().max() > 0
        torch.testing.assert_close(routed[n], alone[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ids,match", [
    (None, "pass adapter_ids"),
    (torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0]), "integers"),
    (torch.zeros(2, 4, dtype=torch.long), "1-D"),
    (torch.zeros(3, dtype=torch.long), "3 entries but the batch has 8"),
    (torch.tensor([0, 1, 2, 3, 4, 5, 0, 0]), "holds 5, outside \\[-1, 4\\]"),
    (torch.tensor([0, 1, 2, 3, 4, -2, 0, 0]), "holds -2"),
])
def test_bad_adapter_ids_are_named(bert, ids, match):
    _, adapted, batch, _ = bert
    with pytest.raises(InputError, match=match):
        adapted(**batch) if ids is None else _routed(adapted, batch, ids)


def test_adapter_ids_as_a_list_or_numpy_array_are_converted(bert):
    import numpy as np

    _, adapted, batch, refs = bert
    with torch.no_grad():
        want = _routed(adapted, batch, IDS)
        assert torch.equal(_routed(adapted, batch, IDS.tolist()), want)
        assert torch.equal(_routed(adapted, batch, np.asarray(IDS.tolist())), want)
    with pytest.raises(InputError, match="integers"):
        _routed(adapted, batch, [0.5] * len(IDS))


def test_route_spec_checks():
    with pytest.raises(SpecError, match="adapter names only"):
        ga.Route("a", ga.Stack("b", "c"))
    with pytest.raises(SpecError, match="twice"):
        ga.Route("a", "a")
    with pytest.raises(SpecError, match="Route"):
        ga.Stack("a", ga.Route("b", "c"))
    assert ga.spec.composition.block_from_dict(ga.Route("a", "b").to_dict()) == ga.Route("a", "b")
    with pytest.raises(SpecError, match="linear sites and residual points only"):
        ga.plan(tiny_bert(), ga.Spec({"p": ga.PrefixTuning(prefix_length=2), "l": ga.LoRA()}, active=ga.Route("p", "l")))


def test_leaving_route_drops_the_input(bert):
    model = tiny_bert()
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(), "b": ga.LoRA()}, active=ga.Route("a", "b")))
    assert "adapter_ids" in adapted.input_names
    _perturb(adapted, seed=4)
    batch, ids = text_inputs(2, 4), torch.tensor([1, 0])
    buf = io.BytesIO()
    torch.save(adapted, buf)  # rebuilt from source + spec (Route kept) + adapter tensors
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(**batch, adapter_ids=ids).last_hidden_state,
                           adapted(**batch, adapter_ids=ids).last_hidden_state)
    adapted.set_active("a")
    assert "adapter_ids" not in adapted.input_names
    adapted(**batch)  # the captured signature again
    adapted.set_active(ga.Route("b", "a"))
    adapted(**batch, adapter_ids=torch.tensor([0, 1]))


# --------------------------------------------------------------------------- Llama, generate, ONNX
LLAMA_NAMES = ("lora", "dora", "ia3", "seq")


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(causal_lm=True)
    spec = ga.Spec({n: ADAPTERS[n] for n in LLAMA_NAMES}, active=ga.Route(*LLAMA_NAMES))
    adapted = ga.apply(model, spec)  # generate and the decoder export go through its cached twin
    _perturb(adapted, seed=1)
    adapted.eval()
    return model, adapted


def _prompt(batch=5, seq=4):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def test_llama_greedy_generate_with_mixed_ids(llama):
    model, adapted = llama
    ids, mask = _prompt()
    route = torch.tensor([0, 1, 2, 3, -1])
    refs = {}
    for i, n in enumerate(LLAMA_NAMES):
        adapted.set_active(n)
        refs[i] = adapted.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    with pytest.raises(GraphAdaptError, match="leave adapter_ids out"):
        adapted.generate(ids, mask, max_new_tokens=2, adapter_ids=torch.zeros(5, dtype=torch.long))
    adapted.set_active(ga.Route(*LLAMA_NAMES))
    refs[-1] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    got = adapted.generate(ids, mask, max_new_tokens=6, eos_token_id=[], adapter_ids=route)
    assert torch.equal(got, adapted.generate(ids, mask, max_new_tokens=6, eos_token_id=[], adapter_ids=route,
                                             cache_implementation="static"))  # the static step routes rows too
    for row, i in enumerate(route.tolist()):
        assert torch.equal(got[row], refs[i][row]), (row, i)
    assert len({tuple(refs[i][0].tolist()) for i in refs}) > 2  # the adapters change the tokens
    # beams inherit their prompt's id: beam search over mixed ids equals each adapter's beam search
    beams = adapted.generate(ids[:2], mask[:2], max_new_tokens=4, num_beams=2, num_return_sequences=2,
                             eos_token_id=[], adapter_ids=torch.tensor([1, 0]))
    for row, i in ((0, 1), (1, 0)):
        adapted.set_active(LLAMA_NAMES[i])
        ref = adapted.generate(ids[row:row + 1], mask[row:row + 1], max_new_tokens=4, num_beams=2,
                               num_return_sequences=2, eos_token_id=[])
        assert torch.equal(beams[2 * row:2 * row + 2], ref)
    adapted.set_active(ga.Route(*LLAMA_NAMES))
    with pytest.raises(InputError, match="pass adapter_ids"):
        adapted.generate(ids, mask, max_new_tokens=2)


def test_llama_forward_rows_in_pytorch_and_onnxruntime(llama, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from graphadapt.exporters import DEFAULT_TOLERANCES

    model, adapted = llama
    ids, mask = _prompt()
    route = torch.tensor([3, 0, -1, 2, 1])
    path = tmp_path / "decoder.onnx"
    report = ga.export_decoder_onnx(adapted, path, merge=False, verify=False)
    assert "adapter_ids" in report.input_names
    twin = cached_twin(adapted)  # the graph just exported, synced with adapted (Route kept)
    assert twin.input_names[-1] == "adapter_ids"
    layout = twin.decoder_cache
    b, past = ids.shape[0], 3
    g = torch.Generator().manual_seed(5)
    feed = {past_input_name(i, kv): torch.randn(b, layout["kv_heads"], past, layout["head_dim"], generator=g)
            for i in range(layout["num_layers"]) for kv in ("key", "value")}
    full = torch.cat([torch.ones(b, past, dtype=torch.long), mask], 1)
    feed.update(input_ids=ids, attention_mask=full,
                position_ids=(full.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:])
    with torch.no_grad():
        out = twin(**feed, adapter_ids=route)
        refs = {}
        for i, n in enumerate(LLAMA_NAMES):
            twin.set_active(n)
            refs[i] = twin(**feed)["logits"]
        twin.set_active([])
        refs[-1] = twin(**feed)["logits"]
        twin.set_active(ga.Route(*LLAMA_NAMES))
    for row, i in enumerate(route.tolist()):
        torch.testing.assert_close(out["logits"][row], refs[i][row], atol=1e-5, rtol=1e-5)
    assert (refs[0] - refs[-1]).abs().max() > 1e-2 and (refs[0] - refs[1]).abs().max() > 1e-2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    rename = onnx_io_names(layout["num_layers"])
    onnx_feed = {rename.get(k, k): v.numpy() for k, v in {**feed, "adapter_ids": route}.items()}
    got = sess.run(["logits"], {k: v for k, v in onnx_feed.items() if k in names})[0]
    atol, rtol = DEFAULT_TOLERANCES[torch.float32]
    for row, i in enumerate(route.tolist()):
        torch.testing.assert_close(torch.from_numpy(got[row]), refs[i][row], atol=atol, rtol=rtol)


def test_bert_onnx_rows(bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from graphadapt.exporters import DEFAULT_TOLERANCES

    _, adapted, batch, refs = bert
    path = tmp_path / "bert.onnx"
    report = ga.export_onnx(adapted, path, example_inputs={**batch, "adapter_ids": IDS}, verify=False)
    assert "adapter_ids" in report.input_names
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    atol, rtol = DEFAULT_TOLERANCES[torch.float32]
    for ids in (IDS, torch.flip(IDS, [0])):
        got = sess.run(["last_hidden_state"], {**{k: v.numpy() for k, v in batch.items()},
                                               "adapter_ids": ids.numpy()})[0]
        for row, i in enumerate(ids.tolist()):
            torch.testing.assert_close(torch.from_numpy(got[row]), refs[i][row], atol=atol, rtol=rtol)


def test_verification_inputs_draw_valid_ids():
    from graphadapt.exporters.verify import _make_input

    ids = _make_input("adapter_ids", (9,), torch.int64, IDS, None, torch.Generator())
    assert ids.min() == -1 and ids.max() == len(NAMES) - 1


def test_signature_variant_is_routed(bert):
    """A call with an input the capture did not see (token_type_ids) is served by a variant, routed too."""
    _, adapted, batch, refs = bert
    with torch.no_grad():
        out = adapted(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), adapter_ids=IDS).last_hidden_state
    for row, i in enumerate(IDS.tolist()):
        torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_bottlenecks_of_other_widths_are_gathered_per_row(build, monkeypatch):
    """Bottleneck adapters that share their placement (pre/post) are routed by one gathered down/up product,
    widths zero-padded exactly; a ParBn (other placement) at the same point makes the site select instead.
    Either way each row equals its adapter's own model."""
    calls = []
    real = ResidualRoute._stacked
    monkeypatch.setattr(ResidualRoute, "_stacked", lambda self, *a: calls.append(1) or real(self, *a))
    model = build()
    for names, gathered in ((("s4", "s8"), True), (("s4", "s8", "par"), False)):
        spec = ga.Spec({"s4": ga.SeqBn(reduction_factor=4), "s8": ga.SeqBn(reduction_factor=8, scaling=0.5),
                        "par": ga.ParBn(reduction_factor=8)}, active=ga.Route(*names))
        adapted = ga.apply(model, spec)
        _perturb(adapted, seed=5)
        adapted.eval()
        batch = text_inputs(4, 5)
        refs = _references(adapted, model, lambda m: m(**batch).last_hidden_state.detach(), names)
        adapted.set_active(ga.Route(*names))
        ids = torch.tensor([1, -1, 0, len(names) - 1])
        calls.clear()
        with torch.no_grad():
            out = _routed(adapted, batch, ids)
        assert bool(calls) == gathered
        for row, i in enumerate(ids.tolist()):
            torch.testing.assert_close(out[row], refs[i][row], atol=1e-5, rtol=1e-5)
        assert (refs[0] - refs[1]).abs().max() > 1e-3


def test_every_wave4_linear_method_routes_per_row():
    """The weight-delta and weight-transform plugins (no stacked form) route by per-row selection: in one
    Route over all sixteen (and AdaLoRA, AdapterHub's VeRA), each row equals the model with only its adapter active; -1 rows the base model."""
    from graphadapt.methods import get_method

    kw = {"loha": dict(r=2, init_weights=False), "lokr": dict(r=2, init_weights=False),
          "vera": dict(r=4, init_weights=False, projection_prng_key=0),
          "fourierft": dict(n_frequency=50, scaling=20.0, init_weights=False),
          "shira": dict(r=2, init_weights=False, random_seed=5), "c3a": dict(block_size=8, init_weights="gaussian"),
          "randlora": dict(r=4, alpha=8, init_weights=False), "vblora": dict(r=2, num_vectors=8, vector_length=8),
          "gralora": dict(r=4, k=2, hybrid_r=2, init_weights=False),
          "waveft": dict(n_frequency=60, init_weights=False, scaling=100.0),
          "oft": dict(r=0, oft_block_size=8, init_weights=False), "miss": dict(r=8, init_weights=False),
          "hra": dict(r=2, init_weights=False), "boft": dict(boft_block_size=4, init_weights=False),
          "delora": dict(r=4, delora_lambda=2.0, init_weights=False),
          "road": dict(variant="road_2", group_size=8, init_weights=False),
          "adalora": dict(init_r=4, target_r=2), "vera_hub": dict(r=2)}     # + AdaLoRA, AdapterHub's VeRA
    specs = {n: get_method(n).spec_class(targets=("q", "v"), **k) for n, k in kw.items()}
    model = tiny_bert(num_hidden_layers=1)
    adapted = ga.apply(model, ga.Spec(specs, active=ga.Route(*specs)))
    _perturb(adapted, seed=7)
    adapted.eval()
    n = len(specs)
    batch = text_inputs(n + 1, 5)
    ids = torch.arange(-1, n)
    with torch.no_grad():
        out = _routed(adapted, batch, ids)
        base = model(**batch).last_hidden_state
        torch.testing.assert_close(out[0], base[0], atol=1e-5, rtol=1e-5)
        for i, name in enumerate(specs):
            adapted.set_active(name)
            ref = adapted(**batch).last_hidden_state
            assert (ref - base).abs().max() > 1e-3, name  # the adapter does something
            torch.testing.assert_close(out[i + 1], ref[i + 1], atol=1e-5, rtol=1e-5, msg=name)
