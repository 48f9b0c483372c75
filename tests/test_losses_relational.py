"""Similarity-preserving KD: the formula, its invariances, pooling, and the trainer using it (relation_weight)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.losses import pooled, similarity_preserving

from .scripts.tiny import pair, rows


def textbook(fs, ft):
    """Tung & Mori's loss written out entry by entry."""
    b = fs.shape[0]
    gs, gt = fs @ fs.t(), ft @ ft.t()
    total = 0.0
    for i in range(b):
        rs, rt = gs[i] / gs[i].norm(), gt[i] / gt[i].norm()
        total += float(((rs - rt) ** 2).sum())
    return total / b ** 2


def test_matches_the_formula_for_different_widths():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(6, 8, generator=g), torch.randn(6, 20, generator=g)
    assert float(similarity_preserving(fs, ft)) == pytest.approx(textbook(fs, ft), rel=1e-5)


def test_zero_when_the_teacher_is_a_rotation_of_the_student_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(5, 8, generator=g, requires_grad=True)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    ft = F.pad(fs.detach() @ q, (0, 4))  # same example similarities, other basis, wider
    assert float(similarity_preserving(fs.detach(), ft)) == pytest.approx(0.0, abs=1e-6)
    loss = similarity_preserving(fs, torch.randn(5, 12, generator=g))
    loss.backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


def test_pooling_ignores_padding_and_batch_mismatch_is_named():
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pooled(states, mask), torch.stack([states[0, :2].mean(0), states[1, 0]]))
    torch.testing.assert_close(pooled(states), states.mean(1))
    with pytest.raises(ValueError, match="the batches must match"):
        similarity_preserving(torch.randn(3, 4), torch.randn(2, 4))


def test_trainer_trains_with_relation_weight_only(tmp_path):
    """relation_weight alone (no hidden or logit loss, student narrower than the teacher): no projection is made,
    the relation loss is logged, finite, and the student changes."""
    teacher, student = pair(student_hidden=16)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3, logging_steps=1,
                              per_device_train_batch_size=4, save_strategy="no", learning_rate=1e-2,
                              alpha_task=0.0, kd_weight=0.0, relation_weight=1.0, layer_map="2:1,4:2")
    before = [p.detach().clone() for p in student.parameters()]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows())
    assert len(trainer.projections) == 0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["relation_loss"]) and h["relation_loss"] > 0 for h in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
