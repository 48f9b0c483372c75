"""scripts/clm_modes.py: the continuation metrics against hand-computed references, the equal-time budget and the
summary over seeds (the training runs themselves are the recipe's, tested in test_jobs)."""

import importlib.util
import math
import os

import pytest
import torch

from .scripts.tiny import llama, one_thread  # noqa: F401  (one_thread: autouse fixture)
from .test_prompts import chat_tokenizer

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "clm_modes.py")


@pytest.fixture(scope="module")
def modes():
    spec = importlib.util.spec_from_file_location("hf_kd_clm_modes_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_continuation_metrics_match_references(modes, monkeypatch):
    teacher, student, tok = llama(seed=3), llama(hidden=16, layers=2, seed=4), chat_tokenizer(template=False)
    prompts, texts = [[5, 6, 7], [8, 9], [10]], [[5, 6, 5, 6, 5], [7, 8, 9], []]  # the last: EOS at once
    monkeypatch.setattr(modes, "generate_completions", lambda model, p, *a, **k: texts if p == prompts else None)
    out = modes.continuations(student, teacher, prompts, tok, max_new_tokens=5, seed=0)
    nll = 0.0
    for prompt, text in zip(prompts[:2], texts[:2]):
        ids = prompt + text
        logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
    assert out["continuation_tokens"] == 8
    assert out["continuation_teacher_nll"] == pytest.approx(nll / 8, rel=1e-5)
    assert out["distinct_2"] == pytest.approx((2 / 4 + 2 / 2) / 2)  # (5,6),(6,5) twice each; (7,8),(8,9)


def test_equal_time_steps(modes):
    assert modes.equal_time_steps(30, 168.0, 275.0) == 18  # a mode 1.64x slower fits 18 of the baseline's 30
    assert modes.equal_time_steps(30, 168.0, 84.0) == 60
    assert modes.equal_time_steps(30, 1.0, 1000.0) == 1


def run(mode, seed, ppl, seconds, generating=0.0, steps=30):
    return {"mode": mode, "seed": seed, "steps": steps, "seconds": seconds, "generation_seconds": generating,
            "perplexity": ppl, "teacher_kl": ppl / 100, "continuation_teacher_nll": 5.0, "distinct_2": 0.9}


def test_summary_over_seeds_and_table(modes):
    results = {"machine": "m", "command": "python scripts/clm_modes.py", "runs": {
        "seed0/baseline/equal_steps": run("baseline", 0, 80.0, 100.0),
        "seed1/baseline/equal_steps": run("baseline", 1, 90.0, 110.0),
        "seed0/on_policy/equal_steps": run("on_policy", 0, 70.0, 200.0, generating=50.0),
        "seed1/on_policy/equal_steps": run("on_policy", 1, 100.0, 200.0, generating=100.0),
        "seed0/on_policy/equal_time": run("on_policy", 0, 85.0, 100.0, steps=15),
    }}
    rows = {(r["mode"], r["budget"]): r for r in modes.summarise(results)}
    on = rows[("on_policy", "equal_steps")]
    assert on["perplexity"] == pytest.approx((85.0, math.sqrt(450.0)))  # mean and sample std of 70, 100
    assert on["ppl_minus_baseline"] == [-10.0, 10.0]
    assert on["generation_share"] == pytest.approx(0.375)
    assert rows[("on_policy", "equal_time")]["ppl_minus_baseline"] == [5.0]
    assert [key[0] for key in rows] == ["baseline", "on_policy", "on_policy"]  # modes in their fixed order
    table = modes.markdown(results)
    assert "| on_policy | equal steps | 30/30 | 200 | 38% | 85.00 ± 21.21 |" in table
    assert "-10.00, +10.00 |" in table and "| on_policy | equal time | 15 |" in table
