"""hf_kd.modes.experiment's no-teacher baseline: the task loss alone, whatever teacher terms the distillation used."""

import dataclasses

from hf_kd import DistillationConfig
from hf_kd.modes.experiment import baseline_args


def test_baseline_args_turn_every_teacher_term_off(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path / "kd"), alpha_task=0.5, kd_weight=0.5, hidden_weight=1.0,
                              relation_weight=1.0, hint_weight=1.0, hint_layers="a.b:c.d", hint_first_stage=0.3,
                              at_weight=1.0, at_layers="a.b:c.d", input_grad_weight=0.1, great_weight=0.1,
                              weight_schedule="linear", kd_weight_end=2.0, alpha_task_end=0.0, temperature=4.0,
                              temperature_end=1.0, max_steps=7, learning_rate=1e-3, seed=3, push_to_hub=False,
                              report_to="none")
    base = baseline_args(args, str(tmp_path / "base"))
    weights = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name.endswith("_weight")}
    assert weights and set(weights.values()) == {0.0}, weights
    assert base.alpha_task == 1.0 and base.weight_schedule == "constant" and base.hint_first_stage == 0.0
    assert base.alpha_task_end is base.kd_weight_end is base.temperature_end is None
    assert (base.max_steps, base.learning_rate, base.seed) == (7, 1e-3, 3)  # same run otherwise
    assert base.output_dir == str(tmp_path / "base") and base.save_strategy == "no" and not base.push_to_hub
    assert args.kd_weight == 0.5 and args.output_dir == str(tmp_path / "kd")  # the original is untouched


def test_report_flags_a_teacher_no_better_than_the_baseline():
    from hf_kd.tools.report import markdown, teacher_warnings
    worse = {"teacher": {"accuracy": 0.80}, "baseline_no_teacher": {"accuracy": 0.81}}
    (warning,) = teacher_warnings(worse)
    assert "no better" in warning and "0.8" in warning and "0.81" in warning
    assert teacher_warnings({"teacher": {"accuracy": 0.9}, "baseline_no_teacher": {"accuracy": 0.81}}) == []
    assert teacher_warnings({"teacher": {"perplexity": 40.0}, "baseline_no_teacher": {"perplexity": 39.0}})
    assert teacher_warnings({"teacher": {"perplexity": 38.0}, "baseline_no_teacher": {"perplexity": 39.0}}) == []
    assert teacher_warnings({"teacher": {"accuracy": 0.9}}) == []  # no baseline: nothing to compare
    report = {"task": "classification", "teacher": "t", "teacher_parameters": 10, "student_parameters": 5,
              "compression_ratio": 2.0, "speedup": 1.5, "speed_input": "x", "data": "d", "machine": "m",
              "metrics": worse, "warnings": teacher_warnings(worse)}
    assert "**Warning:** the teacher (accuracy 0.8)" in markdown(report)
