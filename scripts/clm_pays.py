"""Does distillation pay on the main job? The distilled student against the same student trained without the
teacher, at equal steps and at equal wall time (the teacher's cost counted: a cache's build once), settings chosen
on validation documents, the final comparison on test documents (issue 18).

    python scripts/clm_pays.py --split validation --seeds 0 --configs base,kd_t1,kd_only_t1,base_lr5e-4,kd_t1_lr5e-4 \
        --out results/clm_pays_validation.json
    python scripts/clm_pays.py --split test --seeds 0,1,2 --configs base,kd_t1 --calibrate --equal_time \
        --out results/clm_pays_test.json --render docs/clm_pays.md
    python scripts/clm_pays.py --quick --seeds 0 --configs base,kd_t1 --calibrate --equal_time --out /tmp/q.json

Every run starts from the job's own initial student (``hf_kd_recipes.distill_clm.prepare``) on the job's training
blocks, with its held-out curve (every --every steps, against steps and seconds). A config is the job's defaults
plus the flags in CONFIGS. ``--calibrate`` measures each config's seconds per step and the cache's build time back
to back in one quiet window (nothing else running); ``--equal_time`` then trains the baseline again for the steps
that cost what the distilled run cost (cache build included), so both arms get the same compute. Runs are saved to
--out as they finish (a rerun resumes); the runs' own seconds are recorded with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from hf_kd import DistillationTrainer
from hf_kd.tools.curves import HeldOutCurve, plot_curves
from hf_kd.modes.experiment import baseline_args, train
from hf_kd.tools.report import evaluate, machine
from hf_kd.teachers.cache import load_teacher_cache
from hf_kd_recipes.distill_clm import DEFAULTS, QUICK, TASK, CausalLMJob, prepare, teacher_source
from hf_kd_recipes.job_args import parse

CONFIGS = {  # name -> flags over the job's defaults; names starting with "base" train without a teacher
    "base": [], "base_lr5e-4": ["--learning_rate", "5e-4"],
    "kd_t1": ["--temperature", "1", "--alpha_task", "1", "--kd_weight", "1", "--hidden_weight", "0"],
    "kd_t2": ["--temperature", "2", "--alpha_task", "1", "--kd_weight", "1", "--hidden_weight", "0"],
    "kd_only_t1": ["--temperature", "1", "--alpha_task", "0", "--kd_weight", "1", "--hidden_weight", "0"],
    "kd_t1_lr5e-4": ["--temperature", "1", "--alpha_task", "1", "--kd_weight", "1", "--hidden_weight", "0",
                     "--learning_rate", "5e-4"],
}


def run_one(p, config: str, seed: int, steps: int, common: list[str], every: int) -> dict:
    """Train a fresh copy of the initial student under ``config`` for ``steps`` steps: seconds, metrics, curve."""
    with tempfile.TemporaryDirectory(prefix="hf_kd_pays_") as tmp:
        argv = common + ["--seed", str(seed), "--max_steps", str(steps), "--output_dir", tmp, "--save_strategy", "no",
                         "--disable_tqdm", "true"] + CONFIGS[config]
        job, args = parse(CausalLMJob, argv, DEFAULTS, QUICK)
        costs, kw, cpu_costs = {}, {}, 0.0
        if config.startswith("base"):
            args = baseline_args(args, tmp)
        else:
            args, costs = teacher_source(p, job, args, p.train_blocks)
            cpu_costs = load_teacher_cache(args.teacher_cache)[1].get("build_cpu_seconds", 0.0)
            kw = {"teacher_model": p.teacher} if args.teacher_cache is None else {}
        curve = HeldOutCurve(p.eval_batches, TASK, every=every, at_start=True, offset_seconds=sum(costs.values()))
        load = os.getloadavg()[0]
        trainer = DistillationTrainer(model=p.new_student(), args=args, processing_class=p.tok, callbacks=[curve],
                                      train_dataset=None if args.teacher_cache else p.train_blocks, **kw)
        cpu = time.process_time()
        seconds = train(trainer) + sum(costs.values())
        cpu = time.process_time() - cpu - curve.cpu_in_evaluation + cpu_costs  # the curve's evaluations left out
        row = {"config": config, "seed": seed, "steps": trainer.state.global_step, "seconds": seconds, "costs": costs,
               "cpu_seconds": cpu, "cpu_costs": cpu_costs,
               "load_before": load, "load_after": os.getloadavg()[0], "curve": curve.points,
               "grad_norm_max": max((h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h),
                                    default=None)}
        row.update(evaluate(trainer.model, p.eval_batches, TASK, p.teacher))
        return row


def calibrate(p, common: list[str], configs: list[str], steps: int = 8, rounds: int = 2) -> dict:
    """Seconds per step of each config and the cache's build time, measured back to back in one window (the
    equal-time step counts come from these, not from runs that other work may have slowed). The first round warms
    up and is dropped; the cache is rebuilt in a temporary folder so its build is timed here too."""
    per_step = {c: [] for c in configs}
    for r in range(rounds + 1):
        for c in configs:
            row = run_one(p, c, 0, steps, common, every=10 ** 6)
            if r:
                per_step[c].append((row["seconds"] - sum(row["costs"].values())) / row["steps"])
    from hf_kd.teachers.cache import reusable_cache
    job, args = parse(CausalLMJob, common, DEFAULTS, QUICK)
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        _, meta = reusable_cache(p.teacher, p.train_blocks, teacher_name=job.teacher, k=job.cache_k,
                                 temperature=1.0, batch_size=args.per_device_train_batch_size, root=tmp)
    return {"seconds_per_step": {c: statistics.median(v) for c, v in per_step.items()},
            "cache_build_seconds": meta["build_seconds"], "load": [load, os.getloadavg()[0]]}


def equal_time_steps(steps: int, calibration: dict, base: str, config: str) -> int:
    """Baseline steps that cost what ``config``'s ``steps`` steps and its cache build cost (calibrated seconds)."""
    per = calibration["seconds_per_step"]
    cost = steps * per[config] + (0.0 if config.startswith("base") else calibration["cache_build_seconds"])
    return max(1, round(cost / per[base]))


