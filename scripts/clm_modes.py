"""The main job's data modes compared on the embedded default (SmolLM2-135M -> 15 layers, tales), issue 11 item 5.

    python scripts/clm_modes.py --seeds 0,1,2 --steps 30 --out results/clm_modes.json --render docs/clm_modes.md
    python scripts/clm_modes.py --quick --seeds 0 --out /tmp/q.json          # a tiny smoke run
    python scripts/clm_modes.py --render_only --out results/clm_modes.json --render docs/clm_modes.md

For each seed, from the same initial student as `hf-kd distill` builds:
- ``baseline``: no teacher, the task loss alone, ``--steps`` steps;
- ``supervised`` / ``sequence_level`` / ``on_policy``: the job's distillation in each data mode, ``--steps`` steps
  (equal steps), then again with the steps that fit in the baseline's wall time (equal wall time: steps =
  steps x baseline seconds / mode seconds, the mode's seconds counting the teacher's generations and the student's).
``on_policy`` uses ``alpha_task=0``: a task loss on the student's own samples would teach it its own text.
Each run's seconds are the trainer's construction (sequence_level generates there, into a fresh folder) plus its
training. Metrics on held-out tales: perplexity, KL(teacher || student) and top-1 agreement (``hf_kd.tools.report.
evaluate``), and on the student's sampled continuations (T=1) of held-out prompts the teacher's NLL per token and
the distinct-2 ratio. Runs are saved to --out as they finish: a rerun skips them (resume). The whole 3-seed
comparison takes about 1 h 45 min on a 2-core CPU; nothing else should run meanwhile (the step counts come from
wall times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from hf_kd import DistillationTrainer
from hf_kd.modes.experiment import baseline_args, train
from hf_kd.data.generation import GenerationSettings, eos_ids_of, generate_completions
from hf_kd.data.prompts import pad_id_of
from hf_kd.tools.report import evaluate, machine
from hf_kd_recipes.distill_clm import DEFAULTS, QUICK, TASK, CausalLMJob, prepare, training_rows
from hf_kd_recipes.job_args import parse

MODES = ("baseline", "supervised", "sequence_level", "on_policy")
PER_MODE = {"on_policy": ["--alpha_task", "0"]}


@torch.no_grad()
def continuations(student, teacher, prompts: list[list[int]], tok, max_new_tokens: int, seed: int) -> dict:
    """The student's sampled continuations of ``prompts``: the teacher's mean NLL per continuation token and the
    mean distinct-2 ratio (distinct bigrams / bigrams of a continuation; 1 = no repeated pair)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0)
    texts = generate_completions(student, prompts, settings, pad_id_of(tok), eos_ids_of(student, tok), seed)
    nll, tokens, distinct = 0.0, 0, []
    for prompt, text in zip(prompts, texts):
        if not text:
            continue
        logits = teacher(input_ids=torch.tensor([prompt + text]), use_cache=False).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(text),
                                                 reduction="sum").item()
        tokens += len(text)
        if len(text) > 1:
            distinct.append(len(set(zip(text, text[1:]))) / (len(text) - 1))
    return {"continuation_teacher_nll": nll / max(tokens, 1), "distinct_2": statistics.mean(distinct or [0.0]),
            "continuation_tokens": tokens}


def run_one(p, mode: str, steps: int, seed: int, quick: bool, prompts: list[list[int]], max_new: int) -> dict:
    """Train a fresh copy of the initial student in ``mode`` for ``steps`` steps; its seconds and metrics."""
    with tempfile.TemporaryDirectory(prefix="hf_kd_modes_") as tmp:
        argv = (["--quick"] if quick else []) + ["--seed", str(seed), "--max_steps", str(steps), "--output_dir", tmp,
                                                 "--save_strategy", "no", "--disable_tqdm", "true",
                                                 "--max_new_tokens", str(max_new)]
        argv += ["--data_mode", "supervised" if mode == "baseline" else mode] + PER_MODE.get(mode, [])
        job, args = parse(CausalLMJob, argv + ["--generation_cache_dir", os.path.join(tmp, "generations")],
                          DEFAULTS, QUICK)
        if mode == "baseline":
            args = baseline_args(args, tmp)
        student, load = p.new_student(), os.getloadavg()[0]
        start = time.perf_counter()
        trainer = DistillationTrainer(model=student, teacher_model=p.teacher,
                                      args=args, train_dataset=training_rows(p.train_blocks, job, args),
                                      processing_class=p.tok)
        setup = time.perf_counter() - start
        seconds = setup + train(trainer)
        generating = setup if mode == "sequence_level" else sum(
            h.get("generation_seconds", 0.0) for h in trainer.state.log_history)
        row = {"mode": mode, "seed": seed, "steps": trainer.state.global_step, "seconds": seconds,
               "generation_seconds": generating, "load_before": load, "load_after": os.getloadavg()[0]}
        row.update(evaluate(student, p.eval_batches, TASK, p.teacher))
        row.update(continuations(student, p.teacher, prompts, p.tok, max_new, seed))
        return row


def equal_time_steps(steps: int, baseline_seconds: float, mode_seconds: float) -> int:
    """Steps of a mode that fit in the baseline's wall time, from the mode's seconds for ``steps`` steps."""
    return max(1, round(steps * baseline_seconds / mode_seconds))


