"""FSDP2 sharded training of an adapted model (graphadapt.distributed): torchrun, 2 CPU processes, gloo.

One run (module fixture) checks, on each rank and for both policies: three AdamW steps on half the batch
each give gradients and adapter weights equal (fp32, 1e-6) to one process on the whole batch; the base
weights are held as half-size shards and never change; adapters saved from the shards load into an
unsharded model whose outputs equal the single-process model's and the sharded model's. The same run
trains LoRA over bitsandbytes NF4 (double quant) and 8-bit bases, whose packed bytes are sharded too.
A second run drives ``transformers.Trainer`` with FSDP2 over the sharded model (see TRAINER_SCRIPT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    sys.path.insert(0, {tests!r})
    import graphadapt as ga
    from helpers import randomize_lora, text_inputs, tiny_llama

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + rank)  # adapters must come from the seed only

    def build():
        adapted = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=4, targets=("all-linear",)))
        randomize_lora(adapted)  # non-zero A and B: a do-nothing adapter would fail the load check
        return adapted.train()

    def loss_of(out, ids):  # mean over equal-sized halves: the mean of the halves' gradients is the whole's
        logits = out.logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    batches = [text_inputs(4, 6, seed=s) for s in range(3)]
    ref = build()
    ref_opt = torch.optim.AdamW(list(ref.trainable_parameters().values()), lr=1e-2)
    ref_grads = []
    for x in batches:
        ref_opt.zero_grad()
        loss_of(ref(**x), x["input_ids"]).backward()
        ref_grads.append({{n: p.grad.clone() for n, p in ref.trainable_parameters().items()}})
        ref_opt.step()
    probe = text_inputs(3, 5, seed=99)
    with torch.no_grad():
        ref_out = ref.eval()(**probe).logits

    result = {{}}
    for policy in ("layer", "separate"):
        adapted = build()
        init = {{n: p.detach().clone() for n, p in adapted.trainable_parameters().items()}}
        base = {{n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}}
        sharded = ga.shard(adapted, policy=policy)
        units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
        params = dict(adapted.named_parameters())
        local = sum(p.to_local().numel() for n, p in params.items() if n in base)
        full = sum(p.numel() for n, p in params.items() if n in base)
        r = result[policy] = {{"units": len(units), "dtensor": all(isinstance(p, DTensor) for p in params.values()),
                              "local_fraction": local / full, "grad_diff": []}}
        opt = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-2)
        for step, x in enumerate(batches):
            half = {{k: v[2 * rank:2 * rank + 2] for k, v in x.items()}}  # different data on each rank
            opt.zero_grad()
            loss_of(sharded(**half), half["input_ids"]).backward()
            grads = {{n: p.grad.full_tensor() for n, p in adapted.trainable_parameters().items()}}
            assert grads.keys() == ref_grads[step].keys()
            r["grad_diff"].append(max((grads[n] - ref_grads[step][n]).abs().max().item() for n in grads))
            r.setdefault("frozen_grads", 0)
            r["frozen_grads"] += sum(p.grad is not None for n, p in adapted.named_parameters() if n in base)
            opt.step()
        final = ga.full_adapter_state(sharded)
        r["weight_diff"] = max((final[n] - p).abs().max().item() for n, p in ref.trainable_parameters().items())
        r["trained"] = min((final[n] - init[n]).abs().max().item() for n in init)
        r["base_diff"] = max((p.full_tensor() - base[n]).abs().max().item()
                             for n, p in adapted.named_parameters() if n in base)
        sharded.eval()
        with torch.no_grad():
            sharded_out = sharded(**probe).logits
        r["sharded_vs_ref"] = (sharded_out - ref_out).abs().max().item()
        out_dir = {tmp!r} + "/" + policy
        written = ga.save_sharded_adapters(sharded, out_dir)
        r["written"] = None if written is None else sorted(p.name for p in Path(written).iterdir())
        # the shards are installed again after saving: the sharded model still computes the same
        with torch.no_grad():
            r["after_save"] = (sharded(**probe).logits - sharded_out).abs().max().item()
        import torch.distributed.checkpoint as dcp
        dcp.save(ga.adapter_state_dict(sharded), checkpoint_id=out_dir + "-dcp")  # each rank its own shards
        with torch.no_grad():  # resume sharded: wipe the adapters, load the shards back in place
            for t in ga.adapter_state_dict(sharded).values():
                t.to_local().zero_()
            wiped = (sharded(**probe).logits - sharded_out).abs().max().item()
            dcp.load(ga.adapter_state_dict(sharded), checkpoint_id=out_dir + "-dcp")
            r["dcp_resumed"] = [wiped, (sharded(**probe).logits - sharded_out).abs().max().item()]
        if rank == 0:
            fresh = build().eval()
            ga.load_dcp_adapters(fresh, out_dir + "-dcp")
            with torch.no_grad():
                r["dcp_loaded_vs_sharded"] = (fresh(**probe).logits - sharded_out).abs().max().item()
            fresh = build().eval()
            with torch.no_grad():
                r["untrained_vs_ref"] = (fresh(**probe).logits - ref_out).abs().max().item()
                fresh.load_adapters(out_dir)
                loaded = fresh(**probe).logits
            r["loaded_vs_ref"] = (loaded - ref_out).abs().max().item()
            r["loaded_vs_sharded"] = (loaded - sharded_out).abs().max().item()
        dist.barrier()
    # QLoRA: LoRA over a bitsandbytes NF4 (and 8-bit) base; the packed bytes and block scales are sharded too
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is not None:
        import warnings
        import transformers as T
        nf4_dir = {tmp!r} + "/nf4"
        if rank == 0:
            torch.manual_seed(0)
            T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).save_pretrained(nf4_dir)
        dist.barrier()
        quant = {{"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=True),
                  "int8": dict(load_in_8bit=True)}}

        def build_q(kind):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = T.AutoModelForCausalLM.from_pretrained(nf4_dir, quantization_config=T.BitsAndBytesConfig(
                    **quant[kind]), device_map="cpu", dtype=torch.float32).eval()
            adapted = ga.apply(base, ga.LoRA(r=4, targets=("q", "v", "down")))
            randomize_lora(adapted)
            return adapted.train()

        for kind in quant:
            qref = build_q(kind)
            qopt = torch.optim.AdamW(list(qref.trainable_parameters().values()), lr=1e-2)
            qgrads = []
            for x in batches:  # one process, the batch in the ranks' two halves (gradient accumulation): AdamW
                qopt.zero_grad()  # normalises each gradient element, so a ~1e-8 element's fp32 summation order
                for k in range(2):  # (whole batch vs halves) would move its update by ~1e-5
                    half = {{key: v[2 * k:2 * k + 2] for key, v in x.items()}}
                    (loss_of(qref(**half), half["input_ids"]) * 0.5).backward()
                qgrads.append({{n: p.grad.clone() for n, p in qref.trainable_parameters().items()}})
                qopt.step()
            adapted = build_q(kind)
            init = {{n: p.detach().clone() for n, p in adapted.trainable_parameters().items()}}
            # every tensor of the packed base linears (bytes, block scales, code tables), before sharding
            packed = {{f"{{path}}.{{n}}": b.clone() for path, m in adapted.named_modules()
                      if type(m).__name__.startswith("Packed") for n, b in m.named_buffers(recurse=False)}}
            sharded = ga.shard(adapted)
            now = {{**dict(adapted.named_parameters()), **dict(adapted.named_buffers())}}
            shards = {{n: now[n] for n in packed if isinstance(now[n], DTensor)}}
            r = result[kind] = {{"grad_diff": [], "packed": len(packed), "sharded": sorted(shards),
                                "frozen": all(not t.requires_grad for t in shards.values()),
                                "local_bytes": sum(t.to_local().numel() * t.element_size() for t in shards.values()),
                                "full_bytes": sum(t.numel() * t.element_size() for t in shards.values()),
                                "replicated_bytes": sum(t.numel() * t.element_size() for n, t in now.items()
                                                        if n in packed and n not in shards)}}
            opt = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-2)
            assert not any(p.dtype in (torch.uint8, torch.int8) for g in opt.param_groups for p in g["params"])
            for step, x in enumerate(batches):
                half = {{k: v[2 * rank:2 * rank + 2] for k, v in x.items()}}
                opt.zero_grad()
                loss_of(sharded(**half), half["input_ids"]).backward()
                grads = {{n: p.grad.full_tensor() for n, p in adapted.trainable_parameters().items()}}
                r["grad_diff"].append(max((grads[n] - qgrads[step][n]).abs().max().item() for n in grads))
                opt.step()
            final = ga.full_adapter_state(sharded)
            r["weight_diff"] = max((final[n] - p).abs().max().item() for n, p in qref.trainable_parameters().items())
            r["trained"] = min((final[n] - init[n]).abs().max().item() for n in init)
            now = {{**dict(adapted.named_parameters()), **dict(adapted.named_buffers())}}
            full = {{n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in now.items() if n in packed}}
            r["packed_equal"] = full.keys() == packed.keys() and all(
                full[n].dtype == b.dtype and torch.equal(full[n], b) for n, b in packed.items())
    with open({tmp!r} + f"/result{{rank}}.json", "w") as f:
        json.dump(result, f)
    print(f"rank {{rank}} ok", flush=True)
    dist.barrier()  # both ranks reach teardown together (see test_ddp.py)
    dist.destroy_process_group()
    import os
    os._exit(0)  # results are written: skip interpreter teardown (a native thread may abort there, SIGABRT)
""")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    tests = str(Path(__file__).parent)
    script = tmp / "fsdp_run.py"
    script.write_text(SCRIPT.format(tests=tests, tmp=str(tmp)))
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 2, proc.stdout
    return [json.loads((tmp / f"result{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("policy", ["layer", "separate"])
def test_sharded_training_equals_one_process(fsdp_run, policy):
    for rank, result in enumerate(fsdp_run):
        r = result[policy]
        assert len(r["grad_diff"]) == 3 and max(r["grad_diff"]) <= 1e-6, (rank, r["grad_diff"])
        assert r["weight_diff"] <= 1e-6, (rank, r["weight_diff"])
        assert r["trained"] > 1e-4  # every adapter tensor moved
        assert r["frozen_grads"] == 0 and r["base_diff"] == 0.0
        assert r["sharded_vs_ref"] <= 1e-5


@pytest.mark.parametrize("policy", ["layer", "separate"])
def test_base_weights_are_sharded(fsdp_run, policy):
    layers = 2  # tiny_llama: one unit per layer (+ the root)
    adapter_modules = 7 * layers  # LoRA on all seven linears of each layer
    expected = layers + 1 + (adapter_modules if policy == "separate" else 0)
    for result in fsdp_run:
        r = result[policy]
        assert r["dtensor"] and r["units"] == expected
        assert 0.45 <= r["local_fraction"] <= 0.55  # each rank holds half of every base weight


@pytest.mark.parametrize("policy", ["layer", "separate"])
def test_sharded_adapters_load_into_an_unsharded_model(fsdp_run, policy):
    r0, r1 = fsdp_run[0][policy], fsdp_run[1][policy]
    assert r0["written"] and r1["written"] is None  # rank 0 writes
    assert r0["untrained_vs_ref"] > 1e-3  # loading has something to do
    assert r0["loaded_vs_ref"] <= 1e-5 and r0["loaded_vs_sharded"] <= 1e-6
    assert r0["after_save"] == 0.0 and r1["after_save"] == 0.0
    assert r0["dcp_loaded_vs_sharded"] <= 1e-6  # the sharded (torch.distributed.checkpoint) save too
    for r in (r0, r1):
        wiped, resumed = r["dcp_resumed"]
        assert wiped > 1e-3 and resumed == 0.0  # and loads back into the sharded model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trains_sharded_equal_to_one_process(fsdp_run, kind):
    if kind not in fsdp_run[0]:
        pytest.skip("bitsandbytes is not installed")
    for result in fsdp_run:
        r = result[kind]
        assert len(r["grad_diff"]) == 3 and max(r["grad_diff"]) <= 1e-6, r["grad_diff"]
        assert r["weight_diff"] <= 1e-6 and r["trained"] > 1e-4
        assert r["packed"] > 0 and r["packed_equal"]  # the quantized base: bit-identical after training


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_packed_base_is_sharded(fsdp_run, kind):
    """FSDP2 shards the packed bytes and block scales (frozen uint8/int8/float parameters of each layer's
    unit); only the 0-d double-quant offsets stay replicated."""
    if kind not in fsdp_run[0]:
        pytest.skip("bitsandbytes is not installed")
    fields = {"nf4": {"weight_packed", "weight_absmax", "weight_code", "weight_absmax2", "weight_code2"},
              "int8": {"weight_int8", "weight_scb"}}[kind]
    for result in fsdp_run:
        r = result[kind]
        assert r["frozen"] and {n.rpartition(".")[2] for n in r["sharded"]} == fields
        assert len(r["sharded"]) == 2 * 7 * len(fields)  # the seven quantized linears of both layers
        assert 0.49 <= r["local_bytes"] / r["full_bytes"] <= 0.51, r
        assert r["replicated_bytes"] == (4 * 2 * 7 if kind == "nf4" else 0), r  # the 0-d double-quant offsets
    assert fsdp_run[0][kind]["local_bytes"] + fsdp_run[1][kind]["local_bytes"] >= fsdp_run[0][kind]["full_bytes"]


TRAINER_SCRIPT = textwrap.dedent("""
    # transformers.Trainer with fsdp="full_shard", fsdp_config={{"version": 2}} over a model sharded by ga.shard
    # ("fsdp", 2 gloo ranks, 2 rows each) against one unsharded process ("ref", 2 rows x 2 accumulation steps:
    # the same micro-batches, so the same fp32 sums)
    import importlib.util
    import sys
    import torch
    import torch.distributed as dist
    import transformers as T
    sys.path.insert(0, {tests!r})
    import graphadapt as ga
    from helpers import randomize_lora, text_inputs, tiny_llama

    mode = sys.argv[1]
    prepared = []
    sharded_run = mode == "fsdp"
    if sharded_run:
        dist.init_process_group("gloo")
        # accelerate 1.16 selects FSDP only for accelerator devices (MULTI_GPU, MULTI_XPU, ...): its multi-CPU
        # mode wraps in DDP. Emulate the branch it takes there (distributed_type = FSDP, with the plugin, in
        # AcceleratorState and copied to PartialState as AcceleratorState.__init__ does); everything downstream
        # (Trainer's FSDP set-up, Accelerator.prepare's FSDP2 path, backward, gradient clipping, optimizer, the
        # saved state dict) is accelerate's and transformers' own code
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType
        _init = AcceleratorState.__init__

        def _fsdp_on_cpu(self, *a, fsdp_plugin=None, **kw):
            _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
        AcceleratorState.__init__ = _fsdp_on_cpu
        import accelerate.accelerator
        from torch.distributed.fsdp import FSDPModule
        _prepare = accelerate.accelerator.fsdp2_prepare_model

        def _recorded(accelerator, m):  # accelerate's FSDP2 preparation: returns an FSDPModule as it is
            was_sharded = isinstance(m, FSDPModule)
            out = _prepare(accelerator, m)
            prepared.append([was_sharded, out is m])
            return out
        accelerate.accelerator.fsdp2_prepare_model = _recorded
    rank = dist.get_rank() if sharded_run else 0

    def train(shard, resume=None, quantize=None):
        adapted = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=4, targets=("all-linear",)), quantize=quantize)
        randomize_lora(adapted)
        adapted.train()
        init = {{n: p.detach().clone() for n, p in adapted.trainable_parameters().items()}}
        model = ga.shard(adapted) if shard else adapted
        x = text_inputs(12, 6, seed=3)
        rows = [{{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i],
                 "labels": x["input_ids"][i]}}
                for i in range(12)]

        def loss_fn(out, labels, num_items_in_batch):  # summed over tokens / tokens of the global batch
            logits = out.logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     reduction="sum") / num_items_in_batch

        grads, seen = [], []

        class Record(T.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # after Accelerator.prepare: not wrapped (no DDP)
                seen.append(trainer.model_wrapped is model)

            def on_pre_optimizer_step(self, args, state, control, **kw):  # after Trainer's gradient clipping
                grads.append({{n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                              for n, p in adapted.trainable_parameters().items()}})

        kw = dict(fsdp="full_shard", fsdp_config={{"version": 2}}) if sharded_run else {{}}
        kw["save_strategy"], kw["save_steps"] = ("steps", 2) if shard and not quantize else ("no", None)  # checkpoint-2
        args = T.TrainingArguments({tmp!r} + "/trainer-" + mode + ("-resumed" if resume else "") + (quantize or ""),
                                   max_steps=3,
                                   per_device_train_batch_size=2,
                                   gradient_accumulation_steps=1 if sharded_run else 2,
                                   train_sampling_strategy="sequential", learning_rate=1e-2,
                                   lr_scheduler_type="constant", label_names=["labels"], use_cpu=True, report_to=[],
                                   logging_strategy="no", disable_tqdm=True, **kw)
        trainer = T.Trainer(model=model, args=args, train_dataset=rows, compute_loss_func=loss_fn, callbacks=[Record()])
        trainer.train(resume_from_checkpoint=resume)
        saved = None
        if shard and not resume and not quantize:  # Trainer.save_model under FSDP2: a gathered full state dict
            trainer.save_model({tmp!r} + "/trainer-saved")
            if rank == 0:
                from safetensors.torch import load_file
                saved = load_file({tmp!r} + "/trainer-saved/model.safetensors")
        units = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in model.modules())
        return {{"grads": grads, "final": ga.full_adapter_state(model), "init": init, "seen": seen, "units": units,
                "fsdp_enabled": trainer.is_fsdp_enabled, "saved": saved}}

    result = {{"sharded": train(True)}} if sharded_run else {{"ref": train(False)}}
    if importlib.util.find_spec("bitsandbytes") is not None:  # QLoRA: NF4 base (packed bytes sharded too)
        result["nf4"] = train(sharded_run, quantize="nf4")
    if sharded_run:  # a fresh sharded model resumed from Trainer's step-2 checkpoint (weights, AdamW state)
        result["resumed"] = train(True, resume={tmp!r} + "/trainer-fsdp/checkpoint-2")
    if sharded_run:  # an unsharded adapted model handed to accelerate: its layer containers are never called
        result["whole"] = train(False)
    result["prepared"] = prepared
    if rank == 0:
        torch.save(result, {tmp!r} + f"/trainer-{{mode}}.pt")
    print(mode, rank, "ok", flush=True)
    if sharded_run:
        dist.barrier()
        dist.destroy_process_group()
    # results are written: skip interpreter teardown, where a native thread (gloo/accelerate) once aborted with
    # "terminate called without an active exception" after both ranks had finished (CI, under load)
    import os
    os._exit(0)
""")


def test_trainer_fsdp2_over_a_sharded_model_equals_one_process(tmp_path):
    """``Trainer(model=ga.shard(adapted), args=TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2}))``:
    accelerate's FSDP2 preparation leaves the already-sharded model alone, and three AdamW steps (gradient
    clipping on) give the adapter gradients and weights of one unsharded process (accelerate's device choice
    is emulated on CPU, see TRAINER_SCRIPT). An unsharded adapted model handed to the same Trainer becomes one
    FSDP unit (exact, but the whole model is gathered for every step)."""
    import torch

    script = tmp_path / "trainer_run.py"
    script.write_text(TRAINER_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, str(script), "ref"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                 "fsdp"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, run = (torch.load(tmp_path / f"trainer-{m}.pt") for m in ("ref", "fsdp"))
    ref, got, whole = one["ref"], run["sharded"], run["whole"]
    qlora = "nf4" in one  # bitsandbytes installed: the same over an NF4 base
    # accelerate's FSDP2 path: our sharded models came back as they were (2 layers + root); the unsharded adapted
    # model was sharded by accelerate as a single unit (its layer classes are not in the graph): whole-model
    # all-gathers, exact too, but no per-layer memory saving
    assert run["prepared"] == [[True, True]] * (3 if qlora else 2) + [[False, True]]
    assert got["units"] == 3 and whole["units"] == 1 and ref["units"] == 0
    assert got["fsdp_enabled"] and whole["fsdp_enabled"] and not ref["fsdp_enabled"]
    assert got["seen"] == ref["seen"] == [True]  # Trainer trains that model (not a DDP wrapper of it)
    # Trainer.save_model wrote every weight, gathered, under the sharded model's module names (run.submod_<k>....)
    saved, final = got["saved"], got["final"]
    assert len(saved) > len(final) and all(k.startswith("run.") for k in saved)
    by_leaf = {n.replace(".", "_"): t for n, t in final.items()}  # split_module names a call_module target so
    for k, t in saved.items():  # e.g. run.submod_1.adapters_default_model_..._q_proj.lora_A
        mod, _, leaf = k.rpartition(".")
        name = mod.split(".")[-1] + "_" + leaf
        if name in by_leaf:
            assert torch.equal(t, by_leaf.pop(name))
    assert not by_leaf  # every adapter tensor is in the file, equal to the trained one
    # resumed from checkpoint-2 and trained one more step: the uninterrupted run's adapters
    resumed = run["resumed"]
    assert len(resumed["grads"]) == 1
    assert max((resumed["final"][n] - t).abs().max().item() for n, t in final.items()) <= 1e-6
    pairs = [(ref, got), (ref, whole)] + ([(one["nf4"], run["nf4"])] if qlora else [])
    for a_run, b_run in pairs:
        assert len(a_run["grads"]) == len(b_run["grads"]) == 3
        for a, b in zip(a_run["grads"], b_run["grads"]):
            assert a.keys() == b.keys() and max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6
        assert max((a_run["final"][n] - b_run["final"][n]).abs().max().item() for n in a_run["final"]) <= 1e-6
        assert min((b_run["final"][n] - b_run["init"][n]).abs().max().item() for n in b_run["init"]) > 1e-4


def test_sharded_model_signature_names_the_captured_inputs(tmp_path):
    """Trainer keeps the dataset columns ``inspect.signature(model.forward)`` names (``*args, **kwargs`` would
    drop them all)."""
    import inspect

    import torch.distributed as dist

    import graphadapt as ga

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_llama

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        sharded = ga.shard(ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",))))
        assert list(inspect.signature(sharded.forward).parameters) == list(sharded.adapted.input_names)
        assert "input_ids" in sharded.adapted.input_names
    finally:
        dist.destroy_process_group()


def test_shard_refuses_bad_calls():
    import graphadapt as ga

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_llama

    adapted = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)))
    with pytest.raises(ga.GraphAdaptError, match="policy='rows'"):
        ga.shard(adapted, policy="rows")
    with pytest.raises(ga.GraphAdaptError, match="init_process_group"):
        ga.shard(adapted)
    with pytest.raises(ga.GraphAdaptError, match="adapted model"):
        ga.shard(tiny_llama(), policy="layer")


def test_load_dcp_adapters_names_a_mismatched_checkpoint(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    import graphadapt as ga

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import randomize_lora, tiny_llama

    saved = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=4, targets=("q",)))
    randomize_lora(saved)
    dcp.save(ga.adapter_state_dict(saved), checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    same = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=4, targets=("q",)))
    assert ga.load_dcp_adapters(same, tmp_path / "ckpt") == sorted(saved.trainable_parameters())
    assert all(torch.equal(p, saved.get_parameter(n)) for n, p in same.trainable_parameters().items())
    other = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)))
    with pytest.raises(ga.GraphAdaptError, match="spec it was trained with"):
        ga.load_dcp_adapters(other, tmp_path / "ckpt")


