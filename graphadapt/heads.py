"""Prediction heads on top of a base model, laid out as AdapterHub's flexible heads.

before: a base transformer (``BertModel``, ``GPT2Model``, ``LlamaModel``…) returning hidden states
after:  :class:`ModelWithHead` — the base under its ``base_model_prefix`` (``bert``, ``transformer``,
        ``model``) and one head under ``heads.<name>``, so parameter names are AdapterHub's
        ``<Arch>AdapterModel`` names; the forward returns the head's transformers output
        (``logits``, or ``start_logits``/``end_logits`` for question answering).

A head is a config dict in AdapterHub's ``head_config.json`` form (``head_type``, ``layers``,
``activation_function``, ``num_labels``/``num_choices``, ``use_pooler``, ``bias``, ``layer_norm``,
``vocab_size``, ``embedding_size``, ``dropout_prob``), built as AdapterHub builds it (the same
``nn.Sequential`` indices, so its saved ``heads.<name>.<i>.*`` tensors load as they are):

- ``classification``/``multilabel_classification``/``multiple_choice``: ``layers`` × (dropout, linear
  [, activation]) on the CLS representation — the first token, the pooler output with ``use_pooler``,
  or for decoders (GPT-2, GPT-J, Llama, Mistral in AdapterHub) the last non-padding token
  (``pad_token_id`` set) or the last token; multiple choice reads ``[B, C, T]`` inputs and returns ``[B, C]``;
- ``tagging``/``question_answering``: the same stack on every token (QA splits the 2 outputs into
  start/end logits);
- ``masked_lm``/``causal_lm``: ``layers - 1`` × (linear, activation [, layer norm]) then the vocabulary
  projection, tied to the input embeddings when the model ties them.

:func:`add_head` is AdapterHub's ``add_classification_head``-style API (seeded initialisation);
:func:`graphadapt.import_adapterhub` attaches the head a ``save_adapter(..., with_head=True)``
directory holds. Dropout runs only in training, as in AdapterHub.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .errors import SpecError
from .methods.activations import get_activation
from .spec.composition import BatchSplit

#: head types AdapterHub 1.3 saves for text models, and the AdapterHub head classes they mirror
HEAD_TYPES = ("classification", "multilabel_classification", "multiple_choice", "tagging", "question_answering",
              "masked_lm", "causal_lm")
#: head types that read one CLS representation per sequence (the others read every token)
CLS_HEADS = ("classification", "multilabel_classification", "multiple_choice")
#: AdapterHub's decoder adapter models take the CLS representation from the last (non-padding) token
LAST_TOKEN_MODELS = ("gpt2", "gptj", "llama", "mistral")
_DEFAULTS = {  # AdapterHub's add_*_head defaults
    "classification": {"layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True},
    "multilabel_classification": {"layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True},
    "multiple_choice": {"layers": 2, "activation_function": "tanh", "use_pooler": False, "num_choices": 2},
    "tagging": {"layers": 1, "activation_function": "tanh"},
    "question_answering": {"layers": 1, "activation_function": "tanh", "num_labels": 2},
    "masked_lm": {"layers": 2, "activation_function": "gelu", "layer_norm": True, "bias": True},
    "causal_lm": {"layers": 2, "activation_function": "gelu", "layer_norm": False, "bias": False},
}


class _Act(nn.Module):
    """A parameter-free activation by AdapterHub name (``None``: identity)."""

    def __init__(self, name: str | None):
        super().__init__()
        self.name = name
        self.f = get_activation(name) if name else (lambda x: x)

    def forward(self, x):
        return self.f(x)


def _hidden(config) -> int:
    for k in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, k, None), int):
            return getattr(config, k)
    raise SpecError(f"{type(config).__name__} names no hidden size (hidden_size / n_embd / d_model); a prediction "
                    "head needs it", field="head")


def _dropout(head: Mapping, config) -> float:
    for v in (head.get("dropout_prob"), getattr(config, "classifier_dropout", None),
              getattr(config, "hidden_dropout_prob", None)):
        if v is not None:
            return float(v)
    return 0.0


def head_config(head_type: str, **options) -> dict:
    """A complete head config (AdapterHub's ``head_config.json`` ``config``) from a type and options."""
    if head_type not in HEAD_TYPES:
        raise SpecError(f"head type {head_type!r} is not one graphadapt builds; choose one of {', '.join(HEAD_TYPES)}",
                        field="head_type")
    cfg = {"head_type": head_type, **_DEFAULTS[head_type], **options}
    if head_type in ("classification", "multilabel_classification", "tagging") and "num_labels" not in cfg:
        cfg["num_labels"] = 2
    if not isinstance(cfg.get("layers"), int) or cfg["layers"] < 1:
        raise SpecError(f"head 'layers' must be an integer >= 1, got {cfg.get('layers')!r}", field="layers")
    return cfg


class PredictionHead(nn.Sequential):
    """One AdapterHub prediction head (module indices as AdapterHub's, so saved tensors load by name)."""

    def __init__(self, config: Mapping, model_config):
        super().__init__()
        cfg = dict(config)
        self.config = cfg
        kind = cfg.get("head_type")
        if kind not in HEAD_TYPES:
            raise SpecError(f"prediction head type {kind!r} is not supported; graphadapt builds "
                            f"{', '.join(HEAD_TYPES)}", field="head_type")
        hidden = _hidden(model_config)
        act = cfg.get("activation_function")
        mods: list[nn.Module] = []
        if kind in ("masked_lm", "causal_lm"):
            emb = cfg.get("embedding_size") or getattr(model_config, "embedding_size", None) or hidden
            eps = getattr(model_config, "layer_norm_eps", 1e-12)
            for i in range(cfg["layers"] - 1):
                mods.append(nn.Linear(hidden if i == 0 else emb, emb))
                if act:
                    mods.append(_Act(act))
                if cfg.get("layer_norm"):
                    mods.append(nn.LayerNorm(emb, eps=eps))
            vocab = cfg.get("vocab_size") or model_config.vocab_size
            mods.append(nn.Linear(emb, vocab, bias=bool(cfg.get("bias", False))))
        else:
            p, bias = _dropout(cfg, model_config), bool(cfg.get("bias", True))
            for i in range(cfg["layers"]):
                mods.append(nn.Dropout(p))
                if i < cfg["layers"] - 1:
                    mods.append(nn.Linear(hidden, hidden))
                    if act:
                        mods.append(_Act(act))
                elif "num_labels" in cfg:
                    mods.append(nn.Linear(hidden, cfg["num_labels"], bias=bias))
                elif "num_choices" in cfg:
                    mods.append(nn.Linear(hidden, 1, bias=bias))
                else:
                    mods.append(nn.Linear(hidden, hidden, bias=bias))
                    if act:
                        mods.append(_Act(act))
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    @property
    def head_type(self) -> str:
        return self.config["head_type"]

    @property
    def is_lm(self) -> bool:
        return self.head_type in ("masked_lm", "causal_lm")


def _prefix(model: nn.Module) -> str:
    p = getattr(model, "base_model_prefix", None)
    return p if isinstance(p, str) and p.isidentifier() else "model"


def _bare(model: nn.Module) -> nn.Module:
    """The base transformer of a transformers model with its own head (``BertForSequenceClassification`` →
    ``bert``); the head graphadapt attaches replaces that head."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


class ModelWithHead(nn.Module):
    """``base`` (kept under its ``base_model_prefix``) plus the prediction head ``heads[name]`` — and more heads
    with :meth:`add_head` / :meth:`average_head`, as AdapterHub's flexible-head models hold several.

    ``active_head`` (AdapterHub's): one head name (its output), a list of names (every head on the whole batch:
    :class:`MultiHeadOutput`), or ``BatchSplit(h1, h2, batch_sizes=[m, n])`` (rows ``[0, m)`` through ``h1``,
    ``[m, m+n)`` through ``h2``: :class:`MultiHeadOutput`). The captured graph follows the active head at
    ``graphadapt.apply`` time: choose it before applying.
    """

    def __init__(self, model: nn.Module, name: str, config: Mapping, seed: int | None = 0):
        super().__init__()
        if not isinstance(name, str) or not name or "." in name:
            raise SpecError(f"head name must be a non-empty string without '.', got {name!r}", field="head")
        base = _bare(model)
        self.base_model_prefix = _prefix(base)
        self.add_module(self.base_model_prefix, base)
        self.config = base.config
        self.main_input_name = getattr(base, "main_input_name", "input_ids")
        self.heads = nn.ModuleDict()
        self._base_params = set(inspect.signature(base.forward).parameters)
        self.active_head: Any = name
        self.add_head(name, config, seed=seed)

    def add_head(self, name: str, config: Mapping, seed: int | None = 0, set_active: bool = False) -> PredictionHead:
        """Another head (``config``: a head config, e.g. :func:`head_config`) under ``heads[name]``."""
        if not isinstance(name, str) or not name or "." in name:
            raise SpecError(f"head name must be a non-empty string without '.', got {name!r}", field="head")
        if name in self.heads:
            raise SpecError(f"the model already has a head {name!r}; choose another name", field="head")
        base = self.base
        head = PredictionHead(config, base.config)
        if seed is not None:
            _init_head(head, base.config, seed)
        self.heads[name] = head
        if head.is_lm and getattr(base.config, "tie_word_embeddings", False):
            emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
            last = head[len(head) - 1]
            if emb is not None and tuple(emb.weight.shape) == tuple(last.weight.shape):
                last.weight = emb.weight  # AdapterHub ties the vocabulary projection to the input embeddings
        if set_active:
            self.active_head = name
        return head

    @torch.no_grad()
    def average_head(self, name: str, heads, weights=None, normalize_weights: bool = True,
                     set_active: bool = False) -> PredictionHead:
        """AdapterHub's ``average_head``: a new head ``name`` whose every tensor is ``Σ wᵢ·headᵢ`` over ``heads`` (a
        list of names, or a dict name → weight); weights default to ``1/N`` and are divided by their sum with
        ``normalize_weights``. The heads must share one config (``dropout_prob`` aside)."""
        if isinstance(heads, Mapping):
            heads, weights = list(heads), list(heads.values())
        heads = list(heads)
        missing = [h for h in heads if h not in self.heads]
        if not heads or missing:
            raise SpecError(f"average_head needs existing heads; unknown: {missing or heads} (have {list(self.heads)})",
                            field="head")
        strip = lambda c: {k: v for k, v in c.items() if k != "dropout_prob"}  # noqa: E731
        if any(strip(self.heads[h].config) != strip(self.heads[heads[0]].config) for h in heads):
            raise SpecError(f"cannot average heads with different configurations: {heads}", field="head")
        if weights is None:
            weights = [1.0 / len(heads)] * len(heads)
        else:
            weights = [float(w) for w in weights]
            if len(weights) != len(heads):
                raise SpecError(f"average_head got {len(weights)} weights for {len(heads)} heads", field="weights")
            total = sum(weights) if normalize_weights else 1.0
            weights = [w / total for w in weights]
        new = self.add_head(name, self.heads[heads[0]].config, seed=None, set_active=set_active)
        avg: dict[str, torch.Tensor] = {}
        for h, w in zip(heads, weights):
            for k, v in self.heads[h].state_dict().items():
                avg[k] = avg[k] + w * v if k in avg else w * v
        new.load_state_dict(avg)
        return new

    @property
    def base(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    @property
    def head_name(self) -> str:
        names = self._active_names()
        if len(names) != 1:
            raise SpecError(f"several heads are active ({names}); head_name names one", field="head")
        return names[0]

    @property
    def head(self) -> PredictionHead:
        return self.heads[self.head_name]

    def _active_names(self) -> list[str]:
        act = self.active_head
        names = [act] if isinstance(act, str) else list(act.children if isinstance(act, BatchSplit) else act)
        unknown = [n for n in names if not isinstance(n, str) or n not in self.heads]
        if not names or unknown:
            raise SpecError(f"active_head {act!r} names no head of this model ({list(self.heads)}); set a head name, "
                            "a list of names or a BatchSplit of names", field="head")
        return names

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, use_cache=None):
        names = self._active_names()
        head = self.heads[names[0]]
        choices = None
        if head.head_type == "multiple_choice" and input_ids is not None and input_ids.dim() == 3:
            if len(names) > 1:
                raise SpecError("a multiple-choice head reads [B, C, T] inputs; activate it alone", field="head")
            choices = input_ids.shape[1]
        flat = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "position_ids": position_ids}
        if choices is not None:  # AdapterHub's adapter models view [B, C, T] inputs as [B·C, T]
            flat = {k: (v.reshape(-1, v.shape[-1]) if v is not None else None) for k, v in flat.items()}
        kw = {k: v for k, v in {**flat, "inputs_embeds": inputs_embeds, "use_cache": use_cache}.items()
              if v is not None and k in self._base_params}
        out = self.base(**kw, return_dict=True)
        hidden = out[0]
        if len(names) == 1 and not isinstance(self.active_head, BatchSplit):
            return _head_output(head, hidden, out, flat["input_ids"], self.config)
        ids = flat["input_ids"]
        if not isinstance(self.active_head, BatchSplit):  # every head on the whole batch (AdapterHub's list)
            return MultiHeadOutput(head_outputs=[_head_output(self.heads[n], hidden, out, ids, self.config)
                                                 for n in names])
        sizes = list(self.active_head.batch_sizes)
        if sum(sizes) != hidden.shape[0]:  # AdapterHub's ValueError, as an InputError-like message
            raise ValueError(f"the active head BatchSplit has batch sizes {sizes} (sum {sum(sizes)}) but the batch "
                             f"has {hidden.shape[0]} rows")
        outs, a = [], 0
        for n, m in zip(names, sizes):
            part = {k: v[a:a + m] for k, v in out.items() if isinstance(v, torch.Tensor)}
            outs.append(_head_output(self.heads[n], hidden[a:a + m], part, None if ids is None else ids[a:a + m],
                                     self.config))
            a += m
        return MultiHeadOutput(head_outputs=outs)


@dataclass
class MultiHeadOutput(ModelOutput):
    """AdapterHub's ``MultiHeadOutput``: one output per active head (``out[i]`` or ``out.head_outputs[i]``);
    ``logits`` stacks the heads' logits along the batch axis."""

    head_outputs: list | None = None
    loss: torch.Tensor | None = None

    @property
    def logits(self):
        return torch.vstack([o["logits"] for o in self.head_outputs])

    def __getitem__(self, k):
        return self.head_outputs[k] if isinstance(k, int) else super().__getitem__(k)


