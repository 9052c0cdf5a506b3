"""``graphadapt`` command line: inspect | apply | export | verify | pack | demo.

Every stage prints one progress line (with steps or elapsed time on long stages); ``--json``
prints one JSON object on stdout for machines (progress goes to stderr). A failed verification
exits non-zero, so ``graphadapt export`` can gate a deployment pipeline.

Exit codes: 0 success; 1 a graphadapt error (the message names what and how to fix it);
2 bad command-line usage; 3 verification failed (ONNX disagrees with PyTorch beyond
``--atol``/``--rtol``); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from .console import (  # noqa: F401  (re-exported: scripts test the codes)
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_VERIFY,
)
from .console import Progress as _Progress


def _peft_num_labels(directory) -> int | None:
    """The number of labels of the classification head a PEFT checkpoint trained (``modules_to_save``), if any."""
    from pathlib import Path

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(("classifier.weight", "score.weight")) and "pre_classifier" not in key:
                    return int(f.get_slice(key).get_shape()[0])
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the importer, with its own message
        return None
    return None


def _load(args):
    """(name, model, how the class was chosen); the head follows ``--task`` or the config's architectures.
    Parameters transformers initialised at random (a new head) are kept in ``args.new_params``. With
    ``--peft`` and no ``--num-labels``, the head is sized like the checkpoint's trained classifier."""
    from .zoo import default_model, load_model_with_report

    task, num_labels = getattr(args, "task", None), getattr(args, "num_labels", None)
    peft = getattr(args, "peft", None)
    peft = peft[0] if isinstance(peft, list) else peft  # `pack` takes several (--peft is repeatable there)
    if num_labels is None and peft and task in ("seq-cls", "token-cls"):
        num_labels = _peft_num_labels(peft)
        if num_labels is not None:
            print(f"      --num-labels {num_labels} (the classifier the PEFT checkpoint trained)")
    args.new_params = []
    if args.model:
        model, how, args.new_params = load_model_with_report(args.model, task, num_labels, quiet=True)
        return args.model, model, how
    if task is not None or num_labels is not None:
        from .zoo import minilm_dir

        name = "minilm" if minilm_dir() is not None else "tiny-bert"
        model, how, args.new_params = load_model_with_report(name, task, num_labels, quiet=True)
        return name, model, how
    name, model = default_model()
    return name, model, "default model"


def _say_loaded(model, how: str) -> None:
    print(f"      loaded {type(model).__name__} ({how})")


def _heads(params: list[str]) -> str:
    mods = sorted({p.rpartition(".")[0] or p for p in params})
    return ", ".join(mods[:4]) + (f" and {len(mods) - 4} more" if len(mods) > 4 else "")


def _say_new_head(args, adapted=None, source: str | None = None) -> None:
    """transformers' report, in one line: which parameters are random, and whether the adapters restore them."""
    new = getattr(args, "new_params", [])
    if not new:
        return
    if adapted is None:
        print(f"      note: {_heads(new)} newly initialised by transformers (random: not in the model directory)")
        return
    from .checkpoints.trainable import trainable_module_keys

    restored = set(trainable_module_keys(adapted))
    left = [p for p in new if p not in restored]
    if not left:
        print(f"      {_heads(new)}: newly initialised by transformers, restored from {source}")
    else:
        print(f"warning: {_heads(left)} newly initialised by transformers (random) and not in "
              f"{source or 'the adapters'}: outputs that depend on it are random. Train it (Spec task_type or "
              "modules_to_save) or load the model directory that holds it", file=sys.stderr)


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
    base_q = getattr(args, "quantize_base", None)
    qkw = {"quantize": base_q} if base_q else {}
    what = f", base quantized to {base_q}" if base_q else ""
    if spec is None:
        with progress.stage(f"capture + rewrite + import PEFT checkpoint {args.peft} ({name}{what})"):
            adapted = import_peft(model, args.peft, **qkw)
        _say_new_head(args, adapted, args.peft)
        return adapted
    with progress.stage(f"capture + rewrite ({name}{what})"):
        adapted = apply(model, spec, **qkw)
    if getattr(args, "adapters", None):
        with progress.stage(f"load adapters from {args.adapters}"):
            load_adapter_weights(adapted, args.adapters)
        _say_new_head(args, adapted, args.adapters)
    else:
        _say_new_head(args, adapted, args.spec)
    return adapted