def compare(args) -> dict:
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": {}}
    results.update(machine=machine(), command="python " + " ".join(sys.argv), cpu_count=os.cpu_count())
    common = (["--quick"] if args.quick else []) + ["--eval_split", args.split]
    job, defaults = parse(CausalLMJob, common, DEFAULTS, QUICK)
    steps = args.steps or defaults.max_steps
    settings = {"steps": steps, "split": args.split, "quick": args.quick, "train_blocks": job.train_blocks}
    if results.setdefault("settings", settings) != settings:
        raise ValueError(f"{args.out} holds runs with other settings ({results['settings']}): use another --out")
    configs = args.configs.split(",")
    for seed in [int(s) for s in args.seeds.split(",")]:
        p = None

        def once(key: str, config: str, n: int) -> dict:
            nonlocal p
            if key not in results["runs"]:
                p = p or prepare(job, seed)
                print(f"--- {key}: {config}, {n} steps", flush=True)
                results["runs"][key] = run_one(p, config, seed, n, common, args.every)
                with open(args.out + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
                row = results["runs"][key]
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            return results["runs"][key]

        rows = {c: once(f"{c}/seed{seed}", c, steps) for c in configs}
        if args.calibrate and "calibration" not in results:
            p = p or prepare(job, seed)
            results["calibration"] = calibrate(p, common, configs)
            print(json.dumps(results["calibration"]), flush=True)
        if args.equal_time:  # the baseline given each distilled config's compute (cache build included)
            base = next(c for c in configs if c.startswith("base"))
            for c in configs:
                if not c.startswith("base"):
                    n = equal_time_steps(steps, results["calibration"], base, c) if "calibration" in results else \
                        max(1, round(steps * rows[c]["cpu_seconds"] / rows[base]["cpu_seconds"]))
                    once(f"{base}@time_of_{c}/seed{seed}", base, n)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return results


def _stats(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def markdown(results: dict) -> str:
    """Per config: held-out perplexity and KL to the teacher (mean ± sd over seeds), steps, seconds, and each
    seed's difference from the baseline of the same budget."""
    runs = results["runs"]
    groups: dict[str, list[dict]] = {}
    for key, row in runs.items():
        groups.setdefault(key.split("/")[0], []).append(row)
    base = next((g for g in groups if g.startswith("base") and "@" not in g), None)
    lines = [f"Split: {results['settings']['split']}; {results['settings']['steps']} steps; machine: "
             f"{results['machine']}.", "",
             "| run | seeds | perplexity | KL(teacher ‖ student) | steps | seconds (teacher costs in) | "
             "per-seed perplexity - baseline's at equal steps | max load |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        ref = {r["seed"]: r["perplexity"] for r in groups.get(base, [])}
        diff = ", ".join(f"{r['perplexity'] - ref[r['seed']]:+.2f}" for r in rows if r["seed"] in ref) \
            if name != base else "-"
        lines.append(f"| {name} | {len(rows)} | {_stats([r['perplexity'] for r in rows])} | "
                     f"{_stats([r['teacher_kl'] for r in rows])} | {rows[0]['steps']} | "
                     f"{_stats([r['seconds'] for r in rows])} | {diff} | "
                     f"{max(max(r['load_before'], r['load_after']) for r in rows):.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str | None:
    """Seed 0's curves of every run: held-out perplexity against steps and seconds."""
    curves = {k.split("/")[0]: r["curve"] for k, r in results["runs"].items() if r["seed"] == 0}
    return plot_curves(curves, path, "perplexity")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default="base,kd_t1", help="Comma-separated names of " + ", ".join(CONFIGS))
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--steps", type=int, default=0, help="Equal-steps budget (0 = the job's max_steps).")
    parser.add_argument("--every", type=int, default=10, help="Held-out curve every N steps.")
    parser.add_argument("--calibrate", action="store_true", help="Measure seconds per step and the cache build back "
                        "to back (run it on a quiet machine; kept in --out).")
    parser.add_argument("--equal_time", action="store_true", help="Also the baseline given each config's compute: "
                        "the calibrated seconds if --out holds a calibration, else the same seed's runs' process CPU "
                        "seconds (cache build included; less sensitive than wall time to other jobs).")
    parser.add_argument("--out", default="results/clm_pays.json")
    parser.add_argument("--render", default=None, help="Also write the Markdown table (and a .png beside it).")
    parser.add_argument("--quick", action="store_true", help="The recipe's --quick sizes (a smoke test).")
    parser.add_argument("--render_only", action="store_true", help="Render --out's runs without training.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = json.load(open(args.out)) if args.render_only else compare(args)
    table = markdown(results)
    print(table, f"\n{time.perf_counter() - start:.0f} s")
    if args.render:
        image = os.path.splitext(args.render)[0] + ".png"
        plot(results, image)
        with open(args.render, "w") as f:
            f.write(f"# Does distillation pay on the main job?\n\n{table}\n![held-out perplexity of seed 0's runs "
                    f"against steps and seconds]({os.path.basename(image)})\n")
    return results


if __name__ == "__main__":
    main()
