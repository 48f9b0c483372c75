"""scripts/clm_pays.py: its table (per-seed differences from the baseline of the same seed) and plot from recorded
runs; the training path itself is smoke-tested by the job's quick test (the same prepare / teacher_source)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("clm_pays", os.path.join(ROOT, "scripts", "clm_pays.py"))
clm_pays = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clm_pays)


def _row(config, seed, ppl, seconds, steps=60):
    curve = [{"step": 0, "seconds": 0.0, "perplexity": 200.0}, {"step": steps, "seconds": seconds, "perplexity": ppl}]
    return {"config": config, "seed": seed, "steps": steps, "seconds": seconds, "perplexity": ppl, "teacher_kl": 1.0,
            "load_before": 1.0, "load_after": 2.0, "curve": curve}


def test_table_and_plot(tmp_path):
    results = {"settings": {"split": "test", "steps": 60}, "machine": "m", "runs": {
        "base/seed0": _row("base", 0, 80.0, 100.0), "base/seed1": _row("base", 1, 84.0, 100.0),
        "kd_t1/seed0": _row("kd_t1", 0, 60.0, 120.0), "kd_t1/seed1": _row("kd_t1", 1, 63.0, 120.0),
        "base@time_of_kd_t1/seed0": _row("base", 0, 82.0, 120.0, steps=72)}}
    table = clm_pays.markdown(results)
    kd = next(line for line in table.splitlines() if line.startswith("| kd_t1 |"))
    assert "61.50 ± 2.12" in kd and "-20.00, -21.00" in kd  # mean ± sd over seeds, per-seed differences
    assert "| base@time_of_kd_t1 | 1 | 82.00 |" in table and "72" in table
    assert clm_pays.plot(results, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 1000
