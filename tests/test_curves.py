"""hf_kd.tools.curves: held-out curves of both arms (distilled and no-teacher baseline) against steps and wall-clock
seconds, the crossover between them, and the two-panel plot."""

import pytest
import torch

from hf_kd import DistillationTrainer
from hf_kd.tools.curves import HeldOutCurve, crossover, plot_curves
from hf_kd.modes.experiment import baseline_args

from .scripts.tiny import args, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)


def _points(xs, ys, metric="perplexity"):
    return [{"step": i, "seconds": x, metric: y} for i, (x, y) in enumerate(zip(xs, ys))]


def test_crossover_is_where_the_distilled_curve_leads_for_good():
    base = _points([0, 10, 20, 30], [100, 80, 60, 50])
    assert crossover(_points([0, 15, 30], [100, 75, 45]), base, "perplexity") == 30  # 75 > 70 at 15 s
    assert crossover(_points([5, 15, 30], [85, 60, 40]), base, "perplexity") == 5  # 85 < 90 at 5 s, then on
    assert crossover(_points([5, 15, 25], [85, 75, 40]), base, "perplexity") == 25  # lost the lead at 15 s
    assert crossover(_points([5, 30], [95, 55]), base, "perplexity") is None  # never ahead
    higher = _points([0, 10], [0.2, 0.8], "accuracy")
    assert crossover(_points([0, 10], [0.3, 0.7], "accuracy"), higher, "accuracy") is None
    assert crossover(_points([0, 10], [0.3, 0.9], "accuracy"), higher, "accuracy", x="step") == 0


def test_both_arms_record_curves_in_steps_and_seconds(tmp_path):
    teacher, student = pair()
    batches = [{k: torch.tensor(v) for k, v in rows(n=4)[0:4].items()}]
    curves = {}
    for arm in ("distilled", "no teacher"):
        curve = HeldOutCurve(batches, "causal_lm", every=2, at_start=True,
                             offset_seconds=5.0 if arm == "distilled" else 0.0)
        a = args(tmp_path / "kd", max_steps=4)
        kw = {"teacher_model": teacher} if arm == "distilled" else {}
        trainer = DistillationTrainer(model=pair()[1], args=a if arm == "distilled" else baseline_args(a, str(
            tmp_path / "base")), train_dataset=rows(), callbacks=[curve], **kw)
        trainer.train()
        assert [p["step"] for p in curve.points] == [0, 2, 4]
        seconds = [p["seconds"] for p in curve.points]
        assert seconds[0] == pytest.approx(curve.offset, abs=0.5) and seconds == sorted(seconds)
        assert all(p["perplexity"] > 1 for p in curve.points)
        assert [h["step"] for h in trainer.state.log_history if "heldout_seconds" in h] == [0, 2, 4]
        curves[arm] = curve.points
    path = plot_curves(curves, str(tmp_path / "curves.png"), "perplexity")
    assert path and (tmp_path / "curves.png").stat().st_size > 1000
