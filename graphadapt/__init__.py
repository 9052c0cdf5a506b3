"""graphadapt: parameter-efficient fine-tuning by rewriting a Transformer's torch.export graph."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (CaptureError, CheckpointError, ExportError, GraphAdaptError, MergeError,
                     PassError, SpecError, StructureError, VerificationError)
from .spec import (IA3, AdapterPlus, Bottleneck, Compacter, CompacterPlusPlus, DoubleSeqBn, LoRA,
                   MethodSpec, ParBn, SeqBn, Spec, as_spec)
from .capture import capture
from .structure import recognize
from .model import AdaptedModel, MergeReport
from .api import apply, inspect, merge

_LAZY = {"export_onnx": "exporters", "export_triton": "exporters", "verify_onnx": "exporters",
         "load": "checkpoints", "save_adapters": "checkpoints", "import_peft": "checkpoints.peft",
         "import_adapterhub": "checkpoints.adapterhub", "save_merged": "checkpoints.merged"}


def __getattr__(name):  # exporters pull in onnx/onnxscript: import them on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'graphadapt' has no attribute {name!r}")


__all__ = [
    "__version__", "apply", "merge", "inspect", "capture", "recognize", "AdaptedModel", "MergeReport",
    "Spec", "MethodSpec", "LoRA", "IA3", "Bottleneck", "SeqBn", "DoubleSeqBn", "ParBn", "AdapterPlus",
    "Compacter", "CompacterPlusPlus", "as_spec",
    "GraphAdaptError", "SpecError", "CaptureError", "StructureError", "PassError", "MergeError",
    "CheckpointError", "ExportError", "VerificationError",
    "export_onnx", "export_triton", "verify_onnx", "load", "save_adapters", "import_peft", "import_adapterhub",
    "save_merged",
]