def _tolerances(args) -> dict:
    out = {}
    for k in ("atol", "rtol"):
        v = getattr(args, k, None)
        if v is not None:
            if not math.isfinite(v) or v < 0:
                raise SystemExit(f"graphadapt: --{k} must be a finite number >= 0, got {v}")
            out[k] = v
    return out


def _verify_line(max_abs: dict, max_rel: dict, atol, rtol, shapes, providers, seconds=None) -> str:
    worst = max(max_abs, key=max_abs.get) if max_abs else None
    if worst is None:
        return "verified: no outputs compared"
    return (f"verified: ONNX = PyTorch within atol={atol:g}, rtol={rtol:g}; max abs diff {max_abs[worst]:.2e}, "
            f"max rel diff {max(max_rel.values(), default=0.0):.2e} ({worst!r}, {len(max_abs)} output(s)) on "
            f"inputs {shapes} with {', '.join(providers) or 'onnxruntime'}"
            + (f" in {seconds:.1f} s" if seconds is not None else ""))


def _report_dict(rep) -> dict:
    keep = ("path", "dtype", "opset", "input_names", "output_names", "node_count", "file_size", "merged", "verified",
            "max_abs_diff", "max_rel_diff", "atol", "rtol", "verify_input_shapes", "reference_dtype", "providers",
            "seconds", "quantization")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in ((k, getattr(rep, k, None)) for k in keep)}


@contextlib.contextmanager
def _machine_output(args):
    """With ``--json``, everything meant for people goes to stderr; stdout carries only the JSON."""
    if getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- commands
def cmd_inspect(args) -> int:
    from .api import inspect
    from .errors import GraphAdaptError
    from .structure.report import format_report

    if args.layer is not None and not args.why:
        raise SystemExit("graphadapt inspect: --layer goes with --why ROLE")
    with _machine_output(args):
        name, model, how = _load(args)
        _say_new_head(args) if not args.json else None
        rep = inspect(model)
        if args.layer is not None and not 0 <= args.layer < rep["num_layers"]:
            raise GraphAdaptError(f"--layer {args.layer}: {name} has {rep['num_layers']} layers, numbered 0.."
                                  f"{rep['num_layers'] - 1} in graph order (`graphadapt inspect` lists them)")
        if args.svg:
            from .draw import draw_report

            draw_report(rep, args.svg, title=f"{name} ({type(model).__name__})")
            print(f"wrote {args.svg}")
    if args.why:
        answer = rep.why(args.why, args.layer)
        if args.json:
            _emit_json({"model": name, "why": args.why, "layer": args.layer, "answer": answer,
                        "entries": rep.why_entries(args.why, args.layer)})
        else:
            print(f"model: {name} ({type(model).__name__}, {how}); why {args.why}"
                  + (f" in layer {args.layer}" if args.layer is not None else ""))
            print(answer)
        return EXIT_OK
    if args.json:
        _emit_json({"model": name, "class": type(model).__name__, **rep})
    elif not args.svg:
        print(f"model: {name} ({type(model).__name__}, {how})")
        print(format_report(rep))
    return EXIT_OK


def cmd_apply(args) -> int:
    if args.save:  # before seconds of loading and capture
        from .checkpoints import check_save_target

        check_save_target(args.save)
    with _machine_output(args):
        prog = _Progress(3 if args.save else 2)
        adapted = _adapted(args, prog)
        text = adapted.summary(print_fn=None if args.json else print)
        if args.save:
            with prog.stage(f"save adapters to {args.save}"):
                adapted.save_adapters(args.save)
    if args.json:
        _emit_json({"spec": adapted.spec.to_dict(), "summary": text, "saved": args.save,
                    "adapters": {n: {"parameters": adapted.adapter_parameter_count(n),
                                     "sites": [r.target for r in adapted.adapter_records if r.adapter == n]}
                                 for n in adapted.spec.adapters},
                    "base_parameters": adapted.base_parameter_count()})
    return EXIT_OK


def _triton_options(args) -> dict:
    out: dict = {}
    if args.dynamic_batching or args.max_queue_delay_us is not None or args.preferred_batch_size:
        fields: dict = {}
        if args.max_queue_delay_us is not None:
            fields["max_queue_delay_microseconds"] = args.max_queue_delay_us
        if args.preferred_batch_size:
            fields["preferred_batch_size"] = list(args.preferred_batch_size)
        out["dynamic_batching"] = fields or True
    if args.instances is not None or args.instance_kind is not None:
        out["instance_group"] = {"count": 1 if args.instances is None else args.instances,
                                 "kind": f"KIND_{(args.instance_kind or 'auto').upper()}"}
    return out


