"""docs/methods.md from the rows of scripts/methods.py (results/methods.json): tables per student, the regression
set, the weight pilot, the commands, the machine and its load, and one line of interpretation per method."""

from __future__ import annotations

import statistics

ORDER = ("baseline", "kd", "hidden", "hints", "hints_norm", "hints_stage", "at", "attention", "kd_eager", "relation",
         "input_grad", "great", "multiview", "baseline_multiview", "multi_teacher", "multi_confidence",
         "kd_resnet_teacher", "route", "progressive", "born_again", "mutual", "self_distill", "chain")
LABELS = {
    "baseline": "no teacher (task loss alone)", "kd": "plain KD (logits)", "hidden": "KD + hidden states (cosine)",
    "hints": "KD + FitNets hints (MSE)", "hints_norm": "KD + hints, normalised", "hints_stage": "KD + hints, 2 stages",
    "at": "KD + spatial attention transfer", "attention": "KD + attention probabilities (KL)",
    "kd_eager": "plain KD, eager attention", "relation": "KD + similarity preserving",
    "input_grad": "KD + input gradients (Sobolev)", "great": "KD + GREAT", "multiview": "KD + 2 shifted views",
    "baseline_multiview": "no teacher, 2 shifted views",
    # the training modes (scripts/methods_modes.py)
    "multi_teacher": "KD from 2 teachers (ViT + ResNet, equal weights)",
    "multi_confidence": "KD from 2 teachers, weighted by confidence", "kd_resnet_teacher":
    "plain KD from the ResNet teacher alone", "route": "KD along the teacher's route (RCO, 3 snapshots)",
    "mutual": "mutual learning with 1 peer, no teacher", "self_distill": "self-distillation (exit after layer 1), "
    "no teacher", "progressive": "KD + hidden states, progressive stages",
    "born_again": "born-again generation 2 (generation 0: no teacher)", "chain": "teacher -> assistant -> student",
}
WEIGHTS = ("hidden_weight", "hint_weight", "at_weight", "attention_weight", "relation_weight", "input_grad_weight",
           "great_weight")
from methods_notes import NOTES  # noqa: E402  (the hand-written notes, one per student and method)


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def signed(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:+.{digits}f}" for v in values) + f" (mean {statistics.mean(values):+.{digits}f})"


def term(row: dict) -> str:
    f = row.get("fields", {})
    parts = [f"{k.replace('_weight', '')} {f[k]:g}" for k in WEIGHTS if f.get(k)]
    if f.get("hint_normalize"):
        parts.append("normalised")
    if f.get("hint_first_stage"):
        parts.append(f"first stage {f['hint_first_stage']:g}")
    if f.get("kd_loss") == "mse":
        parts.append("kd_loss mse")
    return ", ".join(parts) or "-"


def grouped(doc: dict, split: str, steps: int | None = None) -> dict:
    """{student: {method: {seed: row}}} of the rows of one split (and step count)."""
    out: dict = {}
    for row in doc["rows"].values():
        if row["split"] == split and (steps is None or row["steps"] == steps):
            out.setdefault(row["student"], {}).setdefault(row["method"], {})[row["seed"]] = row
    return out


def paired(rows: dict, ref: dict | None, key: str) -> list[float]:
    return [rows[s][key] - ref[s][key] for s in sorted(rows)
            if ref and s in ref and key in rows[s] and key in ref[s]]


REFERENCE = {"baseline_multiview": ("baseline", "no teacher"), "reg_kd": ("reg_baseline", "no teacher"),
             "kd": ("baseline", "no teacher"), "mutual": ("baseline", "no teacher"),
             "self_distill": ("baseline", "no teacher"), "born_again": ("baseline", "no teacher"),
             "chain": ("kd", "plain KD at the same total steps")}  # what a method is judged against (default: plain KD)


