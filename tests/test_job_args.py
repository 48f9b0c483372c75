"""The recipes' command-line precedence: defaults < YAML < the --quick preset named on the command line < flags."""

import dataclasses

from hf_kd_recipes.job_args import JobArguments, parse


@dataclasses.dataclass
class Job(JobArguments):
    size: int = 1


DEFAULTS = dict(output_dir="out/default", max_steps=100, learning_rate=1e-3, size=2)
QUICK = dict(output_dir="out/quick", max_steps=5, size=3)


def run(tmp_path, yaml_text, *flags):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    job, args = parse(Job, ["--config", str(config), *flags, "--use_cpu", "true"], DEFAULTS, QUICK)
    return job, args


def test_yaml_over_defaults(tmp_path):
    job, args = run(tmp_path, "max_steps: 60\nsize: 4\n")
    assert (args.max_steps, job.size, args.learning_rate, args.output_dir) == (60, 4, 1e-3, "out/default")


def test_quick_on_the_command_line_over_yaml_and_flags_over_both(tmp_path):
    job, args = run(tmp_path, "max_steps: 60\nlearning_rate: 0.01\n", "--quick")
    assert (args.max_steps, job.size, args.learning_rate, job.quick) == (5, 3, 0.01, True)  # a smoke test of the YAML
    job, args = run(tmp_path, "max_steps: 60\n", "--quick", "--max_steps", "7")
    assert args.max_steps == 7
    job, args = run(tmp_path, "max_steps: 60\n", "--quick", "false")
    assert (args.max_steps, job.quick) == (60, False)


def test_quick_inside_the_yaml_stays_under_the_yaml(tmp_path):
    job, args = run(tmp_path, "quick: true\nmax_steps: 60\n")
    assert (args.max_steps, job.size, args.output_dir, job.quick) == (60, 3, "out/quick", True)
