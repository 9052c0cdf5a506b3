"""graphadapt: parameter-efficient fine-tuning by rewriting a Transformer's torch.export graph."""

from __future__ import annotations

from .version import __version__

from .errors import (CaptureError, CheckpointError, ExportError, GraphAdaptError, MergeError,
                     PassError, SpecError, StructureError, VerificationError)
from .spec import Average, BatchSplit, Fuse, MethodSpec, MultiTask, Parallel, Route, Spec, Split, Stack, as_spec
from . import methods  # noqa: F401  (registers the built-in method plugins)
from .methods.bottleneck import AdapterPlus, Bottleneck, Compacter, CompacterPlusPlus, DoubleSeqBn, ParBn, SeqBn
from .methods.ia3 import IA3
from .methods.adalora import AdaLoRA
from .methods.lora import LoRA
from .methods.prefix import PrefixTuning, eject_prefix
from .methods.union import MAM, UniPELT, Union
from .methods.prompt import PTuning, PromptTuning
from .methods.reft import DiReft, LoReft, NoReft, Reft
from .methods.invertible import InvertibleAdapter
from .methods.vera_hub import VeraHub
from .methods.mtl_lora import MTLLoRA
from .capture import capture
from .quantized import Quantize
from .structure import recognize
from .model import AdaptedModel, MergeReport
from .inference import optimize_for_inference
from .compiling import compile_module as compile
from . import signatures  # noqa: F401,E402  (other call signatures, gradient checkpointing)
from . import generation  # noqa: F401,E402  (public module; api hands its generate to every AdaptedModel)
from .api import apply, from_pretrained, import_adapterhub, import_adapterhub_fusion, import_peft, inspect, load, merge, plan

_LAZY = {"export_onnx": "exporters", "export_triton": "exporters", "verify_onnx": "exporters",
         "export_decoder_onnx": "exporters", "verify_decoder_onnx": "exporters", "generate": "generation",
         "export_onnx_adapter": "exporters", "verify_swappable": "exporters",
         "save_adapters": "checkpoints", "save_merged": "checkpoints.merged", "add_head": "heads",
         "shard": "distributed", "ShardedModel": "distributed", "full_adapter_state": "distributed",
         "save_sharded_adapters": "distributed", "adapter_state_dict": "distributed",
         "load_dcp_adapters": "distributed"}


def __getattr__(name):  # exporters pull in onnx/onnxscript: import them on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'graphadapt' has no attribute {name!r}")


__all__ = [
    "__version__", "apply", "merge", "inspect", "plan", "capture", "recognize", "AdaptedModel", "MergeReport",
    "Spec", "MethodSpec", "Stack", "Fuse", "Parallel", "BatchSplit", "Split", "Average", "Route", "MultiTask", "LoRA", "IA3", "AdaLoRA", "Bottleneck", "SeqBn",
    "DoubleSeqBn", "ParBn", "AdapterPlus", "Compacter", "CompacterPlusPlus", "PrefixTuning", "Union", "UniPELT", "MAM",
    "PromptTuning", "PTuning", "Reft", "LoReft", "NoReft", "DiReft", "InvertibleAdapter", "VeraHub", "MTLLoRA", "eject_prefix", "as_spec",
    "GraphAdaptError", "SpecError", "CaptureError", "StructureError", "PassError", "MergeError",
    "CheckpointError", "ExportError", "VerificationError",
    "export_onnx", "export_triton", "verify_onnx", "export_decoder_onnx", "verify_decoder_onnx", "generate", "load",
    "save_adapters", "from_pretrained", "import_peft", "import_adapterhub", "import_adapterhub_fusion", "save_merged",
    "add_head",
    "export_onnx_adapter", "verify_swappable",
    "compile", "optimize_for_inference", "Quantize",
    "shard", "ShardedModel", "full_adapter_state", "save_sharded_adapters", "adapter_state_dict", "load_dcp_adapters",
]
