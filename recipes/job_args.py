"""Command-line arguments shared by the recipes: the fields every job has, and one parser with the precedence

    a recipe's DEFAULTS  <  a YAML file (--config X.yaml)  <  the QUICK preset named on the command line (--quick)
                         <  flags on the command line

(``quick: true`` inside the YAML applies the preset under the YAML's own values), so ``--config X.yaml --quick`` is
a smoke test of that YAML whatever its step count, and an explicit flag always wins.

over the recipe's job dataclass and :class:`hf_kd.DistillationConfig` (every field of both is a flag; --help).
"""

from __future__ import annotations

import dataclasses
import sys

import yaml
from transformers import HfArgumentParser

from hf_kd import DistillationConfig
from hf_kd.tools.metrics import load_metric, metric_on_batches


@dataclasses.dataclass
class JobArguments:
    """Fields every job has (the job-specific dataclasses extend it)."""

    quick: bool = dataclasses.field(default=False, metadata={"help": "Smoke-test preset: a tiny run in ~1 minute."})
    baseline: bool = dataclasses.field(default=True, metadata={"help": "Also train the same student for the same "
                                       "steps on the task loss alone (no teacher) and report it."})
    keep_checkpoints: bool = dataclasses.field(default=False, metadata={"help": "Keep checkpoint-* folders "
                                               "after a successful run (they are removed by default)."})
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "With --push_to_hub: write "
                                      "push_dry_run.json listing what would be pushed instead of pushing."})


@dataclasses.dataclass
class ComparedJobArguments(JobArguments):
    """Fields of the jobs whose no-teacher arms run inside the job (:mod:`hf_kd_recipes.arms`): equal wall time and
    held-out curves."""

    equal_time: bool = dataclasses.field(default=False, metadata={"help": "Also train the baseline for the steps "
                                         "that fit the distilled run's training seconds (teacher forwards included, "
                                         "held-out evaluations left out), at the equal-steps baseline's speed."})
    curve_every: int = dataclasses.field(default=0, metadata={"help": "Held-out curve point every N steps for both "
                                         "arms (0 = max_steps // 8)."})


@dataclasses.dataclass
class ClassifierJobArguments(ComparedJobArguments):
    """Fields of the classification jobs: an extra ``evaluate`` metric in the report."""

    metric: str = dataclasses.field(default="", metadata={"help": "An evaluate metric added to every row of the "
                                    "report, on the same held-out predictions as accuracy: 'f1', 'precision', "
                                    "'recall', 'accuracy' ship with hf_kd (offline); other names load from the Hub; "
                                    "or a path to a metric folder. '' = none."})
    metric_args: str = dataclasses.field(default="", metadata={"help": "Arguments of the metric's compute, "
                                         "'key=value,...' (e.g. 'average=weighted'); f1/precision/recall average "
                                         "'macro' over more than two classes unless told."})

    def metric_kwargs(self) -> dict:
        """``metric_args`` as a dict, each value read as YAML ('macro' -> str, '1' -> int, 'null' -> None)."""
        pairs = [a.split("=", 1) for a in self.metric_args.split(",") if a.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--metric_args wants 'key=value,...', got {self.metric_args!r}")
        return {k.strip(): yaml.safe_load(v) for k, v in pairs}

    def metric_scorer(self, task: str):
        """``score(row, model, batches)``: adds the metric's values of ``model`` on ``batches`` to the report row
        ``row`` (a name the row already has, like 'accuracy', becomes 'evaluate_<name>'); does nothing without
        --metric. The metric is loaded now, so a wrong name fails before any training."""
        if not self.metric:
            return lambda row, model, batches: row
        metric, kwargs = load_metric(self.metric), self.metric_kwargs()

        def score(row: dict, model, batches: list[dict]) -> dict:
            for key, value in metric_on_batches(model, batches, metric, task, **kwargs).items():
                row[f"evaluate_{key}" if key in row else key] = value
            return row

        return score


def _as_args(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def parse(job_cls, argv: list[str] | None, defaults: dict, quick: dict):
    """``(job, DistillationConfig)`` from ``defaults``, the ``quick`` preset, ``--config X.yaml`` and flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from_yaml = {}
    if "--config" in argv:
        i = argv.index("--config")
        with open(argv[i + 1]) as f:
            from_yaml = yaml.safe_load(f) or {}
        del argv[i:i + 2]
    on_command_line = any(a == "--quick" and (j + 1 == len(argv) or argv[j + 1].lower() not in ("false", "0"))
                          for j, a in enumerate(argv))
    in_yaml = from_yaml.get("quick") is True and not on_command_line
    values = {**defaults, **(quick if in_yaml else {}), **from_yaml, **(quick if on_command_line else {})}
    parser = HfArgumentParser((job_cls, DistillationConfig))
    return parser.parse_args_into_dataclasses(args=_as_args(values) + argv)