def _optimum_options(args):
    """The tokenizer for ``--layout optimum`` (loaded before the model: a bad path fails fast), or None."""
    if args.layout != "optimum":
        if args.tokenizer or args.optimum_task:
            raise SystemExit("graphadapt export: --tokenizer/--optimum-task are for --layout optimum")
        return None
    if args.triton:
        raise SystemExit("graphadapt export: --layout optimum writes -o DIR; leave out --triton (or the layout)")
    if args.output == "model.onnx":
        raise SystemExit("graphadapt export: --layout optimum writes a directory: give it with -o DIR")
    if not args.tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as e:
        raise SystemExit(f"graphadapt export: cannot load the tokenizer at {args.tokenizer}: {e}") from None


def cmd_export(args) -> int:
    from .errors import VerificationError
    from .exporters import export_onnx, export_triton

    tol = _tolerances(args)
    triton = _triton_options(args)
    if triton and not args.triton:
        raise SystemExit("graphadapt export: --dynamic-batching/--max-queue-delay-us/--preferred-batch-size/"
                         "--instances/--instance-kind configure a Triton model: add --triton DIR")
    tokenizer = _optimum_options(args)
    quantize = getattr(args, "quantize", None)
    if quantize and (args.triton or args.layout == "optimum" or args.dtype != "fp32"):
        raise SystemExit("graphadapt export: --quantize writes one ONNX file with fp32 activations: drop "
                         "--triton/--layout optimum/--dtype (export the quantized file, then lay it out yourself)")
    if args.triton:  # refuse a bad name or option before seconds of model loading
        from .exporters.triton import check_scheduling, check_model_name

        check_model_name(args.name)
        check_scheduling(triton.get("dynamic_batching", False), triton.get("instance_group"), args.max_batch_size)
    with _machine_output(args):
        prog = _Progress(3 + (1 if args.adapters else 0) + (1 if args.merge and not quantize else 0))
        adapted = _adapted(args, prog)
        if quantize:
            from .quantized import has_quantized_weights

            if not has_quantized_weights(adapted):
                raise SystemExit(f"graphadapt export: --quantize {quantize} writes a quantized base as MatMulNBits, "
                                 "and this model's base is dense: add --quantize-base nf4 (or fp4, int8) to quantize it "
                                 "first, or load a bitsandbytes 4-bit model directory")
        if args.merge and not quantize:  # a quantized export folds adapters itself, before quantizing the base
            with prog.stage("merge"):
                report = adapted.merge()
            print(f"      {report}".replace("\n", "\n      "))
        try:
            with prog.stage(f"export {args.dtype} + verify" if args.verify else f"export {args.dtype}", heartbeat=10):
                if args.triton:
                    path, rep = export_triton(adapted, args.triton, args.name, max_batch_size=args.max_batch_size,
                                              dtype=args.dtype, merge=False, verify=args.verify, opset=args.opset,
                                              return_report=True, **triton, **tol)
                elif args.layout == "optimum":
                    path, rep = args.output, export_onnx(adapted, args.output, layout="optimum", tokenizer=tokenizer,
                                                         task=args.optimum_task, dtype=args.dtype, merge=False,
                                                         verify=args.verify, opset=args.opset, **tol)
                elif quantize:
                    path, rep = args.output, export_onnx(adapted, args.output, quantize=quantize, merge=args.merge,
                                                         verify=args.verify, opset=args.opset, **tol)
                else:
                    path, rep = args.output, export_onnx(adapted, args.output, dtype=args.dtype, merge=False,
                                                         verify=args.verify, opset=args.opset, **tol)
        except VerificationError as e:
            print(f"verification FAILED: {e} (CLI: --atol/--rtol)", file=sys.stderr)
            if args.json:
                _emit_json({"ok": False, "verified": False, "error": str(e)})
            return EXIT_VERIFY
        print(rep.summary())
        if rep.verified:
            print(_verify_line(rep.max_abs_diff, rep.max_rel_diff, rep.atol, rep.rtol, rep.verify_input_shapes,
                               rep.providers))
        q = getattr(rep, "quantization", None)
        if q:
            print(f"quantized base: {q.get('nodes')} MatMulNBits (int{q.get('bits')}, blocks of {q.get('block_size')}); "
                  + (f"drift against the PyTorch model over its {q.get('base')} base: max abs "
                     f"{q['drift_max_abs']:.2e}, rel RMS {q['drift_rel_rms']:.2e}" if "drift_max_abs" in q
                     else "not verified"))
        if args.triton:
            print(f"Triton model repository: {path}")
        if args.layout == "optimum":
            print(f"Optimum ONNX Runtime directory ({rep.metadata.get('graphadapt.optimum_task')}): {path}")
    if args.json:
        _emit_json({"ok": True, **_report_dict(rep), **({"triton_model_dir": str(path)} if args.triton else {})})
    return EXIT_OK


