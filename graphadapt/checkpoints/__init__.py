"""Adapter checkpoints: ``spec.json`` + ``adapters.safetensors`` in one directory.

(Loading onto a model — apply the saved spec, then these weights — is :func:`graphadapt.load`.)

Modules: :mod:`.files` (atomic writes, validated reads), :mod:`.adapters` (save/load adapters),
:mod:`.matching` (which model a checkpoint fits), :mod:`.pretrained` (``save_pretrained``), and the
importers/exporters :mod:`.peft`, :mod:`.peft_export`, :mod:`.adapterhub`, :mod:`.merged`. This
package only re-exports; its modules never import it (``lint-imports`` checks).
"""

from .adapters import SPEC_FILE, WEIGHTS_FILE, load_adapter_weights, read_spec, save_adapters, saved_spec
from .files import check_save_target, check_tensor, read_json, read_tensors

__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "check_save_target", "check_tensor", "load_adapter_weights", "read_json",
           "read_spec", "read_tensors", "save_adapters", "saved_spec"]
