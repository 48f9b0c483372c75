"""Smoke test of scripts/benchmark.py's building blocks on tiny random models (in-process, a few seconds)."""

import importlib.util
import os

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hf_kd_benchmark_script", os.path.join(SCRIPTS, "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_loss(spec):
    """T^2 * sum over tokens of KL(p_T || p_S), in float64 with torch alone, on the inputs run_loss_case draws
    (a seed-0 generator, in the script's order): logits for naive / chunked, hidden states and heads otherwise."""
    n, v, d, temp = spec["tokens"], spec["vocab"], spec["hidden"], spec["temperature"]
    g = torch.Generator().manual_seed(0)
    if spec["impl"] in ("naive", "chunked"):
        zs = torch.randn(n, v, generator=g) * 3
        zt = torch.randn(n, v, generator=g) * 3
    else:
        hs, ws = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d ** -0.5 * 3
        ht, wt = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d ** -0.5 * 3
        zs, zt = hs.double() @ ws.double().t(), ht.double() @ wt.double().t()
    log_s, log_t = (torch.log_softmax(z.double() / temp, -1) for z in (zs, zt))
    return float((log_t.exp() * (log_t - log_s)).sum()) * temp ** 2


LOSS_SPEC = {"tokens": 24, "vocab": 50, "hidden": 8, "chunk_size": 7, "temperature": 2.0, "threads": 2, "warmup": 0,
             "reps": 2}


@pytest.mark.parametrize("impl", ["naive", "chunked", "fused", "naive_head", "chunked_head"])
def test_loss_case(bench, impl):
    """The row's loss is the forward KL of its inputs; sizes are those of the inputs and of the leaves' grads."""
    spec = {**LOSS_SPEC, "impl": impl}
    r = bench.run_loss_case(spec)
    assert r["impl"] == impl and (r["tokens"], r["vocab"], r["hidden"], r["chunk_size"]) == (24, 50, 8, 7)
    assert r["loss"] == pytest.approx(reference_loss(spec), rel=1e-5)
    mb = 4 / 2 ** 20  # float32 bytes, in MiB
    if impl in ("naive", "chunked"):
        assert r["inputs_mb"] == pytest.approx(2 * 24 * 50 * mb) and r["grad_mb"] == pytest.approx(24 * 50 * mb)
    else:  # hs, ws, ht, wt; gradients of hs and ws
        assert r["inputs_mb"] == pytest.approx(2 * (24 * 8 + 50 * 8) * mb)
        assert r["grad_mb"] == pytest.approx((24 * 8 + 50 * 8) * mb)
    assert len(r["times_s"]) == 2 and min(r["times_s"]) > 0
    assert r["time_s"] == pytest.approx(sum(r["times_s"]) / 2)  # the median of two
    assert r["above_inputs_mb"] >= r["added_mb"]  # added = above minus the gradients


def test_loss_implementations_agree(bench):
    """naive and chunked see the same logits; the *_head variants and fused the same hidden states and heads."""
    got = {impl: bench.run_loss_case({**LOSS_SPEC, "reps": 1, "impl": impl})["loss"] for impl in bench.LOSS_IMPLS}
    assert got["chunked"] == pytest.approx(got["naive"], rel=1e-4)
    assert got["fused"] == pytest.approx(got["naive_head"], rel=1e-4)
    assert got["chunked_head"] == pytest.approx(got["naive_head"], rel=1e-4)
    assert abs(got["naive"] - got["naive_head"]) > 1e-3 * got["naive"]  # the two input families do differ


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer):
    from hf_kd.tools.student import make_student
    from hf_kd.teachers.cache import build_teacher_cache
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    vocab = len(tiny_tokenizer)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                           pad_token_id=tiny_tokenizer.pad_token_id))
    teacher.save_pretrained(root / "teacher")
    make_student(teacher, num_layers=1, strategy="uniform").save_pretrained(root / "student")
    tiny_tokenizer.save_pretrained(root / "tok")
    ids = torch.randint(5, vocab, (4, 8)).tolist()
    Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 4, "labels": ids}).save_to_disk(root / "blocks")
    from datasets import load_from_disk
    build_teacher_cache(teacher, load_from_disk(root / "blocks"), str(root / "cache"), k=4, temperature=2.0)
    return root


@pytest.mark.parametrize("case", ["full", "chunked", "fused", "cache", "trl", "floor", "student"])
def test_e2e_case(bench, tiny_setup, case):
    if case == "trl":
        pytest.importorskip("trl")
    root = tiny_setup
    spec = {"case": case, "model": "tiny", "batch": 2, "seq": 8, "warmup": 1, "steps": 1, "threads": 2,
            "temperature": 2.0, "chunk_size": 5, "tokenizer": str(root / "tok"), "teacher": str(root / "teacher"),
            "student": str(root / "student"), "blocks": str(root / "blocks"), "cache_dir": str(root / "cache")}
    r = bench.run_case(spec)
    assert check_e2e_row(r, case) == ("float32", False)
    assert r["peak_train_mb"] >= r["rss_start_mb"] * 0.5


def check_e2e_row(r, case):
    """warmup 1 + 1 measured step of 2 x 8 tokens: the row's statistics are those of its own step times."""
    assert r["case"] == case and r["tokens_per_step"] == 16 and r["warmup_steps"] == 1
    assert len(r["step_times_s"]) == 2 and min(r["step_times_s"]) > 0
    assert r["step_s"] == r["step_s_mean"] == r["step_times_s"][1]  # the warmup step is not counted
    assert r["tokens_per_s"] == pytest.approx(16 / r["step_s"])
    return r["teacher_dtype"], r["student_bf16"]


