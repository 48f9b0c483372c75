"""End-to-end smoke tests of the recipes (recipes/, the package hf_kd_recipes) on the packaged real assets (--quick
presets, ~1 minute each at most).

Each job distils, trains its no-teacher baseline, writes report.json / report.md / learning_curves.png and a model
card, dry-runs the Hub push, and saves a student that loads in the matching transformers pipeline.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hf_kd.tools import assets

AVAILABLE = assets.available()
ROOT = Path(__file__).resolve().parents[1]


def needs(*names):
    missing = [assets.PACKAGES[n] for n in names if not AVAILABLE[n]]
    return pytest.mark.skipif(bool(missing), reason="asset package(s) not installed: "
                              + ", ".join(f"{p.pypi} ({p.install})" for p in missing))


def check_outputs(out: Path, report: dict, pipeline_tag: str) -> dict:
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"].keys() >= {"teacher", "student_before", "student_after", "baseline_no_teacher"}
    for key in ("compression_ratio", "speedup"):
        assert saved[key] > 0, key
    assert saved["compression_ratio"] > 1  # the student is smaller
    assert saved["train_seconds"]["distillation"] > 0
    assert saved["student_parameters"] < saved["teacher_parameters"]
    assert (out / "report.md").read_text().startswith("# Distillation report")
    assert (out / "learning_curves.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert card.startswith("---\n") and f"pipeline_tag: {pipeline_tag}" in front and "- distillation" in front
    manifest = json.loads((out / "push_dry_run.json").read_text())
    assert {"config.json", "model.safetensors", "README.md"} <= set(manifest["files"])
    assert not any(f.startswith("checkpoint-") for f in manifest["files"])
    assert report["metrics"] == saved["metrics"]
    return saved


@needs("minilm", "tales")
def test_mlm_quick_fills_masks(tmp_path):
    from transformers import pipeline

    from hf_kd_recipes import distill_mlm
    out = tmp_path / "mlm"
    report = distill_mlm.main(["--quick", "--output_dir", str(out), "--push_to_hub", "--dry_run", "--equal_time",
                               "--eval_split", "validation"])
    saved = check_outputs(out, report, "fill-mask")
    for row in ("teacher", "student_before", "student_after", "baseline_no_teacher", "baseline_equal_time"):
        assert 0 <= saved["metrics"][row]["accuracy"] <= 1
    curves = report["heldout_curves"]["points"]  # both arms and the equal-time arm, each from step 0 to its end
    timed = report["metrics"]["baseline_equal_time"]["steps"]
    assert list(curves) == ["distilled", "no teacher", f"no teacher, equal time ({timed} steps)"]
    assert all(c[0]["step"] == 0 and 0 <= c[-1]["accuracy"] <= 1 for c in curves.values())
    assert curves["distilled"][-1]["step"] == 3 and "validation chunks" in saved["data"]
    assert saved["task"] == "masked_lm" and saved["student_layers"] == [0, 2, 5]
    assert any("fitted" in n and "accuracy" in n for n in saved["notes"])  # the teacher's head is hf_kd's
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(json.loads((out / "push_dry_run.json").read_text())
                                                              ["files"])
    filled = pipeline("fill-mask", model=str(out), device="cpu")("the old king went to the [MASK].")
    assert len(filled) == 5 and all(isinstance(f["token_str"], str) for f in filled)


@needs("minilm", "tales")
def test_mlm_quick_from_a_teacher_cache(tmp_path):
    """--cache_teacher: static masks cached once with the teacher's top-k; the build is counted in the distilled
    run's seconds and its curve; the baseline still trains (dynamic masks, no teacher)."""
    from hf_kd_recipes import distill_mlm
    argv = ["--quick", "--cache_teacher", "--mask_views", "2", "--temperature", "1", "--hidden_weight", "0",
            "--kd_positions", "labels", "--output_dir", str(tmp_path / "a")]
    report = distill_mlm.main(argv)
    build = report["train_seconds"]["teacher_cache"]
    assert build <= report["heldout_curves"]["points"]["distilled"][0]["seconds"] < build + 1  # step 0: the build
    assert any("teacher cache of 2 static masking(s)" in n for n in report["notes"])
    assert 0 <= report["metrics"]["baseline_no_teacher"]["accuracy"] <= 1
    again = distill_mlm.main(argv[:-1] + [str(tmp_path / "b"), "--baseline", "false"])  # the cache is reused
    assert again["train_seconds"]["teacher_cache"] == build


