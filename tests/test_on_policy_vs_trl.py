"""scripts/on_policy_vs_trl.py --quick: hf_kd's and TRL's on-policy trainers each run a step and are measured."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install -e .[dev] installs it)")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "on_policy_vs_trl.py")


def test_quick_comparison_writes_both_rows(tmp_path):
    out = tmp_path / "on_policy_vs_trl.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"hf_kd", "trl_distill"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0
        assert 0 < row["generation_share"] < 1
        assert row["generate_calls"] == 1 and row["peak_rss_mb"] > 0
    assert {"cpu", "cores", "torch", "transformers", "trl", "loadavg_before", "loadavg_after"} <= set(result["machine"])
    assert "TRL 1.16 DistillationTrainer" in proc.stdout
