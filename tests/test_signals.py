"""The signal architecture: custom signals, schedules that never touch args, the signals' trainable parts seen by
the Trainer (optimizer, clipping, grad_norm), construction checks that read a schedule's peak, transfer sets."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.flow.align import batch_counts, position_masks
from hf_kd.flow.capture import Needs
from hf_kd.flow.schedules import Schedule
from hf_kd.signals import Signal

from .scripts.tiny import args as tiny_args
from .scripts.tiny import pair, rows


class LastStateMSE(Signal):
    """A user's own signal: MSE of the last hidden state at every non-padding token (same widths)."""

    normalizer = "hidden"

    def needs(self, side):
        return Needs(hidden={-1})

    def loss_sum(self, ctx):
        s, t = ctx.student.hidden[-1], ctx.teacher.hidden[-1]
        return ((s - t) ** 2).mean(-1)[ctx.masks["hidden"]].sum()


def test_a_custom_signal_trains_and_is_logged_under_its_name(tmp_path):
    teacher, _ = pair()
    student = make_student(teacher, num_layers=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=tiny_args(tmp_path, hidden_weight=0.0),
                                  signals=[LastStateMSE("last_state", weight=Schedule(0.0, 2.0, "linear"))])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "last_state_loss" not in logs[0] and math.isfinite(logs[-1]["last_state_loss"])  # weight 0 at step 0
    assert [h["last_state_weight"] for h in logs] == pytest.approx([0.0, 1.0, 2.0])


def test_signal_names_must_be_unique_and_something_must_train(tmp_path):
    teacher, student = pair()
    with pytest.raises(ValueError, match="unique"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(), args=tiny_args(tmp_path),
                            signals=[LastStateMSE("kd")])


@pytest.mark.parametrize("kind,expected", [
    ("linear", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("step", [0.0, 0.0, 1.0, 1.0, 1.0]),
    ("warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("cosine", [0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(3 * math.pi / 4)) / 2, 1.0]),
])
def test_schedule_shapes(kind, expected):
    s = Schedule(0.0, 1.0, kind, at=0.5)
    assert [s.value(i, 5) for i in range(5)] == pytest.approx(expected)
    assert s.peak == 1.0 and Schedule(3.0, 1.0, kind).peak == 3.0 and Schedule.constant(2.0).value(4, 5) == 2.0


def test_schedules_never_modify_args(tmp_path):
    teacher, _ = pair()
    a = tiny_args(tmp_path, weight_schedule="linear", kd_weight=1.0, kd_weight_end=0.0, temperature=4.0,
                  temperature_end=1.0)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=a,
                                  train_dataset=rows())
    trainer.train()
    assert (a.kd_weight, a.temperature) == (1.0, 4.0)
    assert [h["temperature"] for h in trainer.state.log_history if "loss" in h] == pytest.approx([4.0, 2.5, 1.0])


def test_projections_are_clipped_with_the_student(tmp_path):
    """max_grad_norm clips the signals' parameters too: with SGD at lr 1, the whole update (student and projections)
    has norm <= max_grad_norm, so each projection moves by at most that."""
    teacher, student = pair(student_hidden=16)
    a = tiny_args(tmp_path, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=1e-3,
                  max_steps=1, weight_decay=0.0, hidden_weight=100.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows())
    before = [p.detach().clone() for p in trainer.projections.parameters()]
    trainer.train()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer.projections.parameters(), before)))
    assert 0 < float(moved) <= 1e-3 * 1.0001
    grad_norm = next(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h)
    assert grad_norm > 1e-3  # it was clipped (the logged norm is before clipping, projections included)


def test_create_optimizer_is_idempotent(tmp_path):
    """Calling create_optimizer_and_scheduler before train() (as users and callbacks do) used to add the
    projections' group twice ('some parameters appear in more than one parameter group')."""
    teacher, student = pair(student_hidden=16)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=tiny_args(tmp_path), train_dataset=rows())
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    trainer.create_optimizer()
    ids = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert {id(p) for p in trainer.projections.parameters()} <= set(ids)
    trainer.train()


