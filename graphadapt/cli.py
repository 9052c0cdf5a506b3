"""``graphadapt`` command line: inspect | apply | export | verify | demo.

Every stage prints one progress line; a failed verification exits non-zero, so
``graphadapt export`` can gate a deployment pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .console import EXIT_ERROR, EXIT_OK, EXIT_VERIFY  # noqa: F401  (re-exported: scripts test the codes)
from .console import Progress as _Progress

EXIT_TERMINATED = 128 + 15  # the shell's status for SIGTERM
EXIT_INTERRUPTED = 128 + 2  # ... and for SIGINT (Ctrl-C)


def _load(args):
    """(name, model, how the class was chosen); the head follows ``--task`` or the config's architectures."""
    from .zoo import default_model, load_model_with_source

    task = getattr(args, "task", None)
    if args.model:
        model, how = load_model_with_source(args.model, task)
        return args.model, model, how
    if task is not None:
        from .zoo import minilm_dir

        name = "minilm" if minilm_dir() is not None else "tiny-bert"
        model, how = load_model_with_source(name, task)
        return name, model, how
    name, model = default_model()
    return name, model, "default model"


def _say_loaded(model, how: str) -> None:
    print(f"      loaded {type(model).__name__} ({how})")


def _spec_from_args(args):
    from .checkpoints import read_spec
    from .spec import as_spec

    if getattr(args, "spec", None):
        return as_spec(args.spec)
    if getattr(args, "adapters", None):
        return read_spec(args.adapters)
    if getattr(args, "peft", None):
        return None
    raise SystemExit("graphadapt: give --spec spec.yaml (or --adapters CHECKPOINT_DIR holding spec.json)")


def _adapted(args, progress):
    from .api import apply, import_peft
    from .checkpoints import load_adapter_weights

    spec = _spec_from_args(args)
    with progress.stage("load model"):
        name, model, how = _load(args)
    _say_loaded(model, how)
    if spec is None:
        with progress.stage(f"capture + rewrite + import PEFT checkpoint {args.peft} ({name})"):
            return import_peft(model, args.peft)
    with progress.stage(f"capture + rewrite ({name})"):
        adapted = apply(model, spec)
    if getattr(args, "adapters", None):
        with progress.stage(f"load adapters from {args.adapters}"):
            load_adapter_weights(adapted, args.adapters)
    return adapted


# --------------------------------------------------------------------------- commands
def cmd_inspect(args) -> int:
    from .api import inspect
    from .structure.report import format_report

    name, model, how = _load(args)
    rep = inspect(model)
    if args.why:
        answer = rep.why(args.why, args.layer)
        if args.json:
            print(json.dumps({"model": name, "why": args.why, "layer": args.layer, "answer": answer,
                              "entries": rep.why_entries(args.why, args.layer)}, indent=2))
        else:
            print(f"model: {name} ({type(model).__name__}, {how}); why {args.why}"
                  + (f" in layer {args.layer}" if args.layer is not None else ""))
            print(answer)
        return EXIT_OK
    if args.layer is not None:
        raise SystemExit("graphadapt inspect: --layer goes with --why ROLE")
    if args.json:
        print(json.dumps({"model": name, "class": type(model).__name__, **rep}, indent=2))
    else:
        print(f"model: {name} ({type(model).__name__}, {how})")
        print(format_report(rep))
    return EXIT_OK


def cmd_apply(args) -> int:
    if args.save:  # before seconds of loading and capture
        from .checkpoints import check_save_target

        check_save_target(args.save)
    prog = _Progress(3 if args.save else 2)
    adapted = _adapted(args, prog)
    adapted.summary()
    if args.save:
        with prog.stage(f"save adapters to {args.save}"):
            adapted.save_adapters(args.save)
    return EXIT_OK


