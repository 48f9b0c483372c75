"""scripts/mlm_pays.py: every config of the masked-LM search is a valid set of the job's flags (the summary and table
are pays.py's, tested in test_image_pays_script.py; the training path is the job's own, test_jobs.py)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("mlm_pays", os.path.join(ROOT, "scripts", "mlm_pays.py"))
mlm_pays = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mlm_pays)


@pytest.mark.parametrize("name", list(mlm_pays.CONFIGS))
def test_each_config_parses_as_the_jobs_flags(name):
    flags = mlm_pays.CONFIGS[name]
    job, args = mlm_pays.distill_mlm.parse_job(flags + ["--eval_split", "validation", "--equal_time", "true"])
    assert job.mode == "mlm" and job.eval_split == "validation" and job.equal_time
    for flag, value in zip(flags[::2], flags[1::2]):  # each flag reached the job or the trainer's config
        field = flag.lstrip("-")
        assert str(getattr(job, field, getattr(args, field, None))) in (value, str(float(value)))


def test_default_config_is_the_jobs_default():
    job, args = mlm_pays.distill_mlm.parse_job(mlm_pays.CONFIGS["default"])
    assert args.max_steps == mlm_pays.distill_mlm.DEFAULTS["max_steps"] and job.max_train_chunks == 0
