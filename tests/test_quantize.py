"""hf_kd.teachers.quantize: an int8 dynamically quantised copy of a teacher stays close to the float teacher, leaves the
user's model unchanged, and works as a DistillationTrainer teacher."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification)

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.teachers.quantize import quantised_linear_names, quantize_teacher, weight_bytes

# Bound on the mean token KL(float || int8) at T=1. The models below use initializer_range=0.1 so their logits are
# spread (std ~0.8, entropy ~3.4 nats of at most 3.7) rather than near-uniform (0.02: std 0.15, KL ~1e-5 says little).
# int8 steps are 1/254 of a weight row's range and 1/127 of an activation tensor's range (7 bits: reduce_range);
# through two layers they leave a logit error delta of a few percent of the logits' spread, and KL ~ Var_p(delta)/2
# ~ (0.05 * 0.8)^2 / 2 ~ 1e-3. Measured here: Llama 1.3e-3 (3 seeds: 1.28-1.31e-3), ViT 5.5e-4, BERT 3e-5 (its tanh
# pooler keeps the logits narrow, std 0.3). 5e-3 leaves ~4x for other CPUs' int8 kernels (fbgemm / oneDNN / qnnpack
# round differently); a broken scale gives a KL of order 1.
KL_BOUND = 5e-3


def llama(tied=False, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=64, initializer_range=0.1,
                      tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=40, num_labels=10,
                                                    initializer_range=0.1))


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                               num_labels=10, initializer_range=0.1))


def inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(16, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(1, 40, (8, 16), generator=g)}


def mean_kl(p_logits, q_logits):
    """Mean over positions of KL(softmax(p) || softmax(q)) at T=1."""
    p, q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def snapshot(model):
    """Weights and the type of every module."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, before, dtype=torch.float32):
    weights, types = before
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in weights.items())
    assert all(p.dtype == dtype for p in model.parameters())
    assert {n: type(m) for n, m in model.named_modules()} == types  # no module swapped for a quantised one


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_int8_logits_close_and_original_unchanged(kind):
    model = {"llama": llama, "bert": bert, "vit": vit}[kind]().eval()
    before = snapshot(model)
    quantised = quantize_teacher(model)
    assert quantised is not model
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert quantised_linear_names(quantised) == linears  # every Linear, heads included
    with torch.inference_mode():
        kl = mean_kl(model(**inputs(kind)).logits, quantised(**inputs(kind)).logits)
    assert 0 < kl < KL_BOUND, kl
    assert_unchanged(model, before)
    sizes = weight_bytes(quantised)
    assert sizes["int8"] == sum(model.get_submodule(n).weight.numel() for n in linears)


def test_tied_lm_head_is_quantised_and_original_stays_tied():
    model = llama(tied=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    quantised = quantize_teacher(model)
    assert "lm_head" in quantised_linear_names(quantised)
    assert quantised.model.embed_tokens.weight.dtype == torch.float32  # the embedding table stays float
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        assert mean_kl(model(**inputs("llama")).logits, quantised(**inputs("llama")).logits) < KL_BOUND
    assert_unchanged(model, before)


def test_keep_float_bf16_model_and_bad_names():
    model = llama(dtype=torch.bfloat16)
    before = snapshot(model)
    quantised = quantize_teacher(model, keep_float=["lm_head"])
    assert "lm_head" not in quantised_linear_names(quantised) and type(quantised.lm_head) is nn.Linear
    assert quantised.lm_head.weight.dtype == torch.float32  # the copy computes in float32
    assert model.training  # the user's mode is kept too
    assert_unchanged(model, before, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.isfinite(quantised(**inputs("llama")).logits).all()
    with pytest.raises(ValueError, match="not modules of the model"):
        quantize_teacher(model, keep_float=["head"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_teacher(nn.Sequential(nn.Embedding(4, 4)))


@pytest.mark.parametrize("teacher_dtype", ["model", "auto"])  # 'auto' never casts a model object
def test_trainer_distils_from_int8_teacher(tmp_path, teacher_dtype):
    teacher = llama()
    student = make_student(teacher, num_layers=1)
    quantised = quantize_teacher(teacher)
    int8_before = [quantised.get_submodule(n).weight().int_repr().clone() for n in quantised_linear_names(quantised)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (8, 12), generator=g).tolist()
    rows = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                              use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                              teacher_dtype=teacher_dtype, hidden_weight=1.0)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=quantised, args=args, train_dataset=rows)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(math.isfinite(h[k]) for h in logs for k in ("loss", "kd_loss", "task_loss", "hidden_loss"))
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    after = [quantised.get_submodule(n).weight().int_repr() for n in quantised_linear_names(quantised)]
    assert len(after) == len(int8_before) and all(torch.equal(a, b) for a, b in zip(after, int8_before))
