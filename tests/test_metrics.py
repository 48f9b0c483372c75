"""hf_kd.tools.metrics: compression, measured speedup, the teacher-student gap and held-out learning curves."""

import pytest
import torch

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tools.metrics import HeldOutCurve, compression_ratio, gap, num_parameters, speedup

from .scripts.tiny import args, pair, rows
from .test_signals_features import bert, texts


def test_compression_speedup_and_gap():
    teacher, student = bert(4, 0), bert(1, 1)
    p_t, p_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert compression_ratio(teacher, student) == pytest.approx(p_t / p_s) and p_t > p_s
    measured = speedup(teacher, student, {"input_ids": torch.ones(2, 8, dtype=torch.long)}, repeats=3)
    assert measured["speedup"] == pytest.approx(measured["teacher_s"] / measured["student_s"])
    assert measured["input"] == "2x8" and measured["dtype"] == "float32"
    assert gap({"accuracy": 0.9, "perplexity": 10.0}, {"accuracy": 0.8, "perplexity": 12.0}) == \
        pytest.approx({"accuracy": 0.1, "perplexity": 2.0})


def test_held_out_curve(tmp_path):
    data = texts(16)
    batches = [{k: torch.tensor(data[i:i + 8][k]) for k in ("input_ids", "attention_mask", "labels")}
               for i in (0, 8)]
    curve = HeldOutCurve(batches, task="classification", every=2)
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8, report_to=[],
                              use_cpu=True, save_strategy="no", logging_steps=1, teacher_dtype="model")
    trainer = DistillationTrainer(model=bert(1, 1), teacher_model=bert(2, 0), args=args, train_dataset=data,
                                  callbacks=[curve])
    trainer.train()
    assert [p["step"] for p in curve.points] == [2, 4, 5]  # every 2 steps, and the end
    assert all(0 <= p["accuracy"] <= 1 and p["examples"] == 16 for p in curve.points)
    assert [h["step"] for h in trainer.state.log_history if "heldout_accuracy" in h] == [2, 4, 5]
    assert curve.plot(str(tmp_path / "curve.png")) and (tmp_path / "curve.png").stat().st_size > 1000


def test_parameter_counts_leave_out_the_signals_attached_during_training(tmp_path):
    teacher, student = pair()  # widths differ: the hidden-state signal adds trained projections to the student
    own = sum(p.numel() for p in student.parameters())
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=rows())
    assert len(list(trainer.signals.parameters())) > 0
    assert sum(p.numel() for p in student.parameters()) > own  # attached...
    assert num_parameters(student) == own  # ...but not counted as the student's
    assert compression_ratio(teacher, student) == sum(p.numel() for p in teacher.parameters()) / own
