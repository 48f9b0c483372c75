"""Does distillation pay on the image job with few labels? The distilled student against the same student trained
without the teacher on the labelled digits alone, at equal steps and at equal wall time (the teacher's forwards
counted), settings chosen on the validation split, the final table on the test split (issue 18).

    python scripts/image_pays.py --split validation --seeds 0 --configs few,few_a0.3 \
        --out results/image_few_labels_validation.json                                # the search (a log of runs)
    python scripts/image_pays.py --split test --seeds 0,1,2 --configs few,full --equal_time \
        --out results/image_pays.json                                                  # the final table
    python scripts/image_pays.py --quick --seeds 0 --configs few --equal_time --out /tmp/q.json   # smoke run

Every run is one ``distill_image.main`` (``hf-kd distill-image``): a config is the job's flags in CONFIGS (``few``:
``--labelled_images 200``, the job's validated few-label preset; ``full``: 1,000 labelled digits). ``--equal_time``:
the recipe also trains the baseline for the steps that fit in the distilled run's training seconds. Runs are saved
to --out as they finish (a rerun skips them), each with the load average around it: wall times on a shared machine
are approximate, accuracies are not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from hf_kd.tools.report import machine
from hf_kd_recipes import distill_image

FEW = ["--labelled_images", "200"]
FULL = ["--train_images", "1000", "--labelled_images", "0"]
CONFIGS = {  # name -> flags of the image job; "few*" start from the FEW_LABELS preset
    "few": FEW,
    "few_readme": FEW + ["--alpha_task", "0.5", "--kd_weight", "0.5", "--max_grad_norm", "1", "--labelled_share", "0"],
    "few_clip1": FEW + ["--max_grad_norm", "1"], "few_clip5": FEW + ["--max_grad_norm", "5"],
    "few_a0.3": FEW + ["--alpha_task", "0.3"], "few_a0.5": FEW + ["--alpha_task", "0.5"],
    "few_a0": FEW + ["--alpha_task", "0"],
    "few_share0.5": FEW + ["--labelled_share", "0.5"], "few_share0": FEW + ["--labelled_share", "0"],
    "few_t1": FEW + ["--temperature", "1"], "few_t2": FEW + ["--temperature", "2"],
    "few_kd0.5": FEW + ["--kd_weight", "0.5"], "few_kd2": FEW + ["--kd_weight", "2"],
    "few_h0": FEW + ["--hidden_weight", "0"],
    "few_lr1e-3": FEW + ["--learning_rate", "1e-3"], "few_lr4e-3": FEW + ["--learning_rate", "4e-3"],
    "few_s960": FEW + ["--max_steps", "960"], "few_s1920": FEW + ["--max_steps", "1920"],
    "few_s240": FEW + ["--max_steps", "240"],
    "few_resnet": FEW + ["--student", "resnet"],
    "full": FULL,  # today's defaults: 480 steps, alpha_task 0.5, kd_weight 0.5, T 4, max_grad_norm 1
    "full_fewpreset": FULL + ["--alpha_task", "0.1", "--kd_weight", "1", "--max_grad_norm", "0", "--max_steps", "1920",
                              "--learning_rate", "4e-3"],  # the few-label validated loss and optimiser settings
}
ARMS = {"distilled": "student_after", "no teacher, equal steps": "baseline_no_teacher",
        "no teacher, equal time": "baseline_equal_time"}


def extra_configs(names: list[str]) -> None:
    """``name=flag:value:flag:value`` in --configs adds a config over FEW (a search step not named above)."""
    for i, name in enumerate(names):
        if "=" in name:
            key, flags = name.split("=", 1)
            CONFIGS[key] = FEW + flags.split(":")
            names[i] = key


def run_one(config: str, seed: int, split: str, equal_time: bool, quick: bool) -> dict:
    """One run of the image job: both arms' accuracy, steps and seconds, grad norms, curves, load around it."""
    with tempfile.TemporaryDirectory(prefix="hf_kd_image_pays_") as tmp:
        argv = CONFIGS[config] + ["--seed", str(seed), "--eval_split", split, "--output_dir", tmp,
                                  "--equal_time", str(equal_time).lower(), "--disable_tqdm", "true"]
        load_before = os.getloadavg()
        report = distill_image.main(argv + (["--quick"] if quick else []))
    m, curves = report["metrics"], report["heldout_curves"]["points"]
    row = {"config": config, "split": split, "seed": seed, "flags": CONFIGS[config], "config_used": report["config"],
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="few,full")
    ap.add_argument("--equal_time", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/image_pays.json")
    a = ap.parse_args(argv)
    names = a.configs.split(",")
    extra_configs(names)
    results = json.load(open(a.out)) if os.path.exists(a.out) else {"runs": {}}
    results.update(settings={"split": a.split, "equal_time": a.equal_time, "quick": a.quick}, machine=machine(),
                   command="python " + " ".join(["scripts/image_pays.py", *(sys.argv[1:] if argv is None else argv)]))
    for config in names:
        for seed in map(int, a.seeds.split(",")):
            key = f"{config}/{a.split}/seed{seed}"
            if key not in results["runs"]:
                results["runs"][key] = run_one(config, seed, a.split, a.equal_time, a.quick)
                results["summary"] = summary(results)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
