"""``graphadapt demo``: LoRA + a bottleneck adapter on the embedded model, end to end.

load → apply (LoRA on q,v + Pfeiffer adapter) → train a few steps on a built-in sentiment
task → merge (LoRA folds, the adapter stays) → export ONNX → verify with onnxruntime →
latency of PyTorch vs onnxruntime on the same inputs. Everything is seeded.
"""

from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path

import torch
from torch import nn

POSITIVE = ["a wonderful film with great acting", "i loved every minute of it", "brilliant and moving story",
            "the best meal i have had in years", "a delightful and charming book", "superb service and friendly staff",
            "great value and excellent quality", "an inspiring and joyful performance", "beautiful music and a happy ending",
            "fantastic work , highly recommended", "the team was helpful and kind", "what a lovely surprise"]
NEGATIVE = ["a boring film with terrible acting", "i hated every minute of it", "dull and painful story",
            "the worst meal i have had in years", "a tedious and awful book", "rude service and unfriendly staff",
            "poor value and bad quality", "a depressing and miserable performance", "ugly music and a sad ending",
            "horrible work , not recommended", "the team was useless and rude", "what a nasty disappointment"]


def _tokenize(model_name: str, model: nn.Module, texts: list[str], seq: int):
    """Real WordPiece for MiniLM; a stable word hash into the vocabulary for seeded models."""
    if model_name == "minilm":
        from transformers import AutoTokenizer

        from .zoo import minilm_dir

        tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    vocab = model.config.vocab_size
    ids = torch.zeros(len(texts), seq, dtype=torch.long)
    mask = torch.zeros(len(texts), seq, dtype=torch.long)
    for i, t in enumerate(texts):
        words = t.split()[:seq]
        ids[i, :len(words)] = torch.tensor([1 + zlib.crc32(w.encode()) % (vocab - 1) for w in words])
        mask[i, :len(words)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _median_ms(fn, runs: int = 20) -> tuple[float, float]:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(ts, n=4)
    return statistics.median(ts), q[2] - q[0]


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that cannot be the output directory, before any training (an existing file,
    or a directory that cannot be created or written)."""
    import os

    from .errors import GraphAdaptError

    if out_dir.exists() and not out_dir.is_dir():
        raise GraphAdaptError(f"--out {out_dir} is an existing file; the demo writes its ONNX files into a "
                              "directory: give a directory path (it is created if missing)")
    parent = out_dir if out_dir.exists() else next((p for p in out_dir.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise GraphAdaptError(f"--out {out_dir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraphAdaptError(f"--out {out_dir}: {parent} is not writable; choose another directory")


def run_demo(model_name: str | None = None, steps: int = 40, out_dir: Path = Path("out"), export: bool = True) -> int:
    from . import LoRA, SeqBn, Spec, apply
    from .console import EXIT_OK, EXIT_VERIFY
    from .console import Progress as _Progress
    from .errors import VerificationError
    from .init import isolated_rng
    from .zoo import default_model, load_model

    prog = _Progress(6 if export else 4)
    with prog.stage("load model"):
        name, model = (model_name, load_model(model_name)) if model_name else default_model()
    n_base = sum(p.numel() for p in model.parameters())
    print(f"      model: {name} ({type(model).__name__}, {n_base / 1e6:.1f} M parameters)")

    spec = Spec({"lora": LoRA(r=8, alpha=16, targets=("q", "v")),
                 "adapter": SeqBn(reduction_factor=8, init_weights="mam_adapter")}, seed=0)
    with prog.stage("capture + recognise + insert LoRA and adapter"):
        adapted = apply(model, spec)
    print("      " + adapted.summary(print_fn=None).replace("\n", "\n      "))

    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    batch = _tokenize(name, model, texts, seq=16)
    with torch.no_grad():
        width = adapted(**batch).last_hidden_state.shape[-1]
    with isolated_rng():
        torch.manual_seed(0)
        head = nn.Linear(width, 2)
    params = list(adapted.trainable_parameters().values()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    with prog.stage(f"train {steps} steps on {len(texts)} built-in sentences"):
        adapted.train()
        losses = []
        for step in range(steps):
            if losses:
                prog.tick(step, steps, f"loss {losses[-1]:.3f}")
            logits = head(_pool(adapted(**batch).last_hidden_state, batch["attention_mask"]))
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        adapted.eval()
    with torch.no_grad():
        acc = (head(_pool(adapted(**batch).last_hidden_state, batch["attention_mask"])).argmax(-1) == labels).float().mean()
    n_train = sum(p.numel() for p in params)
    print(f"      trained {n_train:,} parameters ({100 * n_train / n_base:.2f} % of the base); "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}; train accuracy {acc:.0%}")

    with torch.no_grad():
        before = adapted(**batch).last_hidden_state
    with prog.stage("merge"):
        report = adapted.merge()
    with torch.no_grad():
        after = adapted(**batch).last_hidden_state
    print(f"      folded {len(report.folded)} LoRA module(s), kept {len(report.kept)} adapter module(s) in the graph; "
          f"max |merged - unmerged| = {(after - before).abs().max():.2e}")
    if not export:
        return EXIT_OK

    from .exporters import export_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.onnx"
    try:
        with prog.stage(f"export ONNX + verify with onnxruntime → {path}", heartbeat=10):
            rep = export_onnx(adapted, path, merge=False, verify=True)
    except VerificationError as e:
        print(f"verification FAILED: {e}")
        return EXIT_VERIFY
    worst = max(rep.max_abs_diff.values(), default=float("nan"))
    print(f"      {rep.node_count} ONNX nodes, {rep.file_size / 2**20:.1f} MiB; verified on new shapes "
          f"{rep.verify_input_shapes}: max abs diff {worst:.2e}")

    with prog.stage("latency, PyTorch vs onnxruntime (same inputs, CPU)"):
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed_names = [i.name for i in sess.get_inputs()]
        # a tokenizer's single-segment token_type_ids are zeros: feed the file every input it takes
        x = {k: batch[k] if k in batch else torch.zeros_like(batch["input_ids"]) for k in feed_names}
        feed = {k: v.numpy().astype(np.int64) for k, v in x.items()}
        with torch.inference_mode():
            pt_ms, pt_iqr = _median_ms(lambda: adapted(**x))
        ort_ms, ort_iqr = _median_ms(lambda: sess.run(None, feed))
    print(f"      batch {tuple(batch['input_ids'].shape)}: PyTorch {pt_ms:.2f} ms (IQR {pt_iqr:.2f}), "
          f"onnxruntime {ort_ms:.2f} ms (IQR {ort_iqr:.2f}); ratio ort/PyTorch {ort_ms / pt_ms:.2f}")
    return EXIT_OK


# --------------------------------------------------------------------------- generation demo
def _count_batch(g: torch.Generator, vocab: int, n: int, length: int) -> torch.Tensor:
    """Counting sequences ``s, s+1, s+2, …`` over tokens 2..vocab-1 (0 = pad, 1 = eos), wrapping around."""
    start = torch.randint(2, vocab, (n, 1), generator=g)
    return 2 + (start - 2 + torch.arange(length)) % (vocab - 2)


def run_generate_demo(steps: int = 60, out_dir: Path = Path("out"), export: bool = True,
                      new_tokens: int = 16) -> int:
    """A seeded Llama-style LM from a config learns to count with LoRA, then decodes with a KV cache.

    apply (LoRA on every linear) → train → greedy ``generate`` (cached twin) → merge → decoder ONNX
    with past key/values (verified) → greedy decode in onnxruntime; prints whether the tokens agree.
    """
    import numpy as np
    import transformers as T

    from . import LoRA, Spec, apply
    from .console import EXIT_OK, EXIT_VERIFY
    from .console import Progress as _Progress
    from .errors import VerificationError
    from .init import isolated_rng

    vocab = 48
    prog = _Progress(6 if export else 4)
    with prog.stage("build a seeded causal LM from a config (Llama, GQA)"):
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                            bos_token_id=0, eos_token_id=1, pad_token_id=0)
        with isolated_rng():
            torch.manual_seed(0)
            model = T.LlamaForCausalLM(cfg).eval()
    with prog.stage("capture + insert LoRA (and the KV-cached capture generate() uses)"):
        adapted = apply(model, Spec({"count": LoRA(r=8, alpha=16, targets=("all-linear",))}, seed=0))
        prompt = _count_batch(torch.Generator().manual_seed(1), vocab, 4, 4)
        prompt[1:3, :1] = 0  # two left-padded prompts
        mask = (prompt != 0).long()
        before = adapted.generate(prompt, mask, max_new_tokens=new_tokens)
    g = torch.Generator().manual_seed(0)
    target = 2 + (prompt[:, -1:] - 2 + torch.arange(1, new_tokens + 1)) % (vocab - 2)

    def accuracy(ids):
        return (ids[:, prompt.shape[1]:] == target).float().mean().item()

    opt = torch.optim.AdamW(adapted.trainable_parameters().values(), lr=1e-2)
    with prog.stage(f"train {steps} steps: continue s, s+1, s+2, …"):
        adapted.train()
        losses = []
        for step in range(steps):
            if losses:
                prog.tick(step, steps, f"loss {losses[-1]:.3f}")
            x = _count_batch(g, vocab, 32, 12)
            logits = adapted(input_ids=x, attention_mask=torch.ones_like(x)).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        adapted.eval()
    print(f"      loss {losses[0]:.3f} → {losses[-1]:.3f}")
    with prog.stage(f"greedy generate {new_tokens} tokens with the KV cache"):
        after = adapted.generate(prompt, mask, max_new_tokens=new_tokens)
    print(f"      prompt {prompt[0].tolist()} → {after[0, prompt.shape[1]:].tolist()}")
    print(f"      counting accuracy: before training {accuracy(before):.0%}, after {accuracy(after):.0%}")
    with prog.stage("merge"):
        adapted.merge()
    merged = adapted.generate(prompt, mask, max_new_tokens=new_tokens)
    print(f"      merged model generates the same tokens: {torch.equal(merged, after)}")
    if not export:
        return EXIT_OK

    from .exporters import export_decoder_onnx
    from .exporters.decoder import ort_greedy, ort_session

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "decoder.onnx"
    try:
        with prog.stage(f"export decoder ONNX with past key/values + verify → {path}", heartbeat=10):
            rep = export_decoder_onnx(adapted, path, merge=False, input_ids=prompt, attention_mask=mask,
                                      max_new_tokens=new_tokens)
    except VerificationError as e:
        print(f"verification FAILED: {e}")
        return EXIT_VERIFY
    from .generation import cached_twin

    layout = cached_twin(adapted).decoder_cache
    ort_ids, _ = ort_greedy(ort_session(path, ["CPUExecutionProvider"]), prompt, mask, new_tokens, layout,
                            np.float32)
    agree = bool((ort_ids == merged.numpy()).all())
    print(f"      inputs {rep.input_names[:4]} …, outputs {rep.output_names[:2]} …")
    print(f"      onnxruntime greedy decode: {ort_ids[0, prompt.shape[1]:].tolist()}")
    print(f"      onnxruntime tokens agree with PyTorch: {agree}; max |logits diff| "
          f"{max(rep.max_abs_diff.values()):.2e}")
    return EXIT_OK if agree else EXIT_VERIFY