def cmd_export(args) -> int:
    from .errors import VerificationError
    from .exporters import export_onnx, export_triton

    if args.triton:  # refuse a bad name before seconds of model loading
        from .exporters.triton import check_model_name

        check_model_name(args.name)
    prog = _Progress(3 + (1 if args.adapters else 0) + (1 if args.merge else 0))
    adapted = _adapted(args, prog)
    if args.merge:
        with prog.stage("merge"):
            report = adapted.merge()
        print(f"      {report}".replace("\n", "\n      "))
    try:
        with prog.stage(f"export {args.dtype} + verify" if args.verify else f"export {args.dtype}"):
            if args.triton:
                path = export_triton(adapted, args.triton, args.name, max_batch_size=args.max_batch_size,
                                     dtype=args.dtype, merge=False, verify=args.verify)
                rep = None
            else:
                rep = export_onnx(adapted, args.output, dtype=args.dtype, merge=False, verify=args.verify,
                                  opset=args.opset)
    except VerificationError as e:
        print(f"verification FAILED: {e}", file=sys.stderr)
        return EXIT_VERIFY
    if rep is not None:
        print(rep.summary())
    else:
        print(f"Triton model repository: {path}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .errors import VerificationError
    from .exporters import verify_onnx
    from .exporters.onnx import MERGED_KEY
    from .exporters.verify import check_onnx_file

    check_onnx_file(args.onnx)  # a missing or non-ONNX file fails before the model is loaded
    prog = _Progress(3 + (1 if args.adapters else 0))
    adapted = _adapted(args, prog)
    import onnx

    meta = {p.key: p.value for p in onnx.load(args.onnx, load_external_data=False).metadata_props}
    if meta.get(MERGED_KEY) == "true":  # compare like with like: fold only if the export did
        adapted.merge()
    try:
        with prog.stage(f"verify {args.onnx}"):
            res = verify_onnx(args.onnx, adapted)
    except VerificationError as e:
        print(f"verification FAILED: {e}", file=sys.stderr)
        return EXIT_VERIFY
    print(res.summary() if hasattr(res, "summary") else res)
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo, run_generate_demo

    if args.steps is not None and args.steps < 0:
        raise SystemExit(f"graphadapt demo: --steps must be >= 0, got {args.steps}")
    if args.task == "generate":
        return run_generate_demo(steps=args.steps if args.steps is not None else 60, out_dir=Path(args.out),
                                 export=not args.no_export)
    return run_demo(model_name=args.model, steps=args.steps if args.steps is not None else 40, out_dir=Path(args.out), export=not args.no_export)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .structure.explain import WHY_ROLES
    from .zoo import KNOWN, TASKS

    p = argparse.ArgumentParser(prog="graphadapt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    model_help = f"a local Hugging Face model directory or one of: {', '.join(KNOWN)} (default: minilm if installed, else tiny-bert)"
    task_help = (f"which head to load: {', '.join(TASKS)} (default: the class named in the directory's config.json "
                 "`architectures`, so a causal LM keeps its LM head and a classifier its classifier; the tiny-* "
                 "names are base models)")

    def adapter_source(s):
        """The model and where its adapters come from (a spec, a checkpoint, or a PEFT checkpoint)."""
        s.add_argument("--model", help=model_help)
        s.add_argument("--task", choices=list(TASKS), default=None, help=task_help)
        # one source only: a spec's alpha/targets with a checkpoint's weights would give wrong numbers
        src = s.add_mutually_exclusive_group()
        src.add_argument("--spec", help="spec file (.yaml/.json); not with --adapters (which carries its spec.json) "
                                        "or --peft")
        src.add_argument("--adapters", help="graphadapt adapter checkpoint directory (from `apply --save`)")
        src.add_argument("--peft", help="a PEFT checkpoint directory (adapter_config.json + "
                                        "adapter_model.safetensors)")

    s = sub.add_parser("inspect", help="show the recognised structure (layers, roles, residuals)")
    s.add_argument("--model", help=model_help)
    s.add_argument("--task", choices=list(TASKS), default=None, help=task_help)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--why", metavar="ROLE", choices=WHY_ROLES,
                   help=f"say which node and pattern decided ROLE per layer ({', '.join(WHY_ROLES)})")
    s.add_argument("--layer", type=int, default=None, help="with --why: only this layer (graph order, from 0)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("apply", help="apply a spec, print the adapter summary, optionally save the adapters")
    adapter_source(s)
    s.add_argument("--save", help="write the adapters (spec.json + adapters.safetensors) here")
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("export", help="apply, (merge,) export to ONNX and verify with onnxruntime")
    adapter_source(s)
    s.add_argument("--merge", dest="merge", action="store_true", default=True, help="fold mergeable adapters (LoRA, IA3, …) into the weights (default)")
    s.add_argument("--no-merge", dest="merge", action="store_false")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--opset", type=int, default=None)
    s.add_argument("--no-verify", dest="verify", action="store_false", default=True)
    s.add_argument("--triton", metavar="DIR", help="write a Triton model repository here instead of -o")
    s.add_argument("--name", default="model", help="Triton model name")
    s.add_argument("--max-batch-size", type=int, default=8)
    s.add_argument("-o", "--output", default="model.onnx")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("verify", help="re-check an existing ONNX file against PyTorch")
    s.add_argument("onnx")
    adapter_source(s)
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("demo", help="LoRA + adapter on the embedded model: train, merge, export, verify, time")
    s.add_argument("--task", default="classify", choices=["classify", "generate"],
                   help="classify: the default demo; generate: a small causal LM learns to count with LoRA, "
                        "decodes with a KV cache, exports a decoder ONNX with past key/values")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--steps", type=int, default=None, help="training steps (default 40; 60 for --task generate)")
    s.add_argument("--out", default="out", help="where to write demo.onnx")
    s.add_argument("--no-export", action="store_true")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    from .errors import GraphAdaptError

    from ._io import Terminated

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except GraphAdaptError as e:
        print(f"\ngraphadapt: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated as e:  # SIGTERM during a write: temp files are gone, earlier files untouched
        print(f"\ngraphadapt: {e}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\ngraphadapt: interrupted; files being written were left as they were before", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
