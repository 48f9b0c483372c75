"""The no-teacher baseline with the same trainer: DistillationTrainer without a teacher trains the task term alone
(what every comparison of distillation needs, from the same initial student), and refuses any term that reads a
teacher, naming the field to set to 0."""

import math

import pytest
import torch

from hf_kd import DistillationTrainer
from hf_kd.modes.experiment import baseline_args

from .scripts.tiny import args, llama, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)


@pytest.mark.parametrize("field", ["kd_weight", "hidden_weight", "relation_weight"])
def test_a_term_that_reads_the_teacher_is_refused_without_one(tmp_path, field):
    kw = {"kd_weight": 0.0, "hidden_weight": 0.0, field: 1.0}
    with pytest.raises(ValueError, match=r"needs a teacher \(set its weight to 0|no teacher was passed\): set"):
        DistillationTrainer(model=llama(layers=2), args=args(tmp_path, **kw), train_dataset=rows())


def test_the_baseline_trains_the_task_term_alone(tmp_path):
    student = llama(layers=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, args=baseline_args(args(tmp_path, max_steps=3), str(tmp_path / "b")),
                                  train_dataset=rows())
    assert trainer.teacher is None and [s.name for s in trainer.signals] == ["task"]
    batch = trainer.data_collator([rows()[i] for i in range(4)])
    labels = batch["labels"][:, 1:]
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert float(trainer.compute_loss(student, dict(batch))) == pytest.approx(float(reference), rel=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["task_loss"]) and "kd_loss" not in h for h in logs)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_the_baseline_config_zeroes_every_teacher_term(tmp_path):
    teacher, _ = pair()
    a = baseline_args(args(tmp_path, kd_weight=2.0, hidden_weight=1.0, at_weight=0.5, at_layers="a:b"), str(tmp_path))
    weights = {k: v for k, v in vars(a).items() if k.endswith("_weight")}
    assert weights and all(v == 0.0 for v in weights.values()) and a.alpha_task == 1.0
