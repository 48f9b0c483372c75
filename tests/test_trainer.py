"""DistillationTrainer on tiny random models of every task: it trains the student, never the teacher,
logs every component, normalises by the global token count, and saves students that pipeline() loads."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM,
                          BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, DistilBertConfig,
                          DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, ResNetConfig,
                          ResNetForImageClassification, RobertaConfig, RobertaForMaskedLM, ViTConfig,
                          ViTForImageClassification, ViTImageProcessor, pipeline)

from hf_kd import DistillationConfig, DistillationTrainer, make_student

from .conftest import sentences

V = 40  # >= the tiny tokenizer's 37 tokens


def decoder(cls, cfg_cls, layers=4, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, pad_token_id=0, **kw)
    return cls(cfg)


def encoder(cls, cfg_cls, layers=4):
    torch.manual_seed(0)
    if cfg_cls is DistilBertConfig:
        cfg = DistilBertConfig(dim=32, hidden_dim=64, n_layers=layers, n_heads=4, vocab_size=V, pad_token_id=0)
    else:
        cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      vocab_size=V, max_position_embeddings=72, pad_token_id=0)
    return cls(cfg)


CAUSAL = {
    "gpt2": lambda: (torch.manual_seed(0), GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=V,
                                                                      n_positions=64, bos_token_id=2, eos_token_id=3)))[1],
    "llama": lambda: decoder(LlamaForCausalLM, LlamaConfig),
    "qwen2": lambda: decoder(Qwen2ForCausalLM, Qwen2Config),
    "mistral": lambda: decoder(MistralForCausalLM, MistralConfig),
}
MASKED = {
    "bert": lambda: encoder(BertForMaskedLM, BertConfig),
    "distilbert": lambda: encoder(DistilBertForMaskedLM, DistilBertConfig),
    "roberta": lambda: encoder(RobertaForMaskedLM, RobertaConfig),
}


def text_dataset(tok, n=16):
    return Dataset.from_dict({"text": sentences(n)}).map(lambda b: tok(b["text"]), batched=True,
                                                         remove_columns=["text"])


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                teacher_dtype="model")  # these tests check the teacher is left bit-identical (auto may cast it)
    return DistillationConfig(**{**base, **kw})


def run(teacher, student, tmp_path, tok, mlm, **kw):
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_mode = teacher.training, [p.requires_grad for p in teacher.parameters()]
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, **kw),
                                  train_dataset=text_dataset(tok), processing_class=tok,
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=mlm, mlm_probability=0.3))
    trainer.train()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items()), "teacher changed"
    assert (teacher.training, [p.requires_grad for p in teacher.parameters()]) == teacher_mode  # given back as passed
    changed = [k for k, v in student_before.items() if not torch.equal(v, student.state_dict()[k])]
    assert changed, "student did not change"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs
    for name in ("task_loss", "kd_loss") + (("hidden_loss",) if kw.get("hidden_weight") else ()):
        assert all(math.isfinite(h[name]) for h in logs), name
    return trainer


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_causal_lm_distils_and_reloads_in_pipeline(arch, tmp_path, tiny_tokenizer):
    teacher = CAUSAL[arch]()
    student = make_student(teacher, num_layers=2, strategy="distilbert")
    trainer = run(teacher, student, tmp_path, tiny_tokenizer, mlm=False, hidden_weight=1.0)
    trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student" / "hf_kd_extras.pt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    assert reloaded.config.hf_kd_teacher_layers == [0, 3]
    gen = pipeline("text-generation", model=str(tmp_path / "student"), device="cpu")
    out = gen("the king", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("the king")


@pytest.mark.parametrize("arch", sorted(MASKED))
@pytest.mark.parametrize("kd_positions", ["all", "labels"])
def test_masked_lm_distils_and_fills_masks(arch, kd_positions, tmp_path, tiny_tokenizer):
    teacher = MASKED[arch]()
    student = make_student(teacher, num_layers=2)
    trainer = run(teacher, student, tmp_path, tiny_tokenizer, mlm=True, hidden_weight=1.0, kd_positions=kd_positions)
    trainer.save_model(str(tmp_path / "student"))
    AutoModelForMaskedLM.from_pretrained(str(tmp_path / "student"))
    fill = pipeline("fill-mask", model=str(tmp_path / "student"), device="cpu")
    assert len(fill("the king [MASK] to the forest")) == 5


def image_dataset(n=16, size=16, channels=3):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"pixel_values": torch.randn(n, channels, size, size, generator=g).tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()}).with_format("torch")


def vit(layers, hidden=32):
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=hidden,
                                               num_hidden_layers=layers, num_attention_heads=4,
                                               intermediate_size=2 * hidden, num_labels=3))


@pytest.mark.parametrize("student_kind", ["vit", "resnet"])
def test_image_classifier_distils_and_reloads_in_pipeline(student_kind, tmp_path):
    teacher = vit(4)
    if student_kind == "vit":
        student, extra = vit(2, hidden=16), {"hidden_weight": 1.0, "layer_map": "0:0,2:1,4:2"}
    else:
        torch.manual_seed(0)
        student = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                            depths=[1, 1], num_labels=3))
        extra = {}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, **extra),
                                  train_dataset=image_dataset())
    trainer.train()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["kd_loss"]) and math.isfinite(h["task_loss"]) for h in logs)
    trainer.save_model(str(tmp_path / "student"))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(tmp_path / "student"))
    AutoModelForImageClassification.from_pretrained(str(tmp_path / "student"))
    from PIL import Image
    clf = pipeline("image-classification", model=str(tmp_path / "student"), device="cpu")
    assert len(clf(Image.new("RGB", (20, 20), "white"), top_k=3)) == 3


def padded_rows(n=8, length=12, vocab=V):
    """Rows of different lengths, right-padded, labels -100 on padding: token counts differ per row."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        keep = 3 + i
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels, mask = ids.clone(), torch.ones(length, dtype=torch.long)
        labels[keep:], mask[keep:], ids[keep:] = -100, 0, 0
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": mask.tolist()})
    return Dataset.from_list(rows)


