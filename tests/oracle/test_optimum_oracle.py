"""``export_onnx(adapted, directory, layout="optimum")`` loaded by Optimum (optimum-onnx 0.1.0, this oracle venv:
it needs transformers < 4.58): ``ORTModelForSequenceClassification``, ``…TokenClassification``,
``…QuestionAnswering`` and ``ORTModelForCausalLM`` (past key/values) load each directory with ``from_pretrained``
and give the adapted model's outputs, and Optimum's ``pipeline`` gives what transformers' own pipeline gives on the
merged PyTorch model; the tokenizer comes from the export directory.

The exports need transformers 5 (the main venv: a sibling ``.venv`` of this one, or ``GRAPHADAPT_MAIN_PYTHON``); they
run there once, in a subprocess, with the adapted models' reference outputs (skipped without that venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.onnxruntime")

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
MAIN_PYTHON = Path(os.environ.get("GRAPHADAPT_MAIN_PYTHON", Path(sys.prefix).parent / ".venv" / "bin" / "python"))
TEXTS = ["t5 t6 t7 t8", "t9 t10 t11"]
QA = {"question": "t5 t6", "context": "t7 t8 t9 t10 t11"}

SCRIPT = textwrap.dedent('''
    import sys, torch, transformers as T
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import graphadapt as ga
    from helpers import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POS, VOCAB, build_seeded, randomize_lora, tiny_llama
    from test_pipeline import tiny_tokenizer
    torch.set_num_threads(1)
    d, texts = sys.argv[1], sys.argv[3:]
    tok = tiny_tokenizer()
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS, type_vocab_size=2)
    enc = tok(texts, padding=True, return_tensors="pt")
    refs = {}
    for task, cls, extra in [("text-classification", T.BertForSequenceClassification, dict(num_labels=3)),
                             ("token-classification", T.BertForTokenClassification, dict(num_labels=5)),
                             ("question-answering", T.BertForQuestionAnswering, {})]:
        adapted = ga.apply(build_seeded(lambda: cls(T.BertConfig(**cfg, **extra)), seed=0),
                           ga.LoRA(r=4, targets=("all-linear",))).eval()
        randomize_lora(adapted, seed=1, std=0.3)
        # verified by this test against the adapted model's outputs (and Optimum's run), not by the exporter
        ga.export_onnx(adapted, f"{d}/{task}", layout="optimum", tokenizer=tok, verify=False)
        adapted.to_base_model().save_pretrained(f"{d}/{task}-torch")
        with torch.no_grad():
            out = adapted(**enc)
            with adapted.disable_adapters():
                base = adapted(**enc)
        names = ("start_logits", "end_logits") if task == "question-answering" else ("logits",)
        refs[task] = ({n: out[n] for n in names}, {n: base[n] for n in names})
    # no eos: every decode runs its max_new_tokens
    lm = ga.apply(tiny_llama(seed=0, causal_lm=True, eos_token_id=None), ga.LoRA(r=4, targets=("all-linear",)),
                  cache=True).eval()
    randomize_lora(lm, seed=2, std=0.3)
    ga.export_onnx(lm, f"{d}/text-generation", layout="optimum", tokenizer=tiny_tokenizer(token_type_ids=False),
                   verify=False)
    e = tok(texts[0], return_tensors="pt")
    ids = lm.generate(e["input_ids"], e["attention_mask"], max_new_tokens=6)
    with lm.disable_adapters():
        base = lm.generate(e["input_ids"], e["attention_mask"], max_new_tokens=6)
    refs["text-generation"] = ({"ids": ids}, {"ids": base})
    torch.save(refs, f"{d}/refs.pt")
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not MAIN_PYTHON.exists():
        pytest.skip(f"no main venv python at {MAIN_PYTHON}")
    d = tmp_path_factory.mktemp("optimum")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(MAIN_PYTHON), "-c", SCRIPT, str(d), str(ROOT), *TEXTS], capture_output=True, text=True,
                          env=env, cwd=d, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, torch.load(d / "refs.pt")


def _outputs_match(got, refs, names):
    adapted, base = refs
    for n in names:
        torch.testing.assert_close(getattr(got, n), adapted[n], atol=1e-5, rtol=1e-5)
        assert (adapted[n] - base[n]).abs().max() > 1e-3  # the adapters change what Optimum returns


@pytest.mark.parametrize("task,cls_name,names", [
    ("text-classification", "ORTModelForSequenceClassification", ("logits",)),
    ("token-classification", "ORTModelForTokenClassification", ("logits",)),
    ("question-answering", "ORTModelForQuestionAnswering", ("start_logits", "end_logits")),
])
def test_optimum_loads_an_encoder_export_and_its_pipeline_gives_the_adapted_predictions(exported, task, cls_name,
                                                                                        names):
    import optimum.onnxruntime as ort_models
    from optimum.pipelines import pipeline
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers import pipeline as hf_pipeline

    d, refs = exported
    tok = AutoTokenizer.from_pretrained(d / task)  # written by the export (transformers 5), read by transformers 4
    model = getattr(ort_models, cls_name).from_pretrained(d / task)
    enc = tok(TEXTS, padding=True, return_tensors="pt")  # tokenizer output feeds the session unchanged
    assert "token_type_ids" in enc and "token_type_ids" in model.input_names
    _outputs_match(model(**enc), refs[task], names)

    auto = {"text-classification": AutoModelForSequenceClassification,
            "token-classification": AutoModelForTokenClassification,
            "question-answering": AutoModelForQuestionAnswering}[task]
    torch_model = auto.from_pretrained(d / f"{task}-torch").eval()  # the merged adapted model, in PyTorch
    kw = {"top_k": None} if task == "text-classification" else {}
    ours = pipeline(task, model=model, tokenizer=tok, accelerator="ort", **kw)
    ref = hf_pipeline(task, model=torch_model, tokenizer=tok, **kw)
    if task == "question-answering":
        got, want = ours(**QA), ref(**QA)
        assert (got["start"], got["end"], got["answer"]) == (want["start"], want["end"], want["answer"])
        assert got["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-6)
        return
    got, want = ours(TEXTS), ref(TEXTS)
    for g, w in zip(got, want):
        assert [x.get("label", x.get("entity")) for x in g] == [x.get("label", x.get("entity")) for x in w]
        assert [x["score"] for x in g] == pytest.approx([x["score"] for x in w], rel=1e-4, abs=1e-6)


def test_optimum_causal_lm_with_past_generates_the_adapted_models_tokens(exported):
    from optimum.onnxruntime import ORTModelForCausalLM
    from optimum.pipelines import pipeline
    from transformers import AutoTokenizer

    d, refs = exported
    tok = AutoTokenizer.from_pretrained(d / "text-generation")
    model = ORTModelForCausalLM.from_pretrained(d / "text-generation")
    assert model.can_use_cache and not model.is_merged  # past key/values in and out, one graph
    assert model.generation_config.eos_token_id is None and model.generation_config.pad_token_id == 0
    enc = tok(TEXTS[0], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=6, do_sample=False)
    want, base = refs["text-generation"][0]["ids"], refs["text-generation"][1]["ids"]
    assert ids.tolist() == want.tolist() and want.tolist() != base.tolist()
    out = pipeline("text-generation", model=model, tokenizer=tok, accelerator="ort")(
        TEXTS[0], max_new_tokens=6, do_sample=False, return_full_text=False)
    new = want[0, enc["input_ids"].shape[1]:]
    # the pipeline cuts the decoded prompt off the decoded sequence: a space may stay in front
    assert out[0]["generated_text"].strip() == tok.decode(new, skip_special_tokens=True).strip() != ""
