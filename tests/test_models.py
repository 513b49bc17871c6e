"""Model loading, GGUF rebuild, student derivation, vocab checks, LoRA."""

import pytest
import torch

from kd import models
from kd import student as kd_student
from tests.conftest import make_tiny_llama


def test_resolve_sources(tmp_path, tiny_teacher):
    assert models.resolve_source("embedded:smollm2-135m").kind == "gguf"
    assert models.resolve_source(str(tiny_teacher)).kind == "folder"
    assert models.resolve_source("HuggingFaceTB/SmolLM2-135M") == models.ModelLocation(
        "hub", "HuggingFaceTB/SmolLM2-135M"
    )
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve_source("./nowhere/model")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.resolve_source(str(tmp_path / "empty"))
    with pytest.raises(models.ModelLoadError, match="unknown embedded"):
        models.resolve_source("embedded:gpt-9")


def test_unreachable_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="cannot load model 'nobody/no-model'"):
        models.load_model_and_tokenizer("nobody/no-model")


def test_gguf_teacher_is_a_plain_trainable_fp32_model(smollm2_folder):
    model, tok = models.load_model_and_tokenizer("embedded:smollm2-135m")
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    # it is a real pretrained model: a common continuation is likely
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"


def test_uniform_and_influence_selection():
    assert kd_student.uniform_layers(30, 15)[0] == 0 and kd_student.uniform_layers(30, 15)[-1] == 29
    assert len(kd_student.uniform_layers(30, 15)) == 15
    assert kd_student.uniform_layers(4, 2) == [0, 3]
    assert kd_student.select_layers("block_influence", 4, 2, [0.1, 0.5, 0.05, 0.3]) == [1, 3]
    assert kd_student.select_layers("first", 4, 2) == [0, 1]


def test_derive_student_keeps_the_chosen_layers(tiny_teacher):
    teacher, tok = models.load_model_and_tokenizer(str(tiny_teacher))
    student = kd_student.derive_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t_layers, s_layers = models.decoder_layers(teacher), models.decoder_layers(student)
    assert torch.equal(s_layers[1].mlp.up_proj.weight, t_layers[3].mlp.up_proj.weight)
    assert s_layers[1].self_attn.layer_idx == 1
    assert s_layers[1].mlp.up_proj.weight.data_ptr() != t_layers[3].mlp.up_proj.weight.data_ptr()
    ids = tok(["hello world"], return_tensors="pt")
    out = student(**ids)
    assert out.logits.shape[-1] == teacher.config.vocab_size
    # generation with a KV cache works on the renumbered layers
    student.generate(**ids, max_new_tokens=3, do_sample=False)
    # keeping every layer reproduces the teacher exactly
    same = kd_student.derive_student(teacher, [0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(same(**ids).logits, teacher(**ids).logits)


def test_block_influence_scores(tiny_teacher, tokenizer):
    teacher, tok = models.load_model_and_tokenizer(str(tiny_teacher))
    batch = tok(["a short text to score", "another one"], return_tensors="pt", padding=True)
    scores = kd_student.block_influence(teacher, [dict(batch)])
    assert len(scores) == 4 and all(0 <= s <= 2 for s in scores)


def test_vocab_compatibility(tmp_path, tokenizer, tiny_teacher):
    t, t_tok = models.load_model_and_tokenizer(str(tiny_teacher))
    # same tokenizer, embedding padded to a multiple of 64: fine
    padded = make_tiny_llama(
        tmp_path / "padded", tokenizer, layers=1, hidden=32, vocab=len(tokenizer) + 64
    )
    s, s_tok = models.load_model_and_tokenizer(str(padded))
    models.check_vocab_compatible(t_tok, s_tok, t.config.vocab_size, s.config.vocab_size)
    # a really different tokenizer: fail naming both sizes
    from tokenizers import Tokenizer
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tmodels.WordLevel({"a": 0, "b": 1, "<unk>": 2}, "<unk>"))
    )
    with pytest.raises(models.ModelLoadError, match=r"3 tokens.*49152 tokens|49152.*3 tokens"):
        models.check_vocab_compatible(t_tok, other, t.config.vocab_size, 3)


def test_lora_trains_adapters_and_merges(tiny_teacher, tokenizer):
    base, tok = models.load_model_and_tokenizer(str(tiny_teacher))
    lora = models.apply_lora(base, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = tok(["some text"], return_tensors="pt")
    with torch.no_grad():  # make the adapters do something
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        want = lora(**ids).logits
    plain = models.merged(lora)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, want, atol=1e-5)


def test_distill_forward_returns_only_what_is_asked(tiny_teacher, tokenizer):
    lm, tok = models.load_model_and_tokenizer(str(tiny_teacher), attn_implementation="eager")
    fwd = models.DistillForward(lm)
    ids = tok(["one two three four"], return_tensors="pt")
    logits, hidden, attn = fwd(ids["input_ids"], ids["attention_mask"])
    assert attn is None and hidden.shape[-1] == 64
    with torch.no_grad():
        ref = lm(**ids, output_hidden_states=True)
    assert torch.allclose(logits, ref.logits, atol=1e-5)
    assert torch.allclose(hidden, ref.hidden_states[-1], atol=1e-5)
    _, _, attn = fwd(ids["input_ids"], ids["attention_mask"], want_attn=True)
    L = ids["input_ids"].shape[1]
    assert attn.shape == (1, 4, L, L)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 4, L), atol=1e-5)