def trajectory(tmp_path, batch, accumulation, **kw):
    teacher = CAUSAL["llama"]()
    student = make_student(teacher, num_layers=2)
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                  hidden_weight=1.0, **kw)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=padded_rows())
    trainer.train()
    return [(h["loss"], h["kd_loss"], h["task_loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def test_gradient_accumulation_invariance(tmp_path):
    """Batch 8 x 1, 4 x 2 and 2 x 4 give the same losses and gradient norms (global token normalisation)."""
    ref = trajectory(tmp_path, 8, 1)
    for batch, acc in [(4, 2), (2, 4)]:
        got = trajectory(tmp_path, batch, acc)
        for a, b in zip(ref, got):
            assert a == pytest.approx(b, rel=1e-5), (batch, acc)


def test_eval_logs_components(tmp_path, tiny_tokenizer):
    teacher = CAUSAL["gpt2"]()
    student = make_student(teacher, num_layers=2)
    ds = text_dataset(tiny_tokenizer)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path),
                                  train_dataset=ds, eval_dataset=ds, processing_class=tiny_tokenizer,
                                  data_collator=DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kd_loss", "eval_task_loss"} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd_loss"] + metrics["eval_task_loss"], rel=1e-4)


def test_projection_is_trained_and_checkpointed_not_in_student(tmp_path, tiny_tokenizer):
    teacher = CAUSAL["llama"]()
    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=V))
    args = config(tmp_path, hidden_weight=1.0, save_strategy="steps", save_steps=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=padded_rows())
    assert len(trainer.projections) == 3 and isinstance(trainer.projections[0], torch.nn.Linear)
    before = trainer.projections[1].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.projections[1].weight)
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "hf_kd_extras.pt").exists()
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # the signals' parts never enter the student file
        assert f.keys() and not any("hf_kd_signals" in k for k in f.keys())
    saved = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert not any("projection" in k for k in saved.state_dict())
