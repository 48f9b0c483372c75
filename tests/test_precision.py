"""Mixed precision and memory savers through the Trainer's own arguments: bf16 autocast on CPU trains and stays
finite with the losses computed in float32; gradient checkpointing of the student gives the same step as
without it."""

import math

import pytest
import torch

from hf_kd import DistillationTrainer

from .scripts.tiny import args, losses, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)


def test_bf16_on_cpu_trains_and_stays_finite(tmp_path):
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, max_steps=4, bf16=True))
    inner = []  # dtypes of a block's output inside each model's forward (autocast runs the matmuls in bf16)
    for model in (student, teacher):
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    loss_dtypes = []
    engine = trainer.engine

    def spy(ctx, task, kd):  # what reaches the loss: float32 logits (accelerate converts the outputs)
        out = engine(ctx, task, kd)
        loss_dtypes.append((ctx.student.logits.dtype, out[0].dtype))
        return out
    trainer.engine = spy
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 4 and all(math.isfinite(v) for row in logged for v in row[1:] if v is not None)
    assert set(inner) == {torch.bfloat16} and len(inner) >= 8  # student and teacher, every step
    assert set(loss_dtypes) == {(torch.float32, torch.float32)}
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay float32


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    runs = []
    for checkpointing in (False, True):
        teacher, student = pair()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                      args=args(tmp_path / str(checkpointing), max_steps=2,
                                                gradient_checkpointing=checkpointing))
        trainer.train()
        runs.append(losses(trainer))
        assert student.is_gradient_checkpointing == checkpointing
    for a, b in zip(*runs):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