def cmd_verify(args) -> int:
    from .errors import VerificationError
    from .exporters import verify_onnx
    from .exporters.onnx import MERGED_KEY
    from .exporters.verify import check_onnx_file

    tol = _tolerances(args)
    check_onnx_file(args.onnx)  # a missing or non-ONNX file fails before the model is loaded
    with _machine_output(args):
        prog = _Progress(3 + (1 if args.adapters else 0))
        adapted = _adapted(args, prog)
        import onnx

        meta = {p.key: p.value for p in onnx.load(args.onnx, load_external_data=False).metadata_props}
        if meta.get(MERGED_KEY) == "true":  # compare like with like: fold only if the export did
            adapted.merge()
        try:
            with prog.stage(f"verify {args.onnx}", heartbeat=10):
                res = verify_onnx(args.onnx, adapted, **tol)
        except VerificationError as e:
            print(f"verification FAILED: {e} (CLI: --atol/--rtol)", file=sys.stderr)
            if args.json:
                _emit_json({"ok": False, "onnx": args.onnx, "error": str(e)})
            return EXIT_VERIFY
        print(_verify_line(res.max_abs_diff, res.max_rel_diff, res.atol, res.rtol, res.input_shapes, res.providers,
                           res.seconds))
    if args.json:
        _emit_json({"ok": True, "onnx": args.onnx, "max_abs_diff": res.max_abs_diff, "max_rel_diff": res.max_rel_diff,
                    "atol": res.atol, "rtol": res.rtol, "input_shapes": res.input_shapes,
                    "providers": res.providers, "reference_dtype": res.reference_dtype, "seconds": res.seconds})
    return EXIT_OK


def cmd_pack(args) -> int:
    """Adapter checkpoints → onnxruntime adapter files for a swappable export (docs/cli.md, docs/deployment.md)."""
    from .api import import_adapterhub, import_peft, load
    from .errors import VerificationError
    from .exporters.swappable import ADAPTER_SUFFIX, export_onnx_adapter, read_swappable, verify_swappable

    sources = [("graphadapt", d) for d in args.adapters or []] + [("peft", d) for d in args.peft or []] + \
        [("adapterhub", d) for d in args.adapterhub or []]
    if not sources:
        raise SystemExit("graphadapt pack: give at least one checkpoint (--adapters, --peft or --adapterhub DIR)")
    meta, _ = read_swappable(args.onnx)  # not a swappable export: refused before the model is loaded
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    single = len(meta["slots"]) == 1
    results = []
    with _machine_output(args):
        prog = _Progress(1 + len(sources))
        with prog.stage("load model"):
            name, model, how = _load(args)
        _say_loaded(model, how)
        readers = {"graphadapt": lambda d: load(model, d), "peft": lambda d: import_peft(model, d),
                   "adapterhub": lambda d: import_adapterhub(model, d)}
        for kind, d in sources:
            with prog.stage(f"pack {kind} checkpoint {d}"):
                adapted = readers[kind](d)
                names = list(adapted.spec.adapters)
                for adapter in names:
                    stem = Path(d).name + (f".{adapter}" if len(names) > 1 else "")
                    path = export_onnx_adapter(adapted, adapter, out / f"{stem}{ADAPTER_SUFFIX}",
                                               onnx_model=args.onnx, slot=args.slot, overwrite=args.overwrite)
                    row = {"checkpoint": str(d), "format": kind, "adapter": adapter, "file": str(path),
                           "bytes": path.stat().st_size, "verified": False}
                    if args.verify and single:  # with several slots the others keep the export's defaults
                        adapted.set_active(adapter)
                        try:
                            res = verify_swappable(args.onnx, adapted, path)
                        except VerificationError as e:
                            print(f"verification FAILED for {path}: {e}", file=sys.stderr)
                            return EXIT_VERIFY
                        row.update(verified=True, max_abs_diff=res.max_abs_diff)
                    results.append(row)
                    print(f"      {path} ({row['bytes']:,} bytes)" + (
                        f", verified: max abs diff {max(row['max_abs_diff'].values()):.2e}" if row["verified"] else ""))
    if args.json:
        _emit_json({"ok": True, "onnx": args.onnx, "files": results})
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import check_out_dir, run_demo, run_generate_demo

    if args.steps is not None and args.steps < 0:
        raise SystemExit(f"graphadapt demo: --steps must be >= 0, got {args.steps}")
    if not args.no_export:
        check_out_dir(Path(args.out))  # before seconds of training, not after
    if args.task == "generate":
        return run_generate_demo(steps=args.steps if args.steps is not None else 60, out_dir=Path(args.out),
                                 export=not args.no_export)
    return run_demo(model_name=args.model, steps=args.steps if args.steps is not None else 40,
                    out_dir=Path(args.out), export=not args.no_export)