@pytest.mark.parametrize("make,spec", [("tiny_bert", "lora"), ("tiny_gpt2", "lora"), ("tiny_bert", "seqbn"),
                                       ("tiny_llama", "prefix")])
def test_one_rank_shard_is_exact_across_architectures_and_methods(tmp_path, make, spec):
    """The cut per layer and the re-homed weight reads (BERT, GPT-2's Conv1D, Llama; weight-delta, residual
    and attention sites): one rank, in process, so outputs and gradients are bit-equal to the unsharded model."""
    import torch
    import torch.distributed as dist

    import graphadapt as ga

    sys.path.insert(0, str(Path(__file__).parent))
    import helpers

    specs = {"lora": lambda: ga.LoRA(r=4, targets=("all-linear",)), "seqbn": ga.SeqBn,
             "prefix": lambda: ga.PrefixTuning(prefix_length=3)}
    x = helpers.text_inputs(2, 5)

    def run(shard: bool):
        adapted = ga.apply(getattr(helpers, make)(), specs[spec]())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapted.trainable_parameters().values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # no adapter starts as a no-op
        adapted.train()
        model = ga.shard(adapted) if shard else adapted
        torch.manual_seed(5)  # the same dropout masks
        out = model(**x).last_hidden_state
        out.pow(2).sum().backward()
        grads = {n: p.grad for n, p in adapted.trainable_parameters().items()}
        return out.detach(), {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        ref_out, ref_grads = run(False)
        out, grads = run(True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and grads
    assert any(g is not None for g in grads.values())
    # (BERT's pooler gets no gradient from last_hidden_state: None on both sides)
    assert all((grads[n] is None) == (ref_grads[n] is None) for n in grads)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads if grads[n] is not None)


def test_shard_refuses_models_it_cannot_shard(tmp_path):
    import torch.distributed as dist

    import graphadapt as ga

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import randomize_lora, text_inputs, tiny_llama

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        merged = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)))
        randomize_lora(merged)
        merged.merge()
        with pytest.raises(ga.GraphAdaptError, match="unmerge"):
            ga.shard(merged)
        checkpointed = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)))
        checkpointed.gradient_checkpointing_enable()
        with pytest.raises(ga.GraphAdaptError, match="gradient_checkpointing_disable"):
            ga.shard(checkpointed)
        adapted = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)))
        sharded = ga.shard(adapted)
        with pytest.raises(ga.GraphAdaptError, match="already sharded"):
            ga.shard(adapted)
        x = text_inputs(2, 4)
        with pytest.raises(ga.GraphAdaptError, match="labels"):
            sharded(**x, labels=x["input_ids"])
        with pytest.raises(ga.GraphAdaptError, match="unsharded model"):
            ga.load_dcp_adapters(adapted, tmp_path)
    finally:
        dist.destroy_process_group()