def compare(args) -> dict:
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": {}}
    results.update(machine=machine(), command="python " + " ".join(sys.argv), cpu_count=os.cpu_count())
    argv = ["--quick"] if args.quick else []
    job, defaults = parse(CausalLMJob, argv, DEFAULTS, QUICK)
    p = prepare(job, 0)  # the recipe's teacher, data and initial student (layer choice does not depend on the seed)
    steps = args.steps or defaults.max_steps
    prompts = [block[:job.prompt_tokens] for block in p.held["input_ids"][:args.prompts]]
    max_new = args.max_new_tokens
    settings = {"steps": steps, "max_new_tokens": max_new, "prompts": len(prompts), "quick": args.quick}
    if results.setdefault("settings", settings) != settings:
        raise ValueError(f"{args.out} holds runs with other settings ({results['settings']}): use another --out")
    for mode in ("baseline", "supervised"):  # warm-up, not recorded: the first run of a process pays one-time costs
        run_one(p, mode, 2, 0, args.quick, prompts[:2], max_new)

    def once(key: str, mode: str, n: int, seed: int) -> dict:
        if key not in results["runs"]:
            print(f"--- {key}: {mode}, {n} steps", flush=True)
            results["runs"][key] = run_one(p, mode, n, seed, args.quick, prompts, max_new)
            with open(args.out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
            print(json.dumps(results["runs"][key]), flush=True)
        return results["runs"][key]

    modes = [m for m in args.modes.split(",") if m != "baseline"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = once(f"seed{seed}/baseline/equal_steps", "baseline", steps, seed)
        timed = {m: once(f"seed{seed}/{m}/equal_steps", m, steps, seed) for m in modes}
        for m in modes:
            once(f"seed{seed}/{m}/equal_time", m, equal_time_steps(steps, base["seconds"], timed[m]["seconds"]), seed)
    return results


METRICS = (("perplexity", "held-out perplexity", False), ("teacher_kl", "KL(teacher‖student)", False),
           ("continuation_teacher_nll", "teacher NLL of continuations", False), ("distinct_2", "distinct-2", True))


def summarise(results: dict) -> list[dict]:
    """One row per (mode, budget) with mean ± std over seeds and the per-seed difference to the baseline."""
    runs = results["runs"]
    groups: dict[tuple, list] = {}
    for key, row in runs.items():
        _, mode, budget = key.split("/")
        groups.setdefault((mode, budget), []).append(row)
    base = {r["seed"]: r for r in groups.get(("baseline", "equal_steps"), [])}
    rows = []
    for (mode, budget), group in sorted(groups.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])):
        row = {"mode": mode, "budget": budget, "seeds": [r["seed"] for r in group],
               "steps": [r["steps"] for r in group], "seconds": [round(r["seconds"], 1) for r in group],
               "generation_share": statistics.mean(r["generation_seconds"] / r["seconds"] for r in group)}
        for key, _, _ in METRICS:
            values = [r[key] for r in group]
            row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        row["ppl_minus_baseline"] = [r["perplexity"] - base[r["seed"]]["perplexity"] for r in group
                                     if r["seed"] in base]
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`.", "",
             "| mode | budget | steps | train s | generating | " + " | ".join(m[1] for m in METRICS)
             + " | perplexity − baseline, per seed |", "|---" * (6 + len(METRICS)) + "|"]
    for r in summarise(results):
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if k != "perplexity" else f"{r[k][0]:.2f} ± {r[k][1]:.2f}"
                 for k, _, _ in METRICS]
        diff = ", ".join(f"{d:+.2f}" for d in r["ppl_minus_baseline"]) if r["mode"] != "baseline" else "-"
        lines.append(f"| {r['mode']} | {r['budget'].replace('_', ' ')} | {'/'.join(map(str, r['steps']))} | "
                     f"{statistics.mean(r['seconds']):.0f} | {100 * r['generation_share']:.0f}% | "
                     + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """Held-out perplexity against training seconds, one point per run, one colour per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        for budget, marker in (("equal_steps", "o"), ("equal_time", "s")):
            pts = [(r["seconds"], r["perplexity"]) for k, r in results["runs"].items() if f"/{mode}/{budget}" in k]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=f"{mode} ({budget.replace('_', ' ')})")
    ax.set_xlabel("training seconds (incl. generation)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--steps", type=int, default=0, help="Equal-steps budget (0 = the job's max_steps).")
    parser.add_argument("--prompts", type=int, default=32, help="Held-out prompts continued by each student.")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Tokens generated after each prompt, in "
                        "training (sequence_level, on_policy) and for the continuation metrics.")
    parser.add_argument("--out", default="results/clm_modes.json")
    parser.add_argument("--render", default=None, help="Also write the Markdown table (and a .png beside it).")
    parser.add_argument("--quick", action="store_true", help="The recipe's --quick sizes (a smoke test).")
    parser.add_argument("--render_only", action="store_true", help="Render --out's runs without training.")
    args = parser.parse_args(argv)
    results = json.load(open(args.out)) if args.render_only else compare(args)
    table = markdown(results)
    print(table)
    if args.render:
        image = os.path.splitext(args.render)[0] + ".png"
        plot(results, image)
        with open(args.render, "w") as f:
            f.write(f"# The main job's data modes, measured\n\n{table}\n![held-out perplexity against training "
                    f"seconds, every run]({os.path.basename(image)})\n")
    return results


if __name__ == "__main__":
    main()
