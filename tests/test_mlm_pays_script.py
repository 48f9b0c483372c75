"""scripts/mlm_pays.py: every config of the masked-LM search is a valid set of the job's flags (the summary and table
are pays.py's, tested in test_image_pays_script.py; the training path is the job's own, test_jobs.py)."""

import importlib.util
import os

import pytest

from hf_kd_recipes.mlm_teacher import RECIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("mlm_pays", os.path.join(ROOT, "scripts", "mlm_pays.py"))
mlm_pays = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mlm_pays)


@pytest.mark.parametrize("name", list(mlm_pays.CONFIGS))
def test_each_config_parses_as_the_jobs_flags(name):
    flags = mlm_pays.CONFIGS[name]
    job, args = mlm_pays.distill_mlm.parse_job(flags + ["--eval_split", "validation", "--equal_time", "true"])
    assert job.mode == "mlm" and job.eval_split == "validation" and job.equal_time
    for flag, value in dict(zip(flags[::2], flags[1::2])).items():  # the last value of each flag reached the job
        got = getattr(job, flag.lstrip("-"), getattr(args, flag.lstrip("-"), None))  # or the trainer's config
        assert got == type(got)(value)


def test_the_validated_config_is_the_jobs_default():
    """The search's winner, spelt out over the defaults before the search, is what the job now does unflagged."""
    def parsed(flags):
        job, args = mlm_pays.distill_mlm.parse_job(flags)
        return {**vars(job), "prep_steps": job.prep_steps or RECIPE["steps"],  # 0: the built-in teacher recipe
                **{k: getattr(args, k) for k in ("temperature", "alpha_task", "kd_positions", "hidden_weight",
                                                 "learning_rate", "max_steps")}}
    assert parsed(mlm_pays.CONFIGS[mlm_pays.VALIDATED]) == parsed([]) == parsed(mlm_pays.CONFIGS["default"])
    assert parsed(mlm_pays.CONFIGS["before"])["alpha_task"] == 1.0