def test_mixed_precision_keeps_the_block_scales_exact(tmp_path):
    """Under ``mp_policy`` with bf16 parameters, FSDP2 casts floating parameters when it gathers them: the packed
    bytes (uint8) are sharded, the float32 block scales and code tables stay replicated buffers, so a gathered
    4-bit weight dequantizes to exactly the unsharded one."""
    pytest.importorskip("bitsandbytes")
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    import graphadapt as ga
    from graphadapt.quantized import Packed4bitLinear

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_llama

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        for mp, float_sharded in ((None, True), (MixedPrecisionPolicy(param_dtype=torch.bfloat16), False)):
            adapted = ga.apply(tiny_llama(causal_lm=True), ga.LoRA(r=2, targets=("q",)), quantize="nf4")
            packed = {p: m for p, m in adapted.named_modules() if isinstance(m, Packed4bitLinear)}
            dense = {p: m.dequantize() for p, m in packed.items()}
            sharded = ga.shard(adapted, mp_policy=mp)
            for p, m in packed.items():
                assert isinstance(m.weight_packed, DTensor) and m.weight_packed.dtype == torch.uint8
                assert isinstance(m.weight_absmax, DTensor) == float_sharded
                assert m.weight_absmax.dtype == torch.float32
            unit = getattr(sharded.run, sharded.units[0])
            unit.unshard()  # gathered as for forward: under mp, floating parameters in bf16
            try:
                inside = [p for p, m in packed.items() if not isinstance(m.weight_packed, DTensor)]
                assert inside  # this layer's packed linears are gathered
                assert all(torch.equal(packed[p].dequantize(), dense[p]) for p in inside)
            finally:
                unit.reshard()
    finally:
        dist.destroy_process_group()
