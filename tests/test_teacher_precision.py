"""The teacher's precision is the same story on every machine (CPUs with and without native bfloat16, GPUs):
each task trains with a bfloat16 teacher and with ``teacher_dtype='auto'`` under the hardware check forced both
ways (HF_KD_NATIVE_BF16); every floating input a teacher receives is in the teacher's dtype (a forward pre-hook
fails the test otherwise); the teacher object the user passes keeps its dtype, bits, mode and flags unless
``teacher_dtype`` names a dtype (the documented opt-in, with a warning). CPUs compute bfloat16 without native
support too, only slower, so nothing here depends on the machine."""

import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorForLanguageModeling,
                          ResNetConfig, ResNetForImageClassification)

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.teachers.pairs import NATIVE_BF16_ENV
from hf_kd.tools.report import evaluate

from .test_trainer import CAUSAL, MASKED, image_dataset, padded_rows, text_dataset, vit

BF16 = torch.bfloat16


def floating_inputs(args, kwargs) -> list:
    values = list(args) + list(kwargs.values())
    return [v for v in values if torch.is_tensor(v) and v.is_floating_point()]


def guard(model, seen: list):
    """Fail on any floating input whose dtype is not the model's weights' dtype; record what was checked."""
    def hook(module, args, kwargs):
        weights = next(p.dtype for p in module.parameters() if p.is_floating_point())
        for x in floating_inputs(args, kwargs):
            assert x.dtype == weights, f"a {weights} teacher received a {x.dtype} input of shape {tuple(x.shape)}"
            seen.append(x.dtype)
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def snapshot(model) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training,
            "flags": [p.requires_grad for p in model.parameters()]}


def assert_as_given(model, snap: dict) -> None:
    state = model.state_dict()
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in snap["state"].items()), \
        "the teacher's dtype or weights changed"
    assert model.training == snap["training"], "the teacher's mode changed"
    assert [p.requires_grad for p in model.parameters()] == snap["flags"], "the teacher's requires_grad changed"


def textcls(layers):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                    num_attention_heads=4, vocab_size=40, num_labels=3))


def textcls_rows(n=16):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(5, 40, (n, 10), generator=g).tolist(),
                              "attention_mask": [[1] * 10] * n,
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def resnet():
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], num_labels=3))


def case(name, tok):
    """(teacher(s), student, train_dataset, collator, extra config) for each task."""
    if name == "causal_lm":
        t = CAUSAL["llama"]()
        return t, make_student(t, num_layers=2), padded_rows(), None, {"hidden_weight": 1.0}
    if name == "masked_lm":
        t = MASKED["bert"]()
        return (t, make_student(t, num_layers=2), text_dataset(tok),
                DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.3), {"hidden_weight": 1.0})
    if name == "image_vit":
        return vit(4), vit(2, hidden=16), image_dataset(), None, {"hidden_weight": 1.0, "layer_map": "0:0,2:1,4:2"}
    if name == "image_cnn":
        return vit(4), resnet(), image_dataset(), None, {}
    if name == "text_classification":
        return textcls(4), textcls(2), textcls_rows(), None, {"hidden_weight": 1.0, "layer_map": "0:0,2:1,4:2"}
    if name == "several_teachers":
        return [vit(4), vit(3)], vit(2, hidden=16), image_dataset(), None, {}
    raise KeyError(name)


TASKS = ["causal_lm", "masked_lm", "image_vit", "image_cnn", "text_classification", "several_teachers"]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return DistillationConfig(**{**base, **kw})


def train_checked(teachers, student, data, collator, args, tok) -> DistillationTrainer:
    """Train with a dtype guard on every prepared teacher; the guard must have seen inputs for image tasks."""
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=args, train_dataset=data,
                                  data_collator=collator, processing_class=tok if collator else None)
    seen = []
    handles = [guard(t, seen) for t in trainer.teachers.values()]
    trainer.train()
    for h in handles:
        h.remove()
    if "pixel_values" in data.column_names:
        assert seen, "no floating input reached the teacher: the guard checked nothing"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    return trainer