def test_tables_and_targets(bench):
    e2e = [{"case": c, "model": "m", "size": "2x8", "step_s": s, "tokens_per_s": 16 / s, "peak_train_mb": p,
            "rss_start_mb": 100.0, "other_cpu_cores": 0.1}
           for c, s, p in (("chunked", 1.05, 150), ("fused", 1.0, 140), ("trl", 2.0, 400), ("floor", 1.0, 130),
                           ("cache", 1.0, 120), ("student", 0.88, 110))]
    e2e.append({"case": "full", "model": "m", "size": "2x8", "error": "exit -9"})
    losses = [{"impl": i, "vocab": 50, "tokens": 24, "chunk_size": 7, "time_s": t, "added_mb": m,
               "above_inputs_mb": m} for i, t, m in (("naive", 1.0, 100.0), ("chunked", 0.9, 5.0),
                                                     ("naive_head", 2.0, 120.0), ("fused", 1.5, 6.0))]
    caches = {"m/2x8": {"k": 32, "storage_dtype": "float16", "cache_bytes_per_token": 194.0,
                        "disk_bytes_per_token": 230.0}}
    rows = bench.targets(e2e, losses, caches)
    met = {r["target"]: r["met"] for r in rows}
    assert met["m 2x8: chunked step / floor step"] is True
    assert met["m 2x8: cache tokens/s / student-only tokens/s"] is False  # 0.88 < 0.95
    assert met["m 2x8: chunked peak RSS / TRL peak RSS"] is True
    text = bench.e2e_table(e2e) + bench.loss_table(losses) + bench.targets_table(rows)
    assert "failed: exit -9" in text and "| yes |" in text


# fused runs with both students: its logits == head(hidden) check allows for bf16 rounding (a tolerance of 3% of
# the largest logit, hf_kd/losses/fused.py _check_logits_from_hidden), so bf16 autocast is accepted.
@pytest.mark.parametrize("case,student_bf16", [("chunked", True), ("floor", True), ("trl", True), ("cache", True),
                                               ("fused", False), ("fused", True)])
def test_e2e_case_low_precision(bench, tiny_setup, case, student_bf16):
    """--teacher-dtype bfloat16 [--student-bf16]: the teacher is cast, the rows record both settings."""
    if case == "trl":
        pytest.importorskip("trl")
    root = tiny_setup
    spec = {"case": case, "model": "tiny", "batch": 2, "seq": 8, "warmup": 1, "steps": 1, "threads": 2,
            "temperature": 2.0, "chunk_size": 5, "tokenizer": str(root / "tok"), "teacher": str(root / "teacher"),
            "student": str(root / "student"), "blocks": str(root / "blocks"), "cache_dir": str(root / "cache"),
            "teacher_dtype": "bfloat16", "student_bf16": student_bf16}
    r = bench.run_case(spec)
    assert check_e2e_row(r, case) == ("bfloat16", student_bf16)
    assert bench.load_teacher(str(root / "teacher"), "bfloat16").dtype == torch.bfloat16


def test_trainer_settings_follow_options(bench, tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM
    root = tiny_setup
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    teacher = bench.load_teacher(str(root / "teacher"), "float16")
    spec = {"warmup": 0, "steps": 1, "batch": 2, "temperature": 2.0, "chunk_size": None,
            "teacher_dtype": "float16", "student_bf16": True}
    trainer = bench.build_trainer("chunked", spec, student, teacher, None, None, str(tmp_path / "a"))
    assert trainer.args.teacher_dtype == "float16" and trainer.args.bf16
    assert next(trainer.teacher.parameters()).dtype == torch.float16
    floor = bench.build_trainer("floor", {**spec, "student_bf16": False}, student, teacher, None, None,
                                str(tmp_path / "b"))
    assert not floor.args.bf16


def test_settings_kept_apart(bench):
    """Rows of another teacher dtype / student precision: not merged, labelled apart, compared like with like."""
    def row(case, step, dtype="float32", bf16=False, **kw):
        return {"case": case, "model": "m", "size": "2x8", "step_s": step, "tokens_per_s": 16 / step,
                "peak_train_mb": 150.0, "rss_start_mb": 100.0, "other_cpu_cores": 0.0, "teacher_dtype": dtype,
                "student_bf16": bf16, **kw}
    runs = [row("chunked", 1.0), {k: v for k, v in row("floor", 1.0).items() if k not in ("teacher_dtype",
                                                                                        "student_bf16")},
            row("chunked", 0.5, "bfloat16"), row("floor", 0.2, "bfloat16"),
            row("chunked", 0.4, bf16=True), row("chunked", 0.3, bf16=True)]
    best = bench.best_of_rounds(runs)
    assert len(best) == 5  # chunked x 3 settings + floor x 2 (the old-style floor row counts as float32)
    assert sorted(r["step_s"] for r in best if r["case"] == "chunked") == [0.3, 0.5, 1.0]
    met = {r["target"]: r["measured"] for r in bench.targets(best, [], {})}
    assert met["m 2x8: chunked step / floor step"] == 1.0
    assert met["m 2x8 [teacher bf16]: chunked step / floor step"] == 2.5
    assert not any("[student bf16]" in t for t in met)  # no floor of that setting: nothing to compare with
    table = bench.e2e_table(best)
    assert "(b) hf_kd default (auto = chunked) [teacher bf16] |" in table
    assert "(b) hf_kd default (auto = chunked) [student bf16] |" in table
    assert "(f) floor: teacher fwd + student CE |" in table