def verdict(diffs: list[float], ref: str, digits: int = 3) -> str:
    """Per-seed differences to the reference -> a few words (differences under 0.5e-3 count as ties)."""
    if not diffs:
        return f"not compared with {ref}"
    m = statistics.mean(diffs)
    if all(d > 5e-4 for d in diffs):
        return f"better than {ref} on every seed (mean {m:+.{digits}f})"
    if all(d < -5e-4 for d in diffs):
        return f"worse than {ref} on every seed (mean {m:+.{digits}f})"
    return (f"no consistent difference from {ref} (per seed {min(diffs):+.{digits}f} to {max(diffs):+.{digits}f}, "
            f"mean {m:+.{digits}f})")


STUDENTS = {"resnet": "ResNet", "vit": "ViT",
            "tiny": "ViT-tiny (capacity gap: the chain's student, no-teacher and KD rows at the chain's total steps)"}


MODE_NAMES = ("multi_teacher", "multi_confidence", "kd_resnet_teacher", "route", "progressive", "born_again", "mutual",
              "self_distill", "chain")
MODES_SETUP = (
    "Training modes (rows made by `scripts/methods_modes.py` through the same script, same students, data, seeds "
    "and steps): **two teachers** that really differ, the ViT teacher and a ResNet teacher (basic blocks, widths "
    "32/64/128, 312K parameters, trained 15 epochs on the same 3,500 digits by the same schedule: 98.2% on the "
    "validation digits against the ViT's 90.4%; cached as mnist-resnet-teacher), "
    "mixed with equal weights or per example by each teacher's probability of the true label, against plain KD "
    "from either teacher alone; the **route** (RCO): the ViT teacher recipe's snapshots after epochs 2 and 6 and "
    "its final weights, one third of training each; **progressive**: the ViT student's hidden-state pairs "
    "switched on stage by stage (weight 10, the 'hidden' row's), the logit terms in the last stage; **born-again**: "
    "generation 0 is the student trained on the labels alone, generations 1 and 2 (same architecture and initial "
    "weights) each learn from the one before, every generation the full steps (so generation 2 has seen 3x the "
    "steps); **mutual learning**: no teacher, the student and one peer of its architecture (other initial weights, "
    "same optimizer settings) at T = 1 as in DML; **self-distillation**: no teacher, an exit after the first "
    "layer/stage learns the labels and T² KL (T = 3) to the model's own output. The **chain** is shown where the "
    "seeds say it helps, a teacher much larger than the student: the ViT teacher (145K parameters) -> an "
    "assistant -> a one-layer ViT of width 16 (5K parameters); the chained student has the steps of its own "
    "stage, the assistant's stage came first; its no-teacher and plain-KD rows train for both stages' steps. "
    "'train s' is the wall time of training (all stages for born-again and the chain, both models for mutual "
    "learning), not of evaluation.")


def mode_details(method: str, rows: dict) -> str:
    """What a mode's row holds beyond the student's accuracy: the peer and the best model, each generation,
    the assistant."""
    if not rows:
        return ""
    seeds = sorted(rows)
    if method == "mutual" and all("best_accuracy" in rows[s] for s in seeds):
        best = [rows[s]["best_model"] for s in seeds]
        return (f"; the best of student and peer (what a run reports): {mean_std([rows[s]['best_accuracy'] for s in seeds], 3)}"
                f", the peer {mean_std([rows[s]['models']['peer_0'] for s in seeds], 3)} (best per seed: {best})")
    stages = [rows[s].get("stages") for s in seeds]
    if method == "born_again" and all(stages):
        return "; " + ", ".join(f"generation {g}: {mean_std([st[f'generation_{g}'] for st in stages], 3)}"
                                for g in range(3))
    if method == "chain" and all(stages):
        st = stages[0]
        return (f"; assistant ({st['assistant_parameters']:,} parameters: the teacher's first layers, sized by the "
                f"geometric mean of {st['teacher_parameters']:,} and {st['student_parameters']:,}) "
                f"{mean_std([x['assistant'] for x in stages], 3)} after its stage")
    return ""


def timing_cell(row: dict | None) -> str:
    if not row or "error" in row:
        return "-"
    return f"{row['ratio']:.2f} ({min(row['ratios']):.2f}-{max(row['ratios']):.2f})"