@needs("minilm", "tales")
def test_encoder_quick_extracts_features(tmp_path):
    from transformers import pipeline

    from hf_kd_recipes import distill_mlm
    out = tmp_path / "encoder"
    report = distill_mlm.main(["--quick", "--mode", "encoder", "--output_dir", str(out), "--push_to_hub", "--dry_run"])
    saved = check_outputs(out, report, "feature-extraction")
    m = saved["metrics"]
    assert saved["task"] == "encoder" and saved["config"]["kd_weight"] == 0 and saved["config"]["alpha_task"] == 0
    for row in ("student_before", "student_after", "baseline_no_teacher"):
        assert -1 <= m[row]["embedding_cosine"] <= 1 and 0 <= m[row]["nn_agreement"] <= 1
    assert m["baseline_no_teacher"] == m["student_before"]  # no task loss: the baseline is the untrained copy
    assert "baseline" not in saved["train_seconds"]
    features = pipeline("feature-extraction", model=str(out), device="cpu")("Once upon a time there was a king.")
    assert len(features[0][0]) == 384


@needs("mnist")
@pytest.mark.parametrize("student", ["vit", "resnet"])
def test_image_quick_classifies(student, tmp_path):
    from transformers import pipeline

    from hf_kd_recipes import distill_image
    out = tmp_path / student
    report = distill_image.main(["--quick", "--student", student, "--output_dir", str(out), "--push_to_hub",
                                 "--dry_run"])
    saved = check_outputs(out, report, "image-classification")
    assert 0 <= saved["metrics"]["student_after"]["accuracy"] <= 1
    assert saved["config"]["hidden_weight"] == (1.0 if student == "vit" else 0.0)
    assert "preprocessor_config.json" in json.loads((out / "push_dry_run.json").read_text())["files"]
    digit = assets.load_mnist("test")[0]["image"]
    assert isinstance(digit, Image.Image) and digit.mode == "L"
    preds = pipeline("image-classification", model=str(out), device="cpu")(digit)
    assert preds and preds[0]["label"] in [str(d) for d in range(10)]


@needs("smollm2", "tales")
def test_clm_quick_generates(tmp_path):
    from transformers import pipeline

    from hf_kd_recipes import distill_clm
    out = tmp_path / "clm"
    report = distill_clm.main(["--quick", "--output_dir", str(out), "--max_steps", "1", "--eval_blocks", "1",
                       "--block_size", "32", "--student_layers", "2", "--calibration_batches", "1",
                       "--push_to_hub", "--dry_run"])
    check_outputs(out, report, "text-generation")
    # the teacher ran once into a top-k cache (its cost reported), both arms carry held-out curves in steps and seconds
    assert report["train_seconds"]["teacher_cache"] > 0 and report["config"]["hidden_weight"] == 0.0
    curves = report["heldout_curves"]
    assert set(curves["points"]) == {"distilled", "no teacher"} and {"crossover_step", "crossover_seconds"} <= set(curves)
    assert all(p["step"] == 0 for p in (c[0] for c in curves["points"].values())) and (out / "heldout_curves.png").exists()
    generate = pipeline("text-generation", model=str(out), device="cpu")
    text = generate("Once upon a time", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


@needs("mnist")
def test_recipe_yaml_and_seeds_script(tmp_path):
    """The recipe file runs from its YAML config with flags on top; scripts/seeds.py tabulates two seeds."""
    out = tmp_path / "seeds"
    cmd = [sys.executable, str(ROOT / "scripts" / "seeds.py"), str(ROOT / "recipes" / "distill_image.py"),
           "--config", str(ROOT / "recipes" / "configs" / "image_mnist.yaml"), "--quick", "--student", "resnet",
           "--max_steps", "3", "--eval_images", "100", "--out", str(out), "--seeds", "0", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["metric"] == "accuracy" and len(summary["kd_minus_baseline"]) == 2
    assert "| student after (KD) |" in result.stdout and "±" in result.stdout
    assert json.loads((out / "seed_1" / "report.json").read_text())["config"]["seed"] == 1


@needs("smollm2", "tales")
def test_cache_teacher_command(tmp_path):
    """`hf-kd cache-teacher` (recipes/cache_teacher.py) stores the teacher's top-k in the library's cache format."""
    from hf_kd.teachers.cache import CACHE_COLUMNS, load_teacher_cache
    from hf_kd_recipes import cli
    out = tmp_path / "cache"
    assert cli.main(["cache-teacher", "--output_dir", str(out), "--max_blocks", "2", "--block_size", "16", "--k", "4",
                     "--temperature", "1.0"]) == 0
    cached, meta = load_teacher_cache(str(out))
    assert len(cached) == 2 and meta["k"] == 4 and meta["temperature"] == 1.0 and meta["teacher"] == "smollm2"
    assert cached[0]["teacher_topk_ids"].shape == (16, 4) and set(CACHE_COLUMNS) <= set(cached.column_names)
