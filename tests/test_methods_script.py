"""scripts/methods.py end to end on the smoke-test teachers: 2 steps, tiny data, rows merged and resumed, the
Markdown rendered from real values (about 20 s)."""

import importlib.util
import json
import os
import re

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "methods.py")


@pytest.fixture(scope="module")
def methods():
    spec = importlib.util.spec_from_file_location("hf_kd_methods_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thickness_of_a_bar(methods):
    """A 3-pixel-wide, 20-pixel-long bar: 2 * 60 / (2 * 20 + 2 * 3) pixels; an empty image gives 0."""
    from hf_kd_recipes.image_teacher import MEAN, STD
    raw = torch.zeros(2, 3, 28, 28)
    raw[0, :, 4:24, 10:13] = 1.0
    pixels = (raw - MEAN) / STD
    assert methods.thickness(pixels).tolist() == pytest.approx([2 * 60 / 46, 0.0])


def test_method_fields(methods):
    assert methods.method_fields("at@30", "vit")["at_weight"] == 30.0
    assert methods.method_fields("at", "vit")["at_weight"] == methods.METHODS["at"][2]["vit"]
    assert methods.method_fields("at", "resnet")["at_layers"] == methods.PAIRS["resnet"]
    assert methods.method_fields("baseline", "vit")["kd_weight"] == 0.0
    with pytest.raises(KeyError):
        methods.method_fields("attention", "resnet")  # ViT students only


def test_two_steps_rows_resume_and_render(methods, tmp_path):
    out, md = tmp_path / "methods.json", tmp_path / "methods.md"
    argv = ["--quick", "--steps", "2", "--methods", "kd,at,reg_kd", "--students", "resnet", "--seeds", "0",
            "--train_images", "128", "--eval_images", "100", "--out", str(out), "--render", str(md)]
    doc = methods.main(argv)
    rows = doc["rows"]
    assert sorted(rows) == [f"test|resnet|{m}|0|2" for m in ("at", "kd", "reg_kd")]
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps"] == 2 and row["threads"] == 1 and row["step_seconds"] > 0 and row["load_mean"] >= 0
    kd, at, reg = rows["test|resnet|kd|0|2"], rows["test|resnet|at|0|2"], rows["test|resnet|reg_kd|0|2"]
    assert kd["examples"] == 100 and 0 <= kd["accuracy"] <= 1 and 0 <= kd["teacher_accuracy"] <= 1
    w = methods.METHODS["at"][2]["resnet"]
    assert at["fields"] == {"at_weight": w, "at_layers": methods.PAIRS["resnet"]}
    assert reg["fields"] == {"alpha_task": 1.0, "kd_weight": 1.0, "kd_loss": "mse"} and reg["mse"] > 0
    assert reg["r2"] <= 1 and reg["teacher_r2"] <= 1 and reg["teacher_mse"] > 0
    assert "attention_transfer_loss" in at["log_last"] and "kd_loss" in kd["log_last"]
    assert len(doc["meta"]["runs"]) == 1 and doc["meta"]["runs"][0]["rows"] == 3

    text = md.read_text()
    assert f"| plain KD (logits) | - | {kd['accuracy']:.4f} ± 0.0000 (seeds [0]) |" in text
    d = at["accuracy"] - kd["accuracy"]
    row = f"| KD + spatial attention transfer | at {w:g} | {at['accuracy']:.4f} ± 0.0000 (seeds [0]) | {d:+.3f} "
    assert row in text
    assert f"{reg['mse']:.4f} ± 0.0000" in text
    assert "python scripts/methods.py --quick --steps 2" in text and "cores, torch" in text
    assert not re.search(r"\bNone\b|\bnan\b|\{", text)

    timing = methods.main(["--quick", "--timing", "2x3", "--methods", "kd,at", "--students", "resnet",
                           "--train_images", "128", "--out", str(out)])["rows"]["timing|resnet|at|0|3"]
    assert timing["reference"] == "kd" and len(timing["ratios"]) == 2 and len(timing["reference_step_seconds"]) == 2
    assert timing["ratio"] == pytest.approx(sum(timing["ratios"]) / 2)  # the median of two
    assert timing["ratios"][0] == pytest.approx(timing["step_seconds"][0] / timing["reference_step_seconds"][0])

    before = json.loads(out.read_text())
    methods.main(argv)  # everything already there: nothing is trained again, nothing changes
    assert json.loads(out.read_text()) == before
    lo, hi = sorted(timing["ratios"])
    assert f"| {timing['ratio']:.2f} ({lo:.2f}-{hi:.2f}) |" in md.read_text()  # re-rendered with the timing row


def test_mode_rows_and_render(methods, tmp_path):
    out, md = tmp_path / "modes.json", tmp_path / "modes.md"
    doc = methods.main(["--quick", "--steps", "2", "--methods", "baseline,kd,multi_teacher,mutual,born_again,chain",
                        "--students", "resnet,tiny", "--seeds", "0", "--train_images", "128", "--eval_images", "100",
                        "--out", str(out), "--render", str(md)])
    rows = doc["rows"]
    assert sorted(rows) == sorted([f"test|resnet|{m}|0|2" for m in ("baseline", "kd", "multi_teacher", "mutual",
                                                                      "born_again")]
                                  + [f"test|tiny|{m}|0|2" for m in ("baseline", "kd", "chain")])
    assert all("error" not in r for r in rows.values()), rows
    assert "kd_loss" in rows["test|resnet|multi_teacher|0|2"]["log_last"]
    mutual = rows["test|resnet|mutual|0|2"]
    assert set(mutual["models"]) == {"student", "peer_0"} and mutual["best_accuracy"] == max(mutual["models"].values())
    assert mutual["models"]["student"] == mutual["accuracy"]
    ban = rows["test|resnet|born_again|0|2"]
    assert set(ban["stages"]) == {"generation_0", "generation_1", "generation_2"}
    assert ban["stages"]["generation_2"] == ban["accuracy"]
    chain, kd = rows["test|tiny|chain|0|2"], rows["test|tiny|kd|0|2"]
    assert chain["stages"]["teacher_parameters"] > 10 * chain["stages"]["student_parameters"]  # a capacity gap
    assert kd["total_steps"] == 4 and chain["total_steps"] == 2  # direct KD: both stages' steps
    text = md.read_text()
    assert "| teacher -> assistant -> student |" in text and "generation 2: " in text
    assert "the best of student and peer" in text and not re.search(r"\bNone\b|\bnan\b|\{", text)