@pytest.mark.parametrize("task", TASKS)
def test_a_bfloat16_teacher_trains_every_task_and_gets_bfloat16_inputs(task, tmp_path, tiny_tokenizer):
    """The user loads the teacher in bfloat16 (what the recipes do where it is native): it trains on any CPU."""
    teachers, student, data, collator, extra = case(task, tiny_tokenizer)
    group = teachers if isinstance(teachers, list) else [teachers]
    for t in group:
        t.to(BF16)
    snaps = [snapshot(t) for t in group]
    trainer = train_checked(teachers, student, data, collator, config(tmp_path, **extra), tiny_tokenizer)
    assert {p.dtype for t in trainer.teachers.values() for p in t.parameters()} == {BF16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    for t, snap in zip(group, snaps):
        assert_as_given(t, snap)
    if task.startswith("image") or task == "several_teachers":  # the report's own evaluation with that teacher
        batch = {k: v for k, v in data[:4].items()}
        seen = []
        handle = guard(group[0], seen)
        metrics = evaluate(student, [batch], "classification", teacher=group[0])
        handle.remove()
        assert seen and math.isfinite(metrics["teacher_kl"])


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("task", TASKS)
def test_auto_leaves_the_users_teacher_as_given(task, native, tmp_path, tiny_tokenizer, monkeypatch):
    """teacher_dtype='auto' (the default) with a float32 model object, whatever the hardware check says: the teacher
    trains in float32 and comes back with the same dtype, bits, mode and requires_grad flags."""
    monkeypatch.setenv(NATIVE_BF16_ENV, native)
    teachers, student, data, collator, extra = case(task, tiny_tokenizer)
    group = teachers if isinstance(teachers, list) else [teachers]
    group[0].train()  # a teacher passed in training mode with gradients on comes back so
    snaps = [snapshot(t) for t in group]
    trainer = train_checked(teachers, student, data, collator, config(tmp_path, **extra), tiny_tokenizer)
    for t, snap in zip(group, snaps):
        assert_as_given(t, snap)
    trainer.evaluate(eval_dataset=data.select(range(4)))  # evaluation after training gives it back too
    for t, snap in zip(group, snaps):
        assert_as_given(t, snap)


@pytest.mark.parametrize("native", ["1", "0"])
def test_auto_loads_a_teacher_folder_in_bfloat16_only_where_native(native, tmp_path, monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, native)
    vit(4).save_pretrained(tmp_path / "teacher")
    trainer = train_checked(str(tmp_path / "teacher"), vit(2, hidden=16), image_dataset(), None, config(tmp_path),
                            None)
    expected = BF16 if native == "1" else torch.float32
    assert {p.dtype for p in trainer.teacher.parameters()} == {expected}


def test_an_explicit_teacher_dtype_casts_in_place_with_a_warning(tmp_path):
    teacher = vit(4)
    with pytest.warns(UserWarning, match="in place"):
        trainer = train_checked(teacher, vit(2, hidden=16), image_dataset(), None,
                                config(tmp_path, teacher_dtype="bfloat16"), None)
    assert trainer.teacher is teacher and {p.dtype for p in teacher.parameters()} == {BF16}
    with warnings.catch_warnings():  # already in that dtype: nothing to cast, nothing to say
        warnings.simplefilter("error", UserWarning)
        DistillationTrainer(model=vit(2, hidden=16), teacher_model=teacher, args=config(tmp_path / "b",
                            teacher_dtype="bfloat16"), train_dataset=image_dataset())


@pytest.mark.parametrize("stages", ["chain", "born_again"])
def test_chain_and_born_again_with_a_bfloat16_teacher(stages, tmp_path):
    from hf_kd.modes.chain import born_again, distill_chain
    teacher = vit(4).to(BF16)
    snap = snapshot(teacher)
    seen = []
    handle = guard(teacher, seen)
    if stages == "chain":
        trainers = distill_chain(teacher, [vit(3), vit(2, hidden=16)], config(tmp_path), train_dataset=image_dataset())
    else:
        _, trainers = born_again(teacher, lambda: vit(4), 2, config(tmp_path), train_dataset=image_dataset())
    handle.remove()
    assert seen and len(trainers) == 2
    assert all(math.isfinite(h["loss"]) for t in trainers for h in t.state.log_history if "loss" in h)
    assert_as_given(teacher, snap)


def test_a_cache_made_by_a_bfloat16_teacher_trains(tmp_path):
    from hf_kd.teachers.cache import build_teacher_cache
    teacher = CAUSAL["llama"]().to(BF16)
    build_teacher_cache(teacher, padded_rows(), str(tmp_path / "cache"), k=8, temperature=1.0, batch_size=4)
    trainer = DistillationTrainer(model=make_student(CAUSAL["llama"](), num_layers=1),
                                  args=config(tmp_path, teacher_cache=str(tmp_path / "cache"), temperature=1.0))
    trainer.train()
    assert all(math.isfinite(h["kd_loss"]) for h in trainer.state.log_history if "kd_loss" in h)
