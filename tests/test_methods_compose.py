"""Composition blocks over two adapters of each weight-delta / weight-transform method, checked against their
definition at a linear site (docs/composition.md): with ``fᵢ(x, y) = y + Δᵢ(x)``,

    Stack(a, b)        = f_b(x, f_a(x, y))  (= out_a + out_b - y where fᵢ(x, y) = y + Δᵢ(x))
    Average(a, b, w)   = Σ wᵢ·fᵢ(x, y)      = w_a·out_a + w_b·out_b   (w normalised to sum 1 unless
                                                                     normalize_weights=False)

The only adapted site is the causal LM's output projection (``lm_head``), so the logits *are* the site's output
and each block's logits are compared with the definition evaluated on the site modules. One capture serves every
method."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.methods import get_method

from helpers import text_inputs, tiny_llama

# non-identity inits (every adapter acts), sized for in = 32 (hidden), out = 128 (vocab)
KW = {"loha": dict(r=2, init_weights=False), "lokr": dict(r=2, init_weights=False),
      "vera": dict(r=4, init_weights=False, projection_prng_key=0),
      "fourierft": dict(n_frequency=50, scaling=20.0, init_weights=False),
      "shira": dict(r=2, init_weights=False, random_seed=5), "c3a": dict(block_size=8, init_weights="gaussian"),
      "randlora": dict(r=4, alpha=8, init_weights=False), "vblora": dict(r=2, num_vectors=8, vector_length=8),
      "gralora": dict(r=4, k=2, hybrid_r=2, init_weights=False),
      "waveft": dict(n_frequency=60, init_weights=False, scaling=100.0),
      "oft": dict(r=0, oft_block_size=8, init_weights=False), "miss": dict(r=8, init_weights=False),
      "hra": dict(r=2, init_weights=False), "boft": dict(boft_block_size=4, init_weights=False),
      "delora": dict(r=4, delora_lambda=2.0, init_weights=False),
      "road": dict(variant="road_2", group_size=8, init_weights=False)}
# the LoRA family and IA3 (named variants of one method: name -> (method, options)); their parameters are perturbed
# after apply (non-zero B, gates, scalings), so every adapter acts
VARIANTS = {"dora": ("lora", dict(r=2, use_dora=True)), "gated": ("lora", dict(r=2, use_gating=True)),
            "adalora": ("adalora", dict(init_r=4, target_r=2)), "ia3": ("ia3", dict(feedforward=())),
            "verahub": ("vera_hub", dict(r=2))}
KW.update({k: v[1] for k, v in VARIANTS.items()})
OUTPUT_SIDE = {"road", "boft", "dora", "ia3"}   # act on y itself (RoAd's rotation, BOFT's output scale, DoRA's
#                                                 magnitude, IA3's scaling): Stack is not a sum
W = (0.25, 1.5)   # with normalize_weights=False: not a convex pair, Average scales y too, by definition


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(causal_lm=True, num_hidden_layers=1, vocab_size=128).eval()
    specs = {f"{m}{i}": get_method(VARIANTS[m][0] if m in VARIANTS else m).spec_class(targets=("re:lm_head",), **k)
             for m, k in KW.items() for i in (1, 2)}
    adapted = ga.apply(model, ga.Spec(specs, active=["loha1"], seed=4)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if any(n.startswith(f"adapters.{v}{i}.") for v in VARIANTS for i in (1, 2)):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = text_inputs(2, 5)
    with torch.no_grad():
        h = model.model(**x, use_cache=False).last_hidden_state   # the site's input
    return adapted, x, h, model.lm_head.weight


@pytest.mark.parametrize("method", list(KW))
def test_stack_and_average_of_two_adapters_follow_the_definition(setup, method):
    """Each block's rows (one Parallel over the blocks: one re-plan per method) equal the definition evaluated on the
    two site modules directly: ``fᵢ(h, h Wᵀ, W)`` with ``h`` the head's input."""
    adapted, x, h, weight = setup
    a, b = f"{method}1", f"{method}2"
    mods = {r.adapter: adapted.get_submodule(r.target) for r in adapted.adapter_records if r.adapter in (a, b)}
    was = {k: m.active for k, m in mods.items()}
    for m in mods.values():
        m.active = True   # modules of adapters outside the active set are switched off
    with torch.no_grad():
        y = torch.nn.functional.linear(h, weight)
        out_a, out_b = mods[a](h, y, weight), mods[b](h, y, weight)
        stacked = mods[b](h, out_a, weight)
    for k, m in mods.items():
        m.active = was[k]
    assert (out_a - y).abs().max() > 1e-3 and (out_b - y).abs().max() > 1e-3, "each adapter acts"
    assert (out_a - out_b).abs().max() > 1e-3, "the two adapters differ"
    if method not in OUTPUT_SIDE:   # fᵢ(h, y) = y + Δᵢ(h): stacking adds the deltas
        torch.testing.assert_close(stacked, out_a + out_b - y, atol=1e-5, rtol=1e-5)
    blocks = [a, b, ga.Stack(a, b), ga.Average(a, b, weights=[1, 3]),
              ga.Average(a, b, weights=list(W), normalize_weights=False)]
    adapted.set_active(ga.Parallel(*blocks))
    with torch.no_grad():
        rows = adapted(**x).logits.split(h.shape[0])
    want = [out_a, out_b, stacked, 0.25 * out_a + 0.75 * out_b, W[0] * out_a + W[1] * out_b]
    for got, ref, block in zip(rows, want, blocks):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m, block=block: f"{block}: {m}")