def test_cache_checks_read_the_schedule_peak(tmp_path):
    """With a teacher cache, a hidden-state loss scheduled 0 -> 1 used to be silently never computed, and a jsd
    kd_loss whose weight starts at 0 silently trained forward KL: both are refused at construction now."""
    from hf_kd.teachers.cache import build_teacher_cache
    teacher, student = pair()
    data = rows(n=4, labels=True)
    cache = str(tmp_path / "cache")
    build_teacher_cache(teacher, data, cache, k=4, temperature=2.0)
    for kw, message in (
            (dict(hidden_weight=0.0, hidden_weight_end=1.0, weight_schedule="linear"), "hidden"),
            (dict(kd_impl="full", kd_loss="jsd", kd_weight=0.0, kd_weight_end=1.0, weight_schedule="linear",
                  hidden_weight=0.0), "forward_kl")):
        with pytest.raises(ValueError, match=message):
            DistillationTrainer(model=student, args=tiny_args(tmp_path / "o", teacher_cache=cache, **kw))


def classifier(layers, seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                    num_attention_heads=4, vocab_size=40, num_labels=3))


def labelled_and_unlabelled(n=16, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, length), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[n // 2:] = -100  # the second half: a transfer set, no labels
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_unlabelled_examples_are_distilled(tmp_path):
    """A classification batch mixing labelled and unlabelled (-100) examples: KD counts every example, the task
    loss only the labelled ones; kd_positions='labels' restores the old behaviour."""
    batch = {"input_ids": torch.ones(4, 5, dtype=torch.long), "labels": torch.tensor([1, -100, 2, -100])}
    masks = position_masks(batch, "classification")
    assert masks["kd"].tolist() == [True] * 4 and masks["task"].tolist() == [True, False, True, False]
    assert position_masks(batch, "classification", "labels")["kd"].tolist() == [True, False, True, False]
    assert batch_counts(batch, "classification").tolist() == [2.0, 4.0, 20.0, 4.0, 1.0]
    teacher, student = classifier(2, 0), classifier(1, 1)
    unlabelled = Dataset.from_dict({"input_ids": labelled_and_unlabelled()["input_ids"][8:], "labels": [-100] * 8})
    a = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                           use_cpu=True, save_strategy="no", logging_steps=1, teacher_dtype="model")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=unlabelled)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()  # no labels at all: the task term is 0, KD still trains the student
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["kd_loss"] > 0 and h["task_loss"] == 0 for h in logs)


def test_with_transfer_set_marks_unlabelled_rows():
    from hf_kd.data import with_transfer_set
    labelled = Dataset.from_dict({"input_ids": [[1, 2], [3, 4]], "labels": [0, 2]})
    unlabelled = Dataset.from_dict({"input_ids": [[5, 6], [7, 8], [9, 1]], "text": ["a", "b", "c"]})
    both = with_transfer_set(labelled, unlabelled)
    assert both["labels"] == [0, 2, -100, -100, -100] and both["input_ids"][2] == [5, 6]
    assert both.column_names == ["input_ids", "labels"]
    with pytest.raises(ValueError, match="lacks columns"):
        with_transfer_set(labelled, Dataset.from_dict({"text": ["x"]}))


def test_progressive_layer_wise_stages(tmp_path):
    """3 layer pairs -> 4 stages over 8 steps: pair i joins at stage i, the logit terms at the last; each pair is
    its own signal with its own projection; resuming mid-stage continues the same stages (they follow the step)."""
    teacher, student = pair(student_hidden=16)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=tiny_args(tmp_path, max_steps=8, progressive=True, layer_map="0:0,2:1,4:2"))
    names = [s.name for s in trainer.signals]
    assert names == ["task", "kd", "hidden_0", "hidden_1", "hidden_2"]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    on = [[k for k in ("hidden_0_loss", "hidden_1_loss", "hidden_2_loss", "kd_loss", "task_loss") if k in h]
          for h in logs]
    assert on[0] == ["hidden_0_loss"] and on[2] == ["hidden_0_loss", "hidden_1_loss"]  # step 3: x = 2/7 >= 1/4
    assert on[-1] == ["hidden_0_loss", "hidden_1_loss", "hidden_2_loss", "kd_loss", "task_loss"]
    with pytest.raises(ValueError, match="hidden_weight > 0"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                            args=tiny_args(tmp_path / "x", progressive=True, hidden_weight=0.0))
