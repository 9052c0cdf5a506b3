"""An adapted model in ``transformers.pipeline(...)`` (classification and generation), and its class name.

The pipelines run the adapted model itself (no export): their scores and generated text are the adapted
model's, which differ from the base model's (non-zero adapters).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.errors import GraphAdaptError
from helpers import VOCAB, randomize_lora, tiny_bert, tiny_llama

torch.set_num_threads(1)
TEXTS = ["t5 t6 t7 t8", "t9 t10 t11"]


def tiny_tokenizer(token_type_ids: bool = True) -> T.PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer built locally (no download) whose vocabulary ``t5 … t99`` covers every id
    of the tiny models: ``"t7 t8"`` → ``[CLS] 7 8 [SEP]``, and every generated id decodes to a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(5, VOCAB)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]",
                                     model_input_names=["input_ids", "token_type_ids", "attention_mask"] if
                                     token_type_ids else ["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def classifier():
    adapted = ga.apply(tiny_bert(seed=0, num_labels=3), ga.LoRA(r=4)).eval()
    randomize_lora(adapted, seed=1, std=0.3)
    return adapted


@pytest.fixture(scope="module")
def lm():
    adapted = ga.apply(tiny_llama(seed=0, causal_lm=True), ga.LoRA(r=4, targets=("all-linear",)), cache=True).eval()
    randomize_lora(adapted, seed=2, std=0.3)
    return adapted


def test_text_classification_pipeline_gives_the_adapted_models_scores(classifier, tokenizer):
    pipe = T.pipeline("text-classification", model=classifier, tokenizer=tokenizer, top_k=None)
    got = pipe(TEXTS)
    for text, scores in zip(TEXTS, got):
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            want = classifier(**enc).logits.softmax(-1)[0]
            with classifier.disable_adapters():
                base = classifier(**enc).logits.softmax(-1)[0]
        by_label = {d["label"]: d["score"] for d in scores}
        pipe_scores = torch.tensor([by_label[classifier.config.id2label[i]] for i in range(3)])
        torch.testing.assert_close(pipe_scores, want, atol=1e-6, rtol=1e-5)
        assert (want - base).abs().max() > 1e-3  # the adapters change the scores the pipeline reports


def test_text_generation_pipeline_decodes_what_the_adapted_model_generates(lm, tokenizer):
    pipe = T.pipeline("text-generation", model=lm, tokenizer=tokenizer)
    assert lm.can_generate() and pipe.device == lm.device
    # eos_token_id=[]: six tokens whatever they are (the tiny model's eos id 2 is the tokenizer's [CLS])
    out = pipe(TEXTS[0], max_new_tokens=6, do_sample=False, eos_token_id=[], return_full_text=False)
    out = out[0]["generated_text"]
    enc = tokenizer(TEXTS[0], return_tensors="pt")
    ids = lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6, eos_token_id=[])
    merged = lm.to_base_model()  # transformers' own generate on the merged weights: the same tokens
    hf = merged.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert ids[0].tolist() == hf[0].tolist()
    new = ids[0, enc["input_ids"].shape[1]:]
    assert out == tokenizer.decode(new, skip_special_tokens=True) and out.strip()
    with lm.disable_adapters():
        base = lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6, eos_token_id=[])
    assert base[0].tolist() != ids[0].tolist()  # the pipeline's text is the adapters' doing


def test_generate_takes_a_generation_config_and_refuses_options_it_does_not_implement(lm):
    ids = torch.tensor([[5, 6, 7]])
    cfg = T.GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=[])
    assert lm.generate(ids, generation_config=cfg).shape == (1, 6)
    assert lm.generate(ids, max_length=5, eos_token_id=[]).shape == (1, 5)  # max_length counts the prompt
    with pytest.raises(GraphAdaptError, match="repetition_penalty=1.3"):
        lm.generate(ids, generation_config=T.GenerationConfig(max_new_tokens=3, repetition_penalty=1.3))
    assert lm.generation_config.eos_token_id == 2  # the source model's generation config


def test_adapted_model_class_is_named_and_survives_copies(classifier):
    x = tokenizer_free_inputs()
    assert type(classifier).__name__ == "AdaptedModel" and type(classifier).__module__ == "graphadapt.model"
    assert repr(type(classifier)) == "<class 'graphadapt.model.AdaptedModel'>"
    twin = copy.deepcopy(classifier)
    assert type(twin).__name__ == "AdaptedModel" and isinstance(twin, ga.AdaptedModel)
    assert len(type(copy.deepcopy(twin)).__mro__) == len(type(classifier).__mro__)  # no subclass per copy
    for back in (pickle.loads(pickle.dumps(classifier)), _torch_roundtrip(classifier)):
        assert type(back).__name__ == "AdaptedModel" and isinstance(back, ga.AdaptedModel)
        torch.testing.assert_close(back(**x).logits, classifier(**x).logits)
    assert type(ga.compile(twin)).__name__ == "AdaptedModel"


def tokenizer_free_inputs():
    return {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def _torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