def _cls(head: PredictionHead, hidden, out, input_ids, config):
    if getattr(config, "model_type", None) in LAST_TOKEN_MODELS:
        pad = getattr(config, "pad_token_id", None)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if pad is None or input_ids is None:
            return hidden[:, -1]
        last = torch.ne(input_ids, pad).sum(-1) - 1
        # AdapterHub indexes with -1 when a row is all padding; so does the modulo here
        return hidden[rows, last % hidden.shape[1]]
    if head.config.get("use_pooler"):
        pooled = out.get("pooler_output") if hasattr(out, "get") else None
        if pooled is None:
            raise SpecError("the head has use_pooler=True but the base model returns no pooler_output; build the "
                            "base with its pooling layer or set use_pooler=False", field="use_pooler")
        return pooled
    return hidden[:, 0]


def _head_output(head: PredictionHead, hidden, out, input_ids, config):
    from transformers import modeling_outputs as mo

    kind = head.head_type
    if kind in CLS_HEADS:
        logits = head(_cls(head, hidden, out, input_ids, config))
        if kind == "multiple_choice":
            return mo.MultipleChoiceModelOutput(logits=logits.view(-1, head.config["num_choices"]))
        return mo.SequenceClassifierOutput(logits=logits)
    if kind == "tagging":
        return mo.TokenClassifierOutput(logits=head(hidden))
    if kind == "question_answering":
        start, end = head(hidden).split(1, dim=-1)
        return mo.QuestionAnsweringModelOutput(start_logits=start.squeeze(-1), end_logits=end.squeeze(-1))
    logits = head(hidden)
    return (mo.MaskedLMOutput if kind == "masked_lm" else mo.CausalLMOutput)(logits=logits)


@torch.no_grad()
def _init_head(head: nn.Module, config, seed: int) -> None:
    """transformers' ``_init_weights`` (normal(0, initializer_range) weights, zero biases, unit layer norms),
    from a private generator seeded by ``seed``: the caller's RNG is untouched."""
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    g = torch.Generator().manual_seed(int(seed))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def add_head(model: nn.Module, head_type: str, name: str = "head", seed: int | None = 0, **options: Any) -> ModelWithHead:
    """``model`` with an AdapterHub-style prediction head (``add_classification_head(name, num_labels=3)`` is
    ``add_head(model, "classification", name, num_labels=3)``); apply adapters to the result and train the
    head with ``Spec(..., modules_to_save=["heads"])``. Options and defaults are AdapterHub's (``layers``,
    ``activation_function``, ``num_labels``/``num_choices``, ``use_pooler``, ``bias``, ``layer_norm``,
    ``dropout_prob``). A transformers model with its own head is replaced by its base model first."""
    return ModelWithHead(model, name, head_config(head_type, **options), seed=seed)


__all__ = ["CLS_HEADS", "HEAD_TYPES", "ModelWithHead", "MultiHeadOutput", "PredictionHead", "add_head", "head_config"]
