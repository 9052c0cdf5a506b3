"""Hugging Face ``Trainer`` checkpoints of an adapted model: adapters and ``modules_to_save`` only.

``Trainer._save`` writes ``model.state_dict()`` to ``model.safetensors`` for any model that is not
a ``PreTrainedModel``/``PeftModel``, and ``resume_from_checkpoint`` loads it back with
``load_state_dict(sd, strict=False)``. :meth:`AdaptedModel.trainable_state_dict` installs two
torch state-dict hooks (no change to transformers) so that this model's ``state_dict()`` holds only
its trainable part and loading it does not list the frozen base weights as missing.
"""

from __future__ import annotations

from ..vocab import adapter_prefix
from .trainable import trainable_module_prefixes


def _keep(module, key: str) -> bool:
    return key.startswith(adapter_prefix()) or key.startswith(trainable_module_prefixes(module) or ("\0",))


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix) and not _keep(module, k[len(prefix):])]:
        del state_dict[k]


def _load_hook(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if _keep(module, k)]


def set_trainable_state_dict(adapted, enabled: bool) -> None:
    handles = adapted.__dict__.pop("_trainable_sd_hooks", None)
    if handles:
        for h in handles:
            h.remove()
    if enabled:
        adapted.__dict__["_trainable_sd_hooks"] = (adapted.register_state_dict_post_hook(_state_dict_hook),
                                                   adapted.register_load_state_dict_post_hook(_load_hook))


__all__ = ["set_trainable_state_dict"]
