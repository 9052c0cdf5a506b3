"""Decoding latency of an adapted causal LM, measured side by side in one run (ratios, not absolutes).

    python benchmarks/bench_generate.py [--hidden 256] [--layers 4] [--batch 1] [--new 64] [--runs 10] [--beams 4]
        [--clock wall|cpu] [--compiled] [--repeat 1]

A seeded Llama-style model (GQA) built from a config, LoRA (r=8) on q/v with non-zero weights.
Reports:
  * one decode step with the KV cache (one new token, past of n) vs without (full forward over
    n + 1 tokens) for growing n: the uncached step grows with n (O(n) per token, O(n²) per
    sequence), the cached one stays nearly flat;
  * per-token latency of ``AdaptedModel.generate`` (unmerged and merged) ÷ Hugging Face
    ``generate`` on the same weights (``to_base_model()``), greedy, same prompts, same tokens;
  * the same for beam search (``--beams``, default 4; eos disabled on both sides so every beam
    runs ``--new`` tokens);
  * ``--compiled``: graphadapt's merged ``cache=True`` model after ``adapted.compile()`` decoding with the dynamic
    cache and with ``cache_implementation="static"``, against HF's anchor — the base model with
    ``generation_config.cache_implementation = "static"`` and ``model.forward = torch.compile(model.forward)``
    (inductor, default options on both sides; the first call of each compiles, outside the timing).
Median of --runs after warm-up, with the interquartile range; ``--repeat N`` repeats the greedy table N times and
prints the median ratio of each row over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphadapt as ga  # noqa: E402
from graphadapt.generation import past_input_name  # noqa: E402


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time: steadier on a shared machine)


def timed_interleaved(fns: dict, runs: int) -> dict[str, tuple[float, float]]:
    """Median and IQR (ms) per callable, timing them round-robin so drift hits all equally."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    ts = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = CLOCK()
            fn()
            ts[k].append((CLOCK() - t) * 1e3)
    out = {}
    for k, v in ts.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = (statistics.median(v), q[2] - q[0])
    return out


