"""What the scripts that ask "does distillation pay?" of a classifier job share (``image_pays.py``,
``textcls_pays.py``): run a job's configs x seeds (each run one ``job.main``, reporting the distilled student and the
no-teacher arms at equal steps and, with ``--equal_time``, at equal wall time), save each run to ``--out`` as it
finishes (a rerun skips it), and print mean ± sd over seeds with the per-seed gains. Each run records the load
average around it: wall times on a shared machine are approximate, accuracies are not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from hf_kd.tools.report import machine

ARMS = {"distilled": "student_after", "no teacher, equal steps": "baseline_no_teacher",
        "no teacher, equal time": "baseline_equal_time"}


def extra_configs(names: list[str], configs: dict, few: list[str]) -> None:
    """``name=flag:value:flag:value`` in --configs adds a config over ``few`` (a search step not named in the table)."""
    for i, name in enumerate(names):
        if "=" in name:
            key, flags = name.split("=", 1)
            configs[key] = few + flags.split(":")
            names[i] = key


def run_one(job, flags: list[str], config: str, seed: int, split: str, equal_time: bool, quick: bool) -> dict:
    """One run of a classifier job (``job.main``): each arm's accuracy, steps and seconds, grad norms, curves, load."""
    with tempfile.TemporaryDirectory(prefix="hf_kd_pays_") as tmp:
        argv = flags + ["--seed", str(seed), "--eval_split", split, "--output_dir", tmp,
                                  "--equal_time", str(equal_time).lower(), "--disable_tqdm", "true"]
        load_before = os.getloadavg()
        report = job.main(argv + (["--quick"] if quick else []))
    m, curves = report["metrics"], report["heldout_curves"]["points"]
    row = {"config": config, "split": split, "seed": seed, "flags": flags, "config_used": report["config"],
           "teacher": m["teacher"]["accuracy"], "grad_norm": report["grad_norm"], "data": report["data"],
           "load_before": load_before, "load_after": os.getloadavg(), "curves": curves}
    for arm, key in ARMS.items():
        if key in m:
            row[arm] = {"accuracy": m[key]["accuracy"], "steps": m[key].get("steps", report["steps"])}
    for arm, name in zip(ARMS, curves):  # training seconds without the curves' own evaluations
        row[arm]["seconds"] = curves[name][-1]["seconds"]
        row[arm]["best_on_curve"] = max(p["accuracy"] for p in curves[name])
    return row


def summary(results: dict) -> list[dict]:
    """Per config: each arm's mean ± sd over seeds, and the distilled minus each baseline per seed (points)."""
    out, split = [], results["settings"]["split"]
    mine = [r for r in results["runs"].values() if r["split"] == split]
    for config in dict.fromkeys(r["config"] for r in mine):
        runs = sorted((r for r in mine if r["config"] == config), key=lambda r: r["seed"])
        row = {"config": config, "seeds": [r["seed"] for r in runs]}
        for arm in ARMS:
            if all(arm in r for r in runs):
                acc = [100 * r[arm]["accuracy"] for r in runs]
                row[arm] = {"mean": statistics.mean(acc), "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                            "steps": [r[arm]["steps"] for r in runs],
                            "seconds": [round(r[arm]["seconds"], 1) for r in runs]}
                if arm != "distilled":
                    row[f"gain over {arm}"] = [round(100 * (r["distilled"]["accuracy"] - r[arm]["accuracy"]), 1)
                                               for r in runs]
        out.append(row)
    return out


def markdown(results: dict) -> str:
    lines = [f"Split: {results['settings']['split']}; accuracy in %, mean ± sd over seeds; gain = distilled minus "
             "baseline, per seed, in points; seconds: training only (the curves' evaluations left out), teacher "
             "forwards included.", "",
             "| config | arm | accuracy | steps | seconds | gain per seed |", "|---|---|---|---|---|---|"]
    for row in summary(results):
        for arm in ARMS:
            if arm in row:
                a = row[arm]
                gain = ", ".join(f"{g:+.1f}" for g in row.get(f"gain over {arm}", []))
                lines.append(f"| {row['config']} | {arm} | {a['mean']:.1f} ± {a['sd']:.1f} | "
                             f"{'/'.join(map(str, a['steps']))} | {'/'.join(map(str, a['seconds']))} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None, *, job, configs: dict, few: list[str], script: str, description: str,
         default_configs: str, default_out: str) -> dict:
    """The command line of a job's script: runs each config x seed not yet in --out, saving after each run."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=default_configs)
    ap.add_argument("--equal_time", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=default_out)
    a = ap.parse_args(argv)
    names = a.configs.split(",")
    extra_configs(names, configs, few)
    results = json.load(open(a.out)) if os.path.exists(a.out) else {"runs": {}}
    results.update(settings={"split": a.split, "equal_time": a.equal_time, "quick": a.quick}, machine=machine(),
                   command="python " + " ".join([script, *(sys.argv[1:] if argv is None else argv)]))
    for config in names:
        for seed in map(int, a.seeds.split(",")):
            key = f"{config}/{a.split}/seed{seed}"
            if key not in results["runs"]:
                results["runs"][key] = run_one(job, configs[config], config, seed, a.split, a.equal_time, a.quick)
                results["summary"] = summary(results)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(markdown(results))
    return results

