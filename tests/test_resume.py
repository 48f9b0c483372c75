"""A real training process stopped by SIGTERM saves a complete checkpoint and exits 0; resuming it gives the
loss trajectory of an uninterrupted run (same data order, RNG, optimizer, scheduler and projection state)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")
KEYS = ("loss", "kd_loss", "task_loss", "hidden_loss", "grad_norm", "learning_rate")


def start(out, log, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, SCRIPT, str(out), str(log), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_log(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def finish(proc, timeout=240):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigterm_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path):
    reference = start(tmp_path / "ref", tmp_path / "ref.jsonl")
    victim = start(tmp_path / "run", tmp_path / "run.jsonl", "--sleep", "0.3")
    deadline = time.time() + 180
    while len(read_log(tmp_path / "run.jsonl")) < 4:
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline, "the training process logged nothing"
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    result = finish(victim)
    assert result["interrupted"] and 4 <= result["global_step"] < 12

    out = tmp_path / "run"
    stopped = result["global_step"]
    assert sorted(os.listdir(out)) == [f"checkpoint-{stopped}"]  # complete, and nothing half-written beside it
    ckpt = out / f"checkpoint-{stopped}"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "hf_kd_extras.pt"):
        assert (ckpt / name).is_file(), name
    assert json.load(open(ckpt / "trainer_state.json"))["global_step"] == stopped

    resumed = finish(start(out, tmp_path / "run.jsonl", "--resume"))
    assert resumed == {"global_step": 12, "interrupted": False}
    finish(reference)

    got, want = read_log(tmp_path / "run.jsonl"), read_log(tmp_path / "ref.jsonl")
    assert [h["step"] for h in got] == [h["step"] for h in want] == list(range(1, 13))
    for g, w in zip(got, want):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (g["step"], key, g[key], w[key])