def class_table(student: str, methods: dict, timing: dict) -> list[str]:
    kd, base = methods.get("kd"), methods.get("baseline")
    lines = ["| method | added term (weight) | test accuracy | method − plain KD, per seed (mean) | method − no "
             "teacher, per seed (mean) | s/step | train s | × KD, same run | × KD, interleaved | load (1-min) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for method in sorted(methods, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        rows = methods[method]
        ok = {s: r for s, r in rows.items() if "error" not in r}
        if not ok:
            err = next(iter(rows.values()))["error"]
            lines.append(f"| {LABELS.get(method, method)} | - | not run: `{err[:160]}` | | | | | | | |")
            continue
        seeds = sorted(ok)
        acc = [ok[s]["accuracy"] for s in seeds]
        d_kd = paired(ok, kd, "accuracy") if method != "kd" else []
        d_base = paired(ok, base, "accuracy") if method != "baseline" else []
        step = statistics.mean(ok[s]["step_seconds"] for s in seeds)
        ratios = [ok[s]["step_seconds"] / kd[s]["step_seconds"] for s in seeds if kd and s in kd]
        other = any(kd and s in kd and kd[s]["process"] != ok[s]["process"] for s in seeds)
        loads = [ok[s]["load_mean"] for s in seeds]
        ratio = f"{statistics.mean(ratios):.2f}{'†' if other else ''}" if ratios else "-"
        lines.append(f"| {LABELS.get(method, method)} | {term(ok[seeds[0]])} | {mean_std(acc)} (seeds {seeds}) | "
                     f"{signed(d_kd) if d_kd else '-'} | {signed(d_base) if d_base else '-'} | {step:.4f} | "
                     f"{statistics.mean(ok[s]['train_seconds'] for s in seeds):.0f} | "
                     f"{ratio} | {timing_cell(timing.get((student, method)))} | {min(loads):.1f}-{max(loads):.1f} |")
    return lines


def regression_table(methods: dict, timing: dict) -> list[str]:
    base = methods.get("reg_baseline")
    lines = ["| model | test MSE (standardised thickness) | test R² | R² − no teacher, per seed (mean) | s/step | "
             "× no teacher, interleaved |", "|---|---|---|---|---:|---:|"]
    teacher = next((r for rows in methods.values() for r in rows.values() if "teacher_mse" in r), None)
    if teacher:
        lines.append(f"| teacher: ViT, 3,500 digits | {teacher['teacher_mse']:.4f} | {teacher['teacher_r2']:.4f} "
                     "| - | - | - |")
    for method, label in (("reg_baseline", "ResNet, no teacher (MSE on the target)"),
                          ("reg_kd", "ResNet, + output matching ‖y_T − y_S‖² (kd_loss mse)")):
        ok = {s: r for s, r in methods.get(method, {}).items() if "error" not in r}
        if not ok:
            continue
        d = paired(ok, base, "r2") if method != "reg_baseline" else []
        lines.append(f"| {label} | {mean_std([r['mse'] for r in ok.values()])} | "
                     f"{mean_std([r['r2'] for r in ok.values()])} | {signed(d) if d else '-'} | "
                     f"{statistics.mean(r['step_seconds'] for r in ok.values()):.4f} | "
                     f"{timing_cell(timing.get(('resnet', method)))} |")
    return lines


def chosen_weights(doc: dict) -> dict:
    """{(student, method): weight} used by the test-split rows."""
    out = {}
    for r in doc["rows"].values():
        w = [v for k, v in r.get("fields", {}).items() if k in WEIGHTS]
        if r["split"] == "test" and w:
            out[(r["student"], r["method"])] = w[0]
    return out


def pilot_table(pilot: dict, chosen: dict | None = None) -> list[str]:
    lines = ["| student | method | weight: validation accuracy (seed 0) |", "|---|---|---|"]
    for student, methods in sorted(grouped(pilot, "validation").items()):
        by_name: dict = {}
        for spec, rows in methods.items():
            for r in rows.values():
                if "error" not in r:
                    name, _, w = spec.partition("@")
                    by_name.setdefault(name, []).append((float(w) if w else 0.0, r["accuracy"]))
        for name in sorted(by_name, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
            pick = (chosen or {}).get((student, name))
            cells = ", ".join((f"**{w:g}: {a:.3f}**" if w == pick else f"{w:g}: {a:.3f}") if w else f"{a:.3f}"
                              for w, a in sorted(by_name[name]))
            lines.append(f"| {student} | {LABELS.get(name, name)} | {cells} |")
    return lines


def render(doc: dict, path: str, pilot: dict | None = None, pilot_path: str | None = None) -> str:
    meta, runs = doc.get("meta", {}), doc.get("meta", {}).get("runs", [])
    test = grouped(doc, "test")
    steps = sorted({r["steps"] for r in doc["rows"].values() if r["split"] == "test"})
    timing = {(r["student"], r["method"]): r for r in doc["rows"].values() if r["split"] == "timing"}
    rows = [r for r in doc["rows"].values() if "error" not in r and r["split"] == "test"]
    loads = [r["load_mean"] for r in rows]
    m = meta.get("machine", {})
    out = ["# Distillation methods, measured on MNIST-5k", "",
           f"Generated by `scripts/methods.py --render` from `{path}`"
           + (f" and `{pilot_path}` (the weight pilot)" if pilot_path else "")
           + "; every number below comes from the rows of those files.", "",
           "Setup: the image recipe (`recipes/distill_image.py` defaults): a ViT teacher (patch 7, width 64, 4 layers) "
           "trained on 3,500 digits; students see the first 1,000 of them for "
           f"{'/'.join(map(str, steps))} steps of 64 (AdamW lr 2e-3, cosine, 20 warm-up steps, weight decay 0.05), "
           "and are evaluated on the 1,000 test digits. Every method is plain KD (alpha_task 0.5, kd_weight 0.5, "
           "forward KL at T = 4) plus one term, from the same seeded initial student, data order and steps; the "
           "baseline is the task loss alone. Students: ResNet (basic blocks, widths 16/32, 21.9K parameters) and "
           "ViT (width 32, 2 layers, 2 heads). Module pairs for hints and attention transfer: teacher `vit.layers.1` "
           "-> ResNet `resnet.encoder.stages.0` / ViT `vit.layers.0`, `vit.layers.3` -> `stages.1` / `vit.layers.1` "
           "(ViT tokens laid on their 4x4 patch grid); attention probabilities: teacher layers 1, 3 -> student 0, 1. "
           "Weights were chosen on the validation split (pilot below), never on the test split.", "",
           "Time per step: s/step is the median interval between optimizer steps of the accuracy runs (data, "
           "teacher and student passes, update), mean over seeds, one torch thread. '× KD, same run' divides it by "
           "plain KD's for the same student and seed (same process; † where KD's row came from another process); "
           "those runs are minutes apart, and the load of the shared machine moved meanwhile. '× KD, interleaved' "
           "is the fairer figure: `--timing` alternates short runs of plain KD and the method (same process, "
           "threads and data), and gives the median ratio over the rounds (min-max in brackets). The load column "
           "is os.getloadavg()'s 1-minute value sampled every 40 steps of the accuracy runs (min-max over seeds).",
           ""]
    if any(m in MODE_NAMES for v in test.values() for m in v):
        out += [MODES_SETUP, ""]
    for student in STUDENTS:
        if student in test:
            methods = {k: v for k, v in test[student].items() if not k.startswith("reg_")}
            teacher = next((r["teacher_accuracy"] for v in methods.values() for r in v.values()
                            if "teacher_accuracy" in r), None)
            title = f"## {STUDENTS[student]} student"
            out += [title + (f" (teacher test accuracy {teacher:.3f})" if teacher else ""), ""]
            out += class_table(student, methods, timing) + [""]
    reg = {k: v for k, v in test.get("resnet", {}).items() if k.startswith("reg_")}
    if reg:
        out += ["## Regression: output matching (stroke thickness)", "",
                "Target: the mean stroke width of each digit, 2 x ink area / ink perimeter (ink = intensity > 0.5, "
                "perimeter = ink/background edges between 4-neighbours; a stroke of width w and length L >> w has "
                "area wL and perimeter ~2L), standardised with the teacher split's mean and std. It is not a linear "
                "function of the pixels (unlike ink mass), so the student has something to learn. Teacher: the "
                "classifier teacher's ViT with one output, trained by MSE for 30 epochs on the 3,500 teacher digits "
                "(cached). Student: the ResNet with one output on the 1,000 digits, L = L_task (MSE) for the "
                "baseline, L = L_task + ‖y_T − y_S‖² with output matching (alpha_task 1, kd_weight 1, "
                "kd_loss mse).", ""] + regression_table(reg, timing) + [""]
    out += ["## What helped, what did not", ""]
    for student in STUDENTS:
        methods = test.get(student, {})
        for method in [m for m in (*ORDER, "reg_kd") if m in methods and m != "baseline"]:
            ok = {s: r for s, r in methods[method].items() if "error" not in r}
            key = "r2" if method == "reg_kd" else "accuracy"
            ref, ref_label = REFERENCE.get(method, ("kd", "plain KD"))
            if not ok:
                auto = "not run: hf_kd refuses it (see the table)"
            elif method == "kd_eager":
                auto = "the same loss as plain KD; measures what switching to eager attention costs"
            else:
                auto = verdict(paired(ok, methods.get(ref), key), ref_label, 4 if key == "r2" else 3)
            if method == "multiview" and ok and "baseline_multiview" in methods:
                auto += "; vs the same views without a teacher: " + verdict(
                    paired(ok, methods["baseline_multiview"], key), "no teacher with views")
            auto += mode_details(method, ok)
            note = NOTES.get(f"{student}:{method}", NOTES.get(method, ""))
            label = "output matching (R²)" if method == "reg_kd" else LABELS.get(method, method)
            out.append(f"- **{student}, {label}**: {auto}." + (f" {note}" if note else ""))
    out.append("")
    if pilot:
        out += ["## Weight pilot (validation split, 500 digits, seed 0)", "",
                "Each added term was trained at weights a factor 3-10 apart (grids centred on the loss magnitudes of "
                "the first 40 steps) and scored on the 500 validation digits; the best was kept (bold; a difference "
                "of one digit, 0.002, counted as a tie, won by the smaller weight), and where the best was the "
                "largest weight tried the grid was extended by one step. One seed on 500 digits: differences under "
                "about 1-2 points (ResNet) or 5 points (ViT) are within seed noise. hints_stage reuses the hints "
                "weight; relation cannot run on the ResNet.", ""] + pilot_table(pilot, chosen_weights(doc)) + [""]
    errors = [r for r in doc["rows"].values() if "error" in r]
    if errors:
        out += ["## Errors", ""] + [f"- {r['student']} / {r['method']} / seed {r['seed']}: `{r['error']}`"
                                    for r in errors] + [""]
    timing_loads = [x for r in doc["rows"].values() if r["split"] == "timing" and "loads" in r for x in r["loads"]]
    total = sum(r["wall_seconds"] for r in runs)
    pilot_runs = (pilot or {}).get("meta", {}).get("runs", [])
    out += ["## Commands, machine, load", "",
            f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, transformers "
            f"{m.get('transformers', '?')}, Python {m.get('python', '?')}; one torch thread per run; teacher in "
            "float32.",
            f"Load average (1-min) during the test-split runs: median {statistics.median(loads):.2f}, range "
            f"{min(loads):.2f}-{max(loads):.2f} on {m.get('cores', '?')} cores." if loads else "",
            f"Load average (1-min) during the interleaved timing runs: median {statistics.median(timing_loads):.2f}, "
            f"range {min(timing_loads):.2f}-{max(timing_loads):.2f}." if timing_loads else "",
            f"Wall time of the recorded runs: {total / 60:.1f} min in all ({sum(r['rows'] for r in runs)} rows)"
            + (f"; the pilot took {sum(r['wall_seconds'] for r in pilot_runs) / 60:.1f} min more." if pilot_runs
               else "."), "", "```bash"]
    out += [f"{r['command']}   # {r['rows']} rows, {r['wall_seconds'] / 60:.1f} min, finished {r['finished']}"
            for r in pilot_runs + runs] + ["```", ""]
    return "\n".join(out)
