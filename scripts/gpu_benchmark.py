"""End-to-end distillation steps on one GPU: tokens per second and peak GPU memory of hf_kd's chunked and fused
paths against the floor (student CE training + a teacher forward whose output is dropped) and TRL's GKDTrainer
(lmbda 0, forward KL; skipped if trl is not installed), on SmolLM2-135M-Instruct -> its 15-layer student at
8,192 tokens per step (batch 8 x 1,024) by default. Same data, optimizer and seed for every case; each case is
warmed up, then the median step of the measured ones is kept.

    python scripts/gpu_benchmark.py [--sizes 8x1024] [--cases floor,chunked,fused,trl] [--out outputs/gpu_bench.json]
    python scripts/gpu_benchmark.py --device cpu --sizes 2x64 --steps 2 --cases floor,chunked   # smoke test here

Cases run in this process one after another; between cases everything is freed and the CUDA peak counter reset.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_cases import build_trainer, load_teacher, prepare  # noqa: E402


def run_case(case: str, spec: dict, prep: dict, device: str) -> dict:
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.marks.append(__import__("time").perf_counter())

    model = prep["models"]["smollm2"]
    tok = AutoTokenizer.from_pretrained(prep["tokenizer"])
    tok.pad_token = tok.pad_token or tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(model["student"], dtype=torch.float32)
    student.config.use_cache = False
    teacher = load_teacher(model["teacher"], spec["teacher_dtype"])
    blocks = load_from_disk(prep["blocks"][spec["size"]])
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="hf_kd_gpu_bench_") as out:
        trainer = build_trainer(case, spec, student, teacher, blocks, tok, os.path.join(out, "run"))
        clock = Clock()
        trainer.add_callback(clock)
        trainer.train()
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])][spec["warmup"] - 1:]
    step = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    del trainer, student, teacher
    gc.collect()
    return {"case": case, "size": spec["size"], "step_s": step, "tokens_per_s": spec["batch"] * spec["seq"] / step,
            "peak_gpu_mb": peak, "steps_measured": len(steps)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8x1024")
    p.add_argument("--cases", default="floor,chunked,fused,trl")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the student in every case")
    p.add_argument("--teacher-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--workdir", default="outputs/benchmark/work")
    p.add_argument("--out", default="outputs/gpu_bench.json")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu for a smoke test")
    cases = [c for c in a.cases.split(",") if c]
    if "trl" in cases:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("[gpu_benchmark] trl is not installed: the TRL case is skipped", flush=True)
            cases.remove("trl")
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    prep = prepare({"workdir": a.workdir, "threads": os.cpu_count(), "sizes": sizes, "models": ["smollm2"],
                    "cases": cases, "steps_total": a.warmup + a.steps + 1, "k": 32, "temperature": 2.0,
                    "synth_hidden": 896, "synth_layers": 4})
    rows = []
    for b, t in sizes:
        for case in cases:
            spec = {"batch": b, "seq": t, "size": f"{b}x{t}", "warmup": a.warmup, "steps": a.steps,
                    "temperature": 2.0, "teacher_dtype": a.teacher_dtype, "student_bf16": a.bf16, "device": a.device}
            rows.append(run_case(case, spec, prep, a.device))
            print(f"[gpu_benchmark] {rows[-1]}", flush=True)
    print("\n| size | case | tokens/s | × floor | × TRL | peak GPU MB |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        same = {x["case"]: x for x in rows if x["size"] == r["size"]}
        ratio = lambda ref: f"{r['tokens_per_s'] / same[ref]['tokens_per_s']:.2f}" if ref in same else "-"  # noqa: E731
        peak = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"| {r['size']} | {r['case']} | {r['tokens_per_s']:.0f} | {ratio('floor')} | {ratio('trl')} | {peak} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                   "args": vars(a)}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