def build(hidden: int, layers: int, vocab: int):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=hidden * 4, max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--contexts", default="32,128,512")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--compiled", action="store_true",
                    help="add rows: the merged cache=True model after adapted.compile() (dynamic and static cache) "
                         "and HF's compiled static-cache generate (inductor; compiles first)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the greedy table; report median ratios")
    ap.add_argument("--no-beams", action="store_true", help="skip the beam-search table")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = build(args.hidden, args.layers, args.vocab)
    spec = ga.LoRA(r=8, targets=("q", "v"))
    cached = ga.apply(model, spec, cache=True)
    plain = ga.apply(model, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mine = dict(plain.named_parameters())
        for n, p in cached.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                mine[n].copy_(p)
    lay = cached.decoder_cache
    b = args.batch
    print(f"Llama-style LM: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {b}; "
          f"LoRA r=8 on q/v (unmerged); torch {torch.__version__}, {torch.get_num_threads()} threads")

    print("\none decode step (ms, median ± IQR): KV cache vs full recompute")
    print(f"{'context n':>10} {'cached':>16} {'uncached':>16} {'uncached/cached':>16}")
    for n in (int(x) for x in args.contexts.split(",")):
        ids = torch.randint(3, args.vocab, (b, n + 1), generator=g)
        mask = torch.ones_like(ids)
        past = {past_input_name(i, kv): torch.randn(b, lay["kv_heads"], n, lay["head_dim"], generator=g)
                for i in range(lay["num_layers"]) for kv in ("key", "value")}
        pos = torch.full((b, 1), n)

        def step_cached():
            with torch.inference_mode():
                cached(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos, **past)

        def step_full():
            with torch.inference_mode():
                plain(input_ids=ids, attention_mask=mask)

        r = timed_interleaved({"cached": step_cached, "full": step_full}, args.runs)
        c, f = r["cached"], r["full"]
        print(f"{n:>10} {c[0]:>9.2f} ± {c[1]:<4.2f} {f[0]:>9.2f} ± {f[1]:<4.2f} {f[0] / c[0]:>16.2f}")

    print(f"\ngreedy generate, {args.new} new tokens after a {args.prompt}-token prompt: per-token ms")
    ids = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    hf = cached.to_base_model()

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False, pad_token_id=0)

    def ga_generate():
        return cached.generate(ids, mask, max_new_tokens=args.new)

    # every row timed round-robin in the same rounds (merged models are separate copies, so the merged
    # rows are not timed after the others, when the machine's load may differ)
    merged = ga.apply(model, spec, cache=True)
    plain_merged = ga.apply(model, spec)  # a plain capture: generate runs through its cached twin
    for other in (merged, plain_merged):
        with torch.no_grad():
            theirs = dict(other.named_parameters())
            for n, p in cached.named_parameters():
                if n.startswith("adapters."):
                    theirs[n].copy_(p)
        other.merge()
    if args.compiled:
        import copy

        compiled = copy.deepcopy(merged)  # a copy runs eagerly until compiled itself
        compiled.compile()
        t0 = time.perf_counter()
        compiled.generate(ids, mask, max_new_tokens=args.new)
        print(f"(compiled decoding: first generate, compiling included, {time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        compiled.generate(ids, mask, max_new_tokens=args.new, cache_implementation="static")
        print(f"(compiled static decoding: first generate, compiling the step included, "
              f"{time.perf_counter() - t0:.0f} s)")
        hf_static = copy.deepcopy(hf)
        hf_static.generation_config.cache_implementation = "static"
        hf_static.forward = torch.compile(hf_static.forward)

        def hf_static_generate():
            with torch.inference_mode():
                return hf_static.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                          min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        hf_static_generate()
        print(f"(HF compiled static: first generate, compiling included, {time.perf_counter() - t0:.0f} s)")
    rows = {"hf": hf_generate, "ga": ga_generate,
            "ga_merged": lambda: merged.generate(ids, mask, max_new_tokens=args.new),
            "ga_static": lambda: merged.generate(ids, mask, max_new_tokens=args.new, cache_implementation="static"),
            "plain": lambda: plain.generate(ids, mask, max_new_tokens=args.new),
            "plain_merged": lambda: plain_merged.generate(ids, mask, max_new_tokens=args.new)}
    if args.compiled:
        rows["ga_compiled"] = lambda: compiled.generate(ids, mask, max_new_tokens=args.new)
        rows["hf_static"] = hf_static_generate
        rows["ga_compiled_static"] = lambda: compiled.generate(ids, mask, max_new_tokens=args.new,
                                                               cache_implementation="static")
    try:
        import peft

        lcfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        pm = peft.get_peft_model(build(args.hidden, args.layers, args.vocab), lcfg).eval()
        with torch.no_grad():  # same LoRA weights as graphadapt's (same base: seeded build)
            pp = dict(pm.named_parameters())
            for n, p in cached.named_parameters():
                if n.startswith("adapters.") and n.endswith(("lora_A", "lora_B")):
                    path = n.split(".", 2)[2].rsplit(".", 1)[0]  # e.g. model.layers.0.self_attn.q_proj
                    pp[f"base_model.model.{path}.{n.rsplit('.', 1)[1]}.default.weight"].copy_(p)

        def peft_generate():
            with torch.inference_mode():
                return pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        rows["peft"] = peft_generate
    except Exception as e:  # noqa: BLE001 - PEFT is optional here
        print(f"(no PEFT row: {type(e).__name__}: {e})")
    ref = hf_generate()
    same = {k: torch.equal(ref, fn()) for k, fn in rows.items()}
    labels = {"hf": "HF generate (merged weights)", "ga": "graphadapt generate, unmerged LoRA",
              "ga_merged": "graphadapt generate, merged", "ga_static": "graphadapt, merged, static cache (eager)",
              "plain": "plain capture (twin), unmerged",
              "plain_merged": "plain capture (twin), merged", "peft": "PEFT generate, unmerged LoRA",
              "ga_compiled": "graphadapt, merged, adapted.compile()",
              "hf_static": "HF static cache + torch.compile",
              "ga_compiled_static": "graphadapt, merged, compile() + static"}
    ratios: dict[str, list[float]] = {k: [] for k in rows}
    for rep in range(args.repeat):
        r = timed_interleaved(rows, max(3, args.runs // 2))
        per = {k: (v[0] / args.new, v[1] / args.new) for k, v in r.items()}
        if args.repeat > 1:
            print(f"-- repeat {rep + 1}/{args.repeat}")
        for k, label in labels.items():
            if k in per:
                ratios[k].append(per[k][0] / per["hf"][0])
                tail = "" if k == "hf" else f"   ratio {per[k][0] / per['hf'][0]:.2f}   same tokens: {same[k]}"
                print(f"{label:>40} {per[k][0]:8.3f} ± {per[k][1]:.3f}{tail}")
    med = {k: statistics.median(v) for k, v in ratios.items() if v}
    print(f"\nmedian over {args.repeat} repeat(s), per-token ratios measured side by side:")
    print(f"  merged ÷ HF eager: {med['ga_merged']:.3f}   (static cache, eager: {med['ga_static']:.3f})")
    if "peft" in med:
        print(f"  unmerged ÷ HF eager: {med['ga']:.3f}   PEFT unmerged ÷ HF eager: {med['peft']:.3f}   "
              f"graphadapt unmerged ÷ PEFT unmerged: {med['ga'] / med['peft']:.3f}")
    if args.compiled:
        print(f"  HF compiled static ÷ HF eager: {med['hf_static']:.3f}   graphadapt compiled static ÷ HF eager: "
              f"{med['ga_compiled_static']:.3f}   graphadapt compiled static ÷ HF compiled static: "
              f"{med['ga_compiled_static'] / med['hf_static']:.3f}")
    if args.no_beams:
        return

    beams = args.beams
    print(f"\nbeam search (num_beams={beams}, no eos), {args.new} new tokens: per-token ms")

    def hf_beams():
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                               num_beams=beams, do_sample=False, pad_token_id=0)

    def ga_beams():
        return cached.generate(ids, mask, max_new_tokens=args.new, num_beams=beams, eos_token_id=[])

    same_beams = torch.equal(hf_beams(), ga_beams())
    r = timed_interleaved({"hf": hf_beams, "ga": ga_beams}, max(3, args.runs // 2))
    per = {k: (v[0] / args.new, v[1] / args.new) for k, v in r.items()}
    print(f"{'HF generate (merged weights)':>36} {per['hf'][0]:8.3f} ± {per['hf'][1]:.3f}")
    print(f"{'graphadapt generate, unmerged LoRA':>36} {per['ga'][0]:8.3f} ± {per['ga'][1]:.3f}   "
          f"ratio {per['ga'][0] / per['hf'][0]:.2f}   same tokens: {same_beams}")


if __name__ == "__main__":
    main()
