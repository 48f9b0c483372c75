"""hf_kd.pairs: the teacher dtype choice ('auto' = bf16 on native-bf16 hardware), and the trainer applying it."""

import math

import pytest
import torch

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd import pairs
from hf_kd.pairs import teacher_dtype

from .test_trainer import CAUSAL, padded_rows

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_for_a_float32_teacher_on_native_bf16(monkeypatch, native):
    monkeypatch.setattr(pairs, "native_bf16", lambda device: native)
    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).bfloat16()
    assert teacher_dtype("auto", fp32, CPU) == (torch.bfloat16 if native else None)
    assert teacher_dtype("auto", bf16, CPU) is None  # already low precision: left as loaded
    assert teacher_dtype("model", fp32, CPU) is None
    assert teacher_dtype("float16", fp32, CPU) == torch.float16


def test_native_bf16_answers_for_every_device():
    assert isinstance(pairs.native_bf16(CPU), bool)
    assert pairs.native_bf16(torch.device("meta")) is False


def test_trainer_casts_the_teacher_and_trains(monkeypatch, tmp_path):
    monkeypatch.setattr(pairs, "native_bf16", lambda device: True)
    teacher = CAUSAL["llama"]()
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, logging_steps=1,
                              per_device_train_batch_size=4, save_strategy="no", hidden_weight=1.0)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=args,
                                  train_dataset=padded_rows())
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # the student is not touched
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
