"""scripts/image_pays.py (and pays.py, which it shares with textcls_pays.py): its summary and table (mean ± sd over seeds, per-seed differences) from recorded runs; the
training path is the image job's own (tests/test_image_few_labels.py)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("image_pays", os.path.join(ROOT, "scripts", "image_pays.py"))
image_pays = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_pays)


def _run(seed, kd, base, timed):
    arm = lambda acc, steps: {"accuracy": acc, "steps": steps, "seconds": 10.0, "best_on_curve": acc}  # noqa: E731
    return {"config": "few", "split": "test", "seed": seed, "distilled": arm(kd, 100),
            "no teacher, equal steps": arm(base, 100), "no teacher, equal time": arm(timed, 230)}


def test_table_has_mean_sd_and_per_seed_gains():
    results = {"settings": {"split": "test"}, "runs": {"a": _run(0, 0.80, 0.50, 0.52), "b": _run(1, 0.90, 0.40, 0.45),
                                                      "other": {**_run(2, 0.1, 0.1, 0.1), "split": "validation"}}}
    row = image_pays.pays.summary(results)[0]
    assert row["seeds"] == [0, 1] and round(row["distilled"]["mean"], 6) == 85.0
    assert row["gain over no teacher, equal steps"] == [30.0, 50.0]
    table = image_pays.pays.markdown(results)
    assert "| few | no teacher, equal time | 48.5 ± 4.9 | 230/230 | 10.0/10.0 | +28.0, +45.0 |" in table


def test_extra_config_from_the_command_line():
    names = ["few", "x=--max_steps:960:--temperature:1"]
    image_pays.pays.extra_configs(names, image_pays.CONFIGS, image_pays.FEW)
    assert names == ["few", "x"] and image_pays.CONFIGS["x"][-4:] == ["--max_steps", "960", "--temperature", "1"]
