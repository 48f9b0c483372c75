"""Run a recipe for several seeds and report mean ± std of every model's held-out metric.

    python scripts/seeds.py recipes/distill_image.py --config recipes/configs/image_mnist.yaml \
        --out outputs/seeds/image_vit [--seeds 0 1 2] [any other flag is passed to the recipe]

Each seed runs as its own process (``python RECIPE ... --seed S --output_dir OUT/seed_S``); an existing
OUT/seed_S/report.json is reused unless --rerun. Prints a Markdown table (teacher, student before, student after,
no-teacher baseline, and the per-seed difference KD - baseline) and writes OUT/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRIMARY = {"masked_lm": ("accuracy", True), "classification": ("accuracy", True),
           "causal_lm": ("perplexity", False), "encoder": ("embedding_cosine", True)}
ROWS = (("teacher", "teacher"), ("student_before", "student before"), ("student_after", "student after (KD)"),
        ("baseline_no_teacher", "baseline (no teacher)"))


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def summarise(reports: dict[int, dict]) -> dict:
    task = next(iter(reports.values()))["task"]
    metric, higher = PRIMARY[task]
    keys = sorted({k for r in reports.values() for m in r["metrics"].values() for k in m
                   if k in (metric, "teacher_agreement", "nn_agreement")}, key=lambda k: k != metric)
    table = {}
    for key, _ in ROWS:
        table[key] = {k: [r["metrics"][key][k] for r in reports.values() if k in r["metrics"].get(key, {})]
                      for k in keys}
    diff = [r["metrics"]["student_after"][metric] - r["metrics"]["baseline_no_teacher"][metric]
            for r in reports.values() if "baseline_no_teacher" in r["metrics"]]
    return {"task": task, "metric": metric, "higher_is_better": higher, "seeds": sorted(reports), "columns": keys,
            "values": table, "kd_minus_baseline": diff,
            "train_seconds": {k: [r["train_seconds"][k] for r in reports.values() if k in r["train_seconds"]]
                              for k in ("distillation", "baseline")},
            "compression_ratio": next(iter(reports.values()))["compression_ratio"],
            "speedup": [r["speedup"] for r in reports.values()]}


def markdown(summary: dict) -> str:
    cols = summary["columns"]
    lines = [f"{summary['task']}: {summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} is "
             f"better), seeds {summary['seeds']}, mean ± std", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in ROWS:
        row = summary["values"][key]
        if any(row.values()):
            lines.append(f"| {label} | " + " | ".join(mean_std(row[c]) for c in cols) + " |")
    if summary["kd_minus_baseline"]:
        d = summary["kd_minus_baseline"]
        lines.append(f"| KD - baseline ({summary['metric']}, per seed: {', '.join(f'{x:+.4f}' for x in d)}) | "
                     f"{mean_std(d)} |" + " |" * (len(cols) - 1))
    secs = {k: mean_std(v).replace(".0000", "") for k, v in summary["train_seconds"].items() if v}
    lines += ["", f"compression {summary['compression_ratio']:.2f}x, speedup {mean_std(summary['speedup'])}x, "
              f"train seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True, help="Folder for the per-seed runs and seeds.json.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rerun", action="store_true", help="Run seeds whose report.json already exists again.")
    opts, passthrough = parser.parse_known_args(argv)
    reports = {}
    for seed in opts.seeds:
        out = os.path.join(opts.out, f"seed_{seed}")
        path = os.path.join(out, "report.json")
        if opts.rerun or not os.path.isfile(path):
            cmd = [sys.executable, opts.recipe, *passthrough, "--seed", str(seed), "--output_dir", out]
            print("$ " + " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        with open(path) as f:
            reports[seed] = json.load(f)
    summary = summarise(reports)
    summary["command"] = " ".join([opts.recipe, *passthrough])
    summary["markdown"] = markdown(summary)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "seeds.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(summary["markdown"])
    return summary


if __name__ == "__main__":
    main()
