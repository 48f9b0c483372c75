"""Route-constrained optimisation: teacher checkpoints used in turn at fractions of training, loaded in place,
logged, and the right one after a resume."""

import pytest
import torch
from transformers import TrainerCallback

from hf_kd import DistillationTrainer, make_student
from hf_kd.teachers.curriculum import switch_points

from .scripts.tiny import args, llama, one_thread, rows  # noqa: F401  (one_thread: autouse fixture)


def checkpoints(tmp_path, n=3):
    """n save_pretrained folders of the same teacher architecture with different weights (an 'early -> final'
    route), and their first-layer weight for identification."""
    folders, marks = [], []
    for i in range(n):
        model = llama(seed=10 + i)
        folder = tmp_path / f"teacher_ckpt_{i}"
        model.save_pretrained(folder)
        folders.append(str(folder))
        marks.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
    return folders, marks


class Watch(TrainerCallback):
    """The teacher's identifying weight at each optimizer step (after the curriculum has loaded its stage)."""

    def __init__(self, teacher):
        self.teacher, self.seen = teacher, []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(self.teacher.model.layers[0].mlp.up_proj.weight.detach().clone())


def which(weight, marks):
    return next(i for i, m in enumerate(marks) if torch.equal(weight, m))


def test_switch_points():
    assert switch_points(3, None) == pytest.approx([1 / 3, 2 / 3])
    assert switch_points(2, [0.25]) == [0.25]
    with pytest.raises(ValueError, match="increasing fractions"):
        switch_points(3, [0.6, 0.3])


def test_checkpoints_are_used_in_turn_and_after_a_resume(tmp_path):
    folders, marks = checkpoints(tmp_path)
    teacher = llama(seed=99)  # the architecture; its own weights are replaced by the curriculum's
    student = make_student(teacher, num_layers=2)
    watch = Watch(teacher)
    a = args(tmp_path / "run", max_steps=6, teacher_checkpoints=",".join(folders), save_strategy="steps",
             save_steps=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(), args=a,
                                  callbacks=[watch])
    trainer.train()
    # steps 0..5, fractions step/5: stage 0 below 1/3, stage 1 below 2/3, stage 2 after
    assert [which(w, marks) for w in watch.seen] == [0, 0, 1, 1, 2, 2]
    assert [h["teacher_checkpoint"] for h in trainer.state.log_history if "loss" in h] == [0, 0, 1, 1, 2, 2]
    assert all(p.requires_grad for p in teacher.parameters())  # frozen while used, given back as passed
    # a new run resumed from checkpoint-3 starts with the stage of step 3 loaded, not the teacher as passed
    teacher2 = llama(seed=99)
    watch2 = Watch(teacher2)
    resumed = DistillationTrainer(model=make_student(teacher2, num_layers=2), teacher_model=teacher2,
                                  train_dataset=rows(), args=a, callbacks=[watch2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert [which(w, marks) for w in watch2.seen] == [1, 2, 2]


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    folders, _ = checkpoints(tmp_path, n=1)
    other = llama(layers=2, seed=1)  # same widths, fewer layers: loads without a size error, keys are missing
    other.save_pretrained(tmp_path / "other")
    teacher = llama(seed=1)
    route = f"{tmp_path / 'other'},{folders[0]}"
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher,
                                  train_dataset=rows(), args=args(tmp_path / "r", max_steps=2, teacher_checkpoints=route))
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['model\.layers\.2\."):
        trainer.train()
