"""Loss-weight / temperature schedules: the curve, the config checks, and the trainer following it step by step."""

import math

import pytest
import torch

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.flow.schedules import schedule_fraction

from .test_trainer import CAUSAL, padded_rows


def test_fractions():
    assert [schedule_fraction("linear", s, 5) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert schedule_fraction("cosine", 2, 5) == pytest.approx(0.5)
    assert schedule_fraction("cosine", 1, 5) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert schedule_fraction("linear", 0, 1) == 0.0
    assert schedule_fraction("constant", 3, 4) == 0.0
    assert [schedule_fraction("step", s, 5, at=0.5) for s in range(5)] == [0, 0, 1, 1, 1]
    assert [schedule_fraction("warmup", s, 5, at=0.5) for s in range(5)] == [0, 0.5, 1, 1, 1]
    with pytest.raises(ValueError, match="schedule 'exp' unknown"):
        schedule_fraction("exp", 1, 4)


@pytest.mark.parametrize("kw,message", [
    ({"kd_weight_end": 0.0}, "weight_schedule='constant'"),
    ({"weight_schedule": "exp", "kd_weight_end": 0.0}, "weight_schedule 'exp' unknown"),
    ({"weight_schedule": "linear", "temperature_end": 0.0}, "temperature_end must be a finite number > 0"),
    ({"weight_schedule": "linear", "alpha_task_end": -1.0}, "alpha_task_end must be a finite number >= 0"),
    ({"weight_schedule": "linear", "temperature_end": 1.0, "teacher_cache": "somewhere"}, "temperature_end with "
                                                                                          "teacher_cache"),
])
def test_bad_schedules_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_weight_that_starts_at_zero_is_accepted():
    """kd_weight 0 -> 1 with alpha 0: not 'nothing to train', since a weight becomes positive."""
    DistillationConfig(output_dir="unused", report_to=[], use_cpu=True, alpha_task=0.0, kd_weight=0.0,
                       hidden_weight=0.0, weight_schedule="linear", kd_weight_end=1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        DistillationConfig(output_dir="unused", report_to=[], use_cpu=True, alpha_task=0.0, kd_weight=0.0,
                           hidden_weight=0.0)


def test_trainer_follows_the_schedule(tmp_path):
    """Progressive alpha (task 0 -> 1, KD 1 -> 0) and temperature 4 -> 1 over 5 steps; a hidden-state loss that
    starts at weight 0 is still built. The logged values (those each step trained with) follow the linear curve."""
    torch.manual_seed(0)
    teacher = CAUSAL["llama"]()
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=5, logging_steps=1,
                              per_device_train_batch_size=2, save_strategy="no", alpha_task=0.0, kd_weight=1.0,
                              hidden_weight=0.0, temperature=4.0, weight_schedule="linear", alpha_task_end=1.0,
                              kd_weight_end=0.0, hidden_weight_end=2.0, temperature_end=1.0)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=args,
                                  train_dataset=padded_rows())
    assert any(s.name == "hidden" and s.pairs for s in trainer.signals)  # hidden_weight peaks at 2: built from the start
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5]
    assert [h["alpha_task"] for h in logs] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert [h["kd_weight"] for h in logs] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [h["temperature"] for h in logs] == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    assert [h["hidden_weight"] for h in logs] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert "kd_loss" in logs[0] and "task_loss" not in logs[0]  # weight 0: the term is not even computed
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert "hidden_loss" in logs[-1] and "task_loss" in logs[-1]  # both came on during training


def test_schedule_starts_from_the_args_the_trainer_is_built_with(tmp_path):
    """An args field edited after the config was made (as users of TrainingArguments do) is the start value."""
    teacher = CAUSAL["llama"]()
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, logging_steps=1,
                              per_device_train_batch_size=4, save_strategy="no", weight_schedule="linear",
                              temperature=4.0, temperature_end=1.0)
    args.temperature = 3.0
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=args,
                                  train_dataset=padded_rows())
    trainer.train()
    assert [h["temperature"] for h in trainer.state.log_history if "loss" in h] == pytest.approx([3.0, 1.0])
