"""Exact resume in the middle of a training mode: a run stopped at a checkpoint and resumed in a fresh process
state (new models built the same way, new trainer) logs the uninterrupted run's trajectory, for modes whose state
goes beyond the student's weights: mutual-learning peers with their own learning-rate schedule, progressive
layer-wise stages, learned multi-teacher weights, self-distillation exits."""

import pytest

from hf_kd import DistillationConfig, DistillationTrainer, make_student

from .scripts.tiny import llama, one_thread, rows  # noqa: F401  (one_thread: autouse fixture)
from .test_signals_features import bert, texts

KEYS = ("loss", "grad_norm", "learning_rate")


def config(out, **kw):
    return DistillationConfig(**{**dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                                        save_strategy="steps", save_steps=3, disable_tqdm=True, seed=0,
                                        teacher_dtype="model", hidden_weight=0.0), **kw})


def mutual(out):
    return dict(model=llama(hidden=16, layers=2, seed=1), train_dataset=rows(), args=config(
        out, kd_weight=0.0, mutual_weight=1.0, peer_learning_rate="0.02", peer_lr_scheduler_type="constant"))


def progressive(out):
    teacher = llama()
    return dict(model=make_student(teacher, num_layers=2), teacher_model=teacher, train_dataset=rows(),
                args=config(out, hidden_weight=1.0, progressive=True, layer_map="0:0,4:2"))


def learned_teachers(out):
    teachers = {"a": llama(seed=3), "b": llama(seed=4)}
    return dict(model=make_student(teachers["a"], num_layers=2), teacher_model=teachers, train_dataset=rows(),
                args=config(out, teacher_weights="learned", kd_impl="full"))


def self_distill(out):
    return dict(model=bert(2, 1), train_dataset=texts(), args=config(out, kd_weight=0.0, self_distill_weight=1.0,
                                                                     self_distill_exits="1"))


def trajectory(trainer, extra):
    return [tuple(h.get(k) for k in (*KEYS, *extra)) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("make,extra", [(mutual, ("mutual_loss", "learning_rate_peer_0")),
                                        (progressive, ("hidden_0_loss", "hidden_1_loss", "kd_weight")),
                                        (learned_teachers, ("kd_loss", "kd_weight_a")),
                                        (self_distill, ("self_distill_loss",))])
def test_resume_mid_mode_gives_the_uninterrupted_trajectory(tmp_path, make, extra):
    full = DistillationTrainer(**make(tmp_path / "run"))
    full.train()
    reference = trajectory(full, extra)
    assert len(reference) == 6 and all(v is not None for row in reference[3:] for v in row)
    resumed = DistillationTrainer(**make(tmp_path / "run"))  # fresh models, built the same way
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    after = trajectory(resumed, extra)[3:]  # (the first 3 entries come from the checkpoint's trainer state)
    assert len(after) == 3
    for got, want in zip(after, reference[3:]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