# --------------------------------------------------------------------------- parser
def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    from .structure.explain import WHY_ROLES
    from .zoo import KNOWN, TASKS

    p = argparse.ArgumentParser(prog="graphadapt", description=__doc__.splitlines()[0], epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    model_help = f"a local Hugging Face model directory or one of: {', '.join(KNOWN)} (default: minilm if installed, else tiny-bert)"
    task_help = (f"which head to load: {', '.join(TASKS)} (default: the class named in the directory's config.json "
                 "`architectures`, so a causal LM keeps its LM head and a classifier its classifier; the tiny-* "
                 "names are base models)")
    labels_help = "the classification head's number of labels (e.g. 3 for a 3-label checkpoint); with --task seq-cls/token-cls"

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, epilog=_epilog(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_args(s):
        s.add_argument("--model", help=model_help)
        s.add_argument("--task", choices=list(TASKS), default=None, help=task_help)
        s.add_argument("--num-labels", type=int, default=None, help=labels_help)

    def adapter_source(s):
        """The model and where its adapters come from (a spec, a checkpoint, or a PEFT checkpoint)."""
        model_args(s)
        # one source only: a spec's alpha/targets with a checkpoint's weights would give wrong numbers
        src = s.add_mutually_exclusive_group()
        src.add_argument("--spec", help="spec file (.yaml/.json); not with --adapters (which carries its spec.json) "
                                        "or --peft")
        src.add_argument("--adapters", help="graphadapt adapter checkpoint directory (from `apply --save`)")
        src.add_argument("--peft", help="a PEFT checkpoint directory (adapter_config.json + "
                                        "adapter_model.safetensors)")

    def tolerances(s):
        s.add_argument("--atol", type=float, default=None, help="absolute tolerance (default per dtype: fp32 1e-4)")
        s.add_argument("--rtol", type=float, default=None, help="relative tolerance (default per dtype: fp32 1e-4)")

    s = command("inspect", "show the recognised structure (layers, roles, residuals)")
    model_args(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--why", metavar="ROLE", choices=WHY_ROLES,
                   help=f"say which node and pattern decided ROLE per layer ({', '.join(WHY_ROLES)})")
    s.add_argument("--layer", type=int, default=None, help="with --why: only this layer (graph order, from 0)")
    s.add_argument("--svg", metavar="FILE", help="draw the layers and their recognised roles to an SVG file")
    s.set_defaults(fn=cmd_inspect)

    s = command("apply", "apply a spec, print the adapter summary, optionally save the adapters")
    adapter_source(s)
    s.add_argument("--save", help="write the adapters (spec.json + adapters.safetensors) here")
    s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    s.set_defaults(fn=cmd_apply)

    s = command("export", "apply, (merge,) export to ONNX and verify with onnxruntime")
    adapter_source(s)
    s.add_argument("--merge", dest="merge", action="store_true", default=True, help="fold mergeable adapters (LoRA, IA3, …) into the weights (default)")
    s.add_argument("--no-merge", dest="merge", action="store_false")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    q = s.add_argument_group("quantized base (docs/big-models.md)")
    q.add_argument("--quantize-base", choices=["nf4", "fp4", "int8"], default=None,
                   help="quantize the frozen base when applying (apply(..., quantize=)), as QLoRA trains it")
    q.add_argument("--quantize", choices=["int4", "int8"], default=None,
                   help="write the quantized base linears as onnxruntime MatMulNBits (export_onnx(quantize=)); "
                        "adapters are folded first unless --no-merge")
    s.add_argument("--opset", type=int, default=None)
    s.add_argument("--no-verify", dest="verify", action="store_false", default=True)
    tolerances(s)
    s.add_argument("-o", "--output", default="model.onnx")
    s.add_argument("--json", action="store_true", help="machine-readable report on stdout (progress on stderr)")
    o = s.add_argument_group("Optimum ONNX Runtime directory")
    o.add_argument("--layout", choices=["file", "optimum"], default="file",
                   help="optimum: write -o DIR as config.json + model.onnx (+ generation_config.json, tokenizer) "
                        "for optimum.onnxruntime.ORTModelFor<Task>.from_pretrained")
    o.add_argument("--tokenizer", metavar="DIR", help="with --layout optimum: a tokenizer directory (or hub id in "
                                                       "the cache) saved into the export")
    o.add_argument("--optimum-task", default=None,
                   choices=["text-classification", "token-classification", "question-answering", "text-generation",
                            "feature-extraction"], help="with --layout optimum: the task (default: from the model class)")
    t = s.add_argument_group("Triton model repository")
    t.add_argument("--triton", metavar="DIR", help="write a Triton model repository here instead of -o")
    t.add_argument("--name", default="model", help="Triton model name")
    t.add_argument("--max-batch-size", type=int, default=8)
    t.add_argument("--dynamic-batching", action="store_true", help="let Triton batch requests (dynamic_batching { })")
    t.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="dynamic batching: how long a request may wait for others (microseconds)")
    t.add_argument("--preferred-batch-size", type=int, nargs="+", default=None, help="dynamic batching: preferred sizes")
    t.add_argument("--instances", type=int, default=None, help="instance_group count: model copies Triton runs")
    t.add_argument("--instance-kind", choices=["auto", "cpu", "gpu"], default=None, help="instance_group kind")
    s.set_defaults(fn=cmd_export)

    s = command("verify", "re-check an existing ONNX file against PyTorch")
    s.add_argument("onnx")
    adapter_source(s)
    tolerances(s)
    s.add_argument("--json", action="store_true", help="machine-readable result on stdout (progress on stderr)")
    s.set_defaults(fn=cmd_verify)

    s = command("pack", "pack adapter checkpoints (graphadapt, PEFT, AdapterHub) into onnxruntime adapter files for "
                        "a swappable export (export_onnx(..., swappable=True))")
    s.add_argument("onnx", help="the swappable ONNX export the files are for")
    model_args(s)
    s.add_argument("--adapters", action="append", metavar="DIR", help="graphadapt adapter checkpoint (repeatable)")
    s.add_argument("--peft", action="append", metavar="DIR", help="PEFT checkpoint directory (repeatable)")
    s.add_argument("--adapterhub", action="append", metavar="DIR",
                   help="AdapterHub save_adapter directory (repeatable)")
    s.add_argument("--slot", default=None, help="the export's slot the adapters go into (default: its only slot)")
    s.add_argument("-o", "--output", default="adapters", help="directory for the <checkpoint>.onnx_adapter files")
    s.add_argument("--overwrite", action="store_true", help="replace existing adapter files")
    s.add_argument("--no-verify", dest="verify", action="store_false", default=True,
                   help="skip the onnxruntime-vs-PyTorch check (done when the export has one slot)")
    s.add_argument("--json", action="store_true", help="machine-readable result on stdout (progress on stderr)")
    s.set_defaults(fn=cmd_pack)

    s = command("demo", "LoRA + adapter on the embedded model: train, merge, export, verify, time")
    s.add_argument("--task", default="classify", choices=["classify", "generate"],
                   help="classify: the default demo; generate: a small causal LM learns to count with LoRA, "
                        "decodes with a KV cache, exports a decoder ONNX with past key/values")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--steps", type=int, default=None, help="training steps (default 40; 60 for --task generate)")
    s.add_argument("--out", default="out", help="directory to write demo.onnx (or decoder.onnx) into")
    s.add_argument("--no-export", action="store_true")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    from ._io import Terminated
    from .errors import GraphAdaptError

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
