"""A measured comparison of hf_kd's distillation methods on the MNIST-5k image job (ViT teacher -> ResNet / ViT
students), plus an output-matching regression set; results merged per (split, student, method, seed, steps).

    python scripts/methods.py [--methods kd,at] [--students resnet,vit] [--seeds 0,1,2] [--steps 480]
                              [--eval_split test|validation] [--out results/methods.json] [--render docs/methods.md]

Every run trains the image recipe's student (``recipes/distill_image.py``: its DEFAULTS, i.e. 480 steps of 64,
AdamW lr 2e-3 cosine, on the first 1,000 of the teacher's 3,500 digits) from the same seeded initial weights, with
only the loss terms of the method changed, and evaluates it on the 1,000 test digits (``--eval_split validation``:
the 500 validation digits, for choosing weights). ``--methods at@30`` runs a method with another weight (the
pilot). Each finished row is merged into ``--out`` at once (atomically, under a lock), so an interrupted run
resumes where it stopped and a subset can be re-run (``--rerun``). A method that raises is recorded with its error.
Step times are the median interval between optimizer steps, with os.getloadavg() sampled during the run; torch
runs on one thread (``--threads``). ``--render`` writes the Markdown report (scripts/methods_report.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # methods_report (also when imported by path)

import torch  # noqa: E402
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.tools.assets import cached_folder, prepared_info  # noqa: E402
from hf_kd.tools.report import evaluate  # noqa: E402
from hf_kd.data.views import MultiViewCollator, random_shift  # noqa: E402
from hf_kd_recipes.distill_image import DEFAULTS, ImageJob, build_student  # noqa: E402
from hf_kd_recipes.image_teacher import MEAN, STD, TEACHER, make_processor, prepare_teacher, splits  # noqa: E402
import methods_modes as modes  # noqa: E402
from methods_results import load, machine_info, merge, row_key  # noqa: E402

PAIRS = {"resnet": "vit.layers.1:resnet.encoder.stages.0,vit.layers.3:resnet.encoder.stages.1",
         "vit": "vit.layers.1:vit.layers.0,vit.layers.3:vit.layers.1"}
KD = dict(alpha_task=0.5, kd_weight=0.5, temperature=4.0, kd_loss="forward_kl")  # the recipe's logit KD
BOTH, VIT, REG, TINY = ("resnet", "vit"), ("vit",), ("resnet",), ("tiny",)
# name: (students, weight field or None, weight per student (chosen by the validation pilot,
# results/methods_pilot.json), fixed fields; a callable gets the student kind)
METHODS = {
    "baseline": (BOTH + TINY, None, None, dict(alpha_task=1.0, kd_weight=0.0)),
    "kd": (BOTH + TINY, None, None, {}),
    "hidden": (VIT, "hidden_weight", dict(vit=10.0), dict(hidden_loss="cosine", use_projection=True)),
    "hints": (BOTH, "hint_weight", dict(resnet=0.3, vit=3.0), lambda s: dict(hint_layers=PAIRS[s])),
    "hints_norm": (BOTH, "hint_weight", dict(resnet=0.3, vit=10.0),
                   lambda s: dict(hint_layers=PAIRS[s], hint_normalize=True)),
    "hints_stage": (BOTH, "hint_weight", dict(resnet=0.3, vit=3.0),  # the weight of "hints"; stage not piloted
                    lambda s: dict(hint_layers=PAIRS[s], hint_first_stage=0.3)),
    "at": (BOTH, "at_weight", dict(resnet=1.0, vit=100.0), lambda s: dict(at_layers=PAIRS[s])),
    "attention": (VIT, "attention_weight", dict(vit=100.0), dict(attention_layers="1:0,3:1", attention_loss="kl")),
    "kd_eager": (VIT, None, None, {}),  # plain KD with both models on eager attention: the cost of the switch
    "relation": (BOTH, "relation_weight", dict(resnet=300.0, vit=300.0), {}),  # ResNet: refused by hf_kd
    "input_grad": (BOTH, "input_grad_weight", dict(resnet=100.0, vit=10.0), {}),
    "great": (BOTH, "great_weight", dict(resnet=0.1, vit=0.01), {}),
    "multiview": (BOTH, None, None, {}),  # KD on MultiViewCollator(random_shift(2), views=2)
    "baseline_multiview": (BOTH, None, None, dict(alpha_task=1.0, kd_weight=0.0)),  # the same views, no teacher
    "reg_baseline": (REG, None, None, dict(alpha_task=1.0, kd_weight=0.0)),  # regression: MSE on the target
    "reg_kd": (REG, None, None, dict(alpha_task=1.0, kd_weight=1.0, kd_loss="mse")),  # + ||y_T - y_S||^2
    **modes.MODES,  # the training modes (scripts/methods_modes.py)
}
MULTIVIEW = ("multiview", "baseline_multiview")
DEFAULT_METHODS = [m for m in METHODS if m not in modes.MODES]  # --methods modes: the modes


def method_fields(spec: str, student: str) -> dict:
    """DistillationConfig fields of ``spec`` ('name' or 'name@weight') for ``student``, on top of the recipe."""
    name, _, weight = spec.partition("@")
    students, field, default, fixed = METHODS[name]
    if student not in students:
        raise KeyError(f"{name} does not apply to the {student} student")
    fields = {**KD, "hidden_weight": 0.0, **(fixed(student) if callable(fixed) else fixed)}
    if field:
        fields[field] = float(weight) if weight else default[student]
    elif weight:
        raise ValueError(f"method {name!r} has no weight to set ({spec!r})")
    return fields


# ---- data, teachers, students ---------------------------------------------------------------------------------

class Digits(torch.utils.data.Dataset):
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def thickness(pixels: torch.Tensor) -> torch.Tensor:
    """Mean stroke width of each digit in pixels: 2 * ink area / ink perimeter (a stroke of width w and length L >> w
    has area wL and perimeter ~2L). Ink = intensity > 0.5; perimeter = ink/background edges between 4-neighbours."""
    ink = (pixels[:, 0] * STD + MEAN) > 0.5
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    edges = (padded[:, 1:] != padded[:, :-1]).sum((1, 2)) + (padded[:, :, 1:] != padded[:, :, :-1]).sum((1, 2))
    return 2 * ink.sum((1, 2)).float() / edges.clamp(min=1).float()


REG_TEACHER = dict(TEACHER, target="thickness=2*area/perimeter, ink>0.5, standardised", num_labels=1)


def regression_teacher(data: dict, quick: bool = False):
    """A ViT (the classifier teacher's shape and schedule) trained by MSE on the standardised stroke thickness of the
    3,500 teacher digits; cached under cache_dir()/mnist-vit-thickness-teacher. Returns (model, info)."""
    recipe = dict(REG_TEACHER, epochs=1) if quick else REG_TEACHER

    def build(folder: str) -> dict:
        torch.manual_seed(recipe["seed"])
        keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
        model = ViTForImageClassification(ViTConfig(num_channels=3, num_labels=1, **{k: recipe[k] for k in keys}))
        x, t = data["teacher_train"][0], thickness(data["teacher_train"][0])
        mean, std = t.mean().item(), t.std().item()
        y, bs = (t - mean) / std, recipe["batch_size"]
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
        total = recipe["epochs"] * -(-len(y) // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["learning_rate"], total_steps=total,
                                                    pct_start=0.1)
        gen, start = torch.Generator().manual_seed(recipe["seed"]), time.perf_counter()
        for epoch in range(recipe["epochs"]):
            model.train()
            for idx in torch.randperm(len(y), generator=gen).split(bs):
                loss = torch.nn.functional.mse_loss(model(pixel_values=x[idx]).logits.squeeze(-1), y[idx])
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            print(f"[methods] thickness teacher epoch {epoch + 1}/{recipe['epochs']}: loss {loss.item():.3f}",
                  flush=True)
        model.save_pretrained(folder)
        info = {"seconds": time.perf_counter() - start, "target_mean": mean, "target_std": std}
        vx, vt = data["validation"][0], thickness(data["validation"][0])
        info.update({f"validation_{k}": v for k, v in regression_metrics(model, vx, (vt - mean) / std).items()})
        return info

    folder = cached_folder("mnist-vit-thickness-teacher" + ("-quick" if quick else ""), recipe, build)
    return ViTForImageClassification.from_pretrained(folder).eval(), prepared_info(folder)


@torch.inference_mode()
def regression_metrics(model, x, y) -> dict:
    model.eval()
    pred = torch.cat([model(pixel_values=x[i:i + 250]).logits.squeeze(-1) for i in range(0, len(y), 250)])
    mse = torch.mean((pred - y) ** 2).item()
    return {"mse": mse, "r2": 1 - mse / torch.var(y, unbiased=False).item()}


class StepClock(TrainerCallback):
    """Intervals between optimizer steps (data, forward, backward, update) and the load average meanwhile."""

    def __init__(self):
        self.intervals, self.loads, self.last = [], [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now
        if state.global_step % 40 == 0:
            self.loads.append(os.getloadavg()[0])


def run_one(spec: str, student_kind: str, seed: int, env: dict) -> dict:
    """Train one student for one method and seed; the row (metrics, timings, loads, logged loss components)."""
    name = spec.partition("@")[0]
    fields, regression = method_fields(spec, student_kind), name.startswith("reg_")
    data, steps = env["data"], env["steps"]
    n = env["train_images"]
    x = data["teacher_train"][0][:n]
    ex, ey = (t[:env["eval_images"] or None] for t in data[env["split"]])
    if regression:  # fresh teachers each run (a signal may switch their attention implementation)
        teacher, rinfo = regression_teacher(data, env["quick"])
        scale = lambda p: (thickness(p) - rinfo["target_mean"]) / rinfo["target_std"]  # noqa: E731
        y, ey = scale(x), scale(ex)
    else:
        teacher, y = prepare_teacher(env["quick"], data)[0], data["teacher_train"][1][:n]
    if name == "kd_eager":
        teacher.set_attn_implementation("eager")
    torch.manual_seed(seed)  # the recipe's order: seed, then build the student
    student = modes.tiny_student(teacher, build_student, ImageJob) if student_kind == "tiny" else \
        build_student(ImageJob(student=student_kind), teacher)
    if regression:  # the same ResNet with one output
        torch.manual_seed(seed)
        student = type(student)(_regression_config(student))
    if name == "kd_eager":
        student.set_attn_implementation("eager")
    if student_kind == "tiny" and name in modes.TINY_ROWS:
        steps = 2 * steps  # the chain's total steps (2 stages)
    out = tempfile.mkdtemp(prefix="hf_kd_methods_")
    recipe = {k: v for k, v in DEFAULTS.items() if k != "output_dir"}
    fields.update(modes.extra_fields(name, env))

    def make_args(folder, **extra):
        return DistillationConfig(output_dir=folder, **{**recipe, **fields, "max_steps": steps, "seed": seed,
                                  "logging_steps": min(40, steps), "teacher_dtype": "model", "disable_tqdm": True,
                                  **extra})
    collator = MultiViewCollator(random_shift(2), views=2, seed=seed) if name in MULTIVIEW else None
    clock = StepClock()
    load0 = os.getloadavg()
    batches = [{"pixel_values": ex[i:i + 250], "labels": ey[i:i + 250]} for i in range(0, len(ey), 250)]
    extra = {}
    try:
        if name in ("born_again", "chain"):
            initial = copy.deepcopy(student.state_dict())

            def new_student():
                model = type(student)(student.config)
                model.load_state_dict(initial)
                return model
            student, extra = modes.run_staged(name, teacher, new_student, make_args, Digits(x, y), batches, clock)
            seconds, trainer = extra.pop("train_seconds"), None
        else:
            trainer = DistillationTrainer(model=student, teacher_model=modes.teacher_model(name, teacher, env),
                                          args=make_args(out), train_dataset=Digits(x, y), data_collator=collator,
                                          callbacks=[clock])
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if env.get("timing_only"):
        metrics = {}
    elif regression:
        metrics = regression_metrics(student, ex, ey)
        metrics.update({f"teacher_{k}": v for k, v in regression_metrics(teacher, ex, ey).items()})
    else:
        metrics = evaluate(student, batches, "classification", teacher)
        metrics["teacher_accuracy"] = evaluate(teacher, batches, "classification")["accuracy"]
        if trainer is not None:
            extra.update(modes.extra_metrics(name, trainer, student, batches))
    logged = [r for r in trainer.state.log_history if "loss" in r] if trainer is not None else []
    plain = {**KD, "hidden_weight": 0.0}
    return {**metrics, **extra, "total_steps": steps, "fields": {k: v for k, v in fields.items() if k not in plain or v != plain[k]},
            "train_seconds": seconds, "step_seconds": statistics.median(clock.intervals) if clock.intervals else None,
            "load_start": load0[0], "load_end": os.getloadavg()[0],
            "load_mean": statistics.mean(clock.loads) if clock.loads else os.getloadavg()[0],
            "threads": torch.get_num_threads(), "process": env["process"],
            "log_first": logged[0] if logged else None, "log_last": logged[-1] if logged else None}


def run_timing(spec: str, student: str, env: dict, rounds: int, steps: int) -> dict:
    """Step time of ``spec`` against its reference (plain KD; reg_baseline for regression) in alternating short
    runs of ``steps`` steps, ``rounds`` times, so both see the same load; the ratio is the median over rounds."""
    ref = "reg_baseline" if spec.startswith("reg_") else "kd"
    ref_t, t, loads = [], [], []
    for _ in range(rounds):
        for name, times in ((ref, ref_t), (spec, t)):
            row = run_one(name, student, 0, {**env, "steps": steps, "timing_only": True})
            times.append(row["step_seconds"])
            loads.append(row["load_mean"])
    ratios = [a / b for a, b in zip(t, ref_t)]
    return {"reference": ref, "ratio": statistics.median(ratios), "ratios": ratios, "step_seconds": t,
            "reference_step_seconds": ref_t, "loads": loads, "load_mean": statistics.mean(loads),
            "threads": torch.get_num_threads(), "process": env["process"]}


def _regression_config(student):
    config = copy.deepcopy(student.config)
    config.num_labels, config.problem_type = 1, "regression"
    return config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; name@weight for a pilot; "
                   "'modes' = the training modes (scripts/methods_modes.py)")
    p.add_argument("--students", default="resnet,vit", help="resnet, vit, tiny (the chain's capacity-gap student)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=DEFAULTS["max_steps"])
    p.add_argument("--eval_split", default="test", choices=("test", "validation"))
    p.add_argument("--train_images", type=int, default=1000)
    p.add_argument("--eval_images", type=int, default=0, help="0 = the whole split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing", default=None, metavar="ROUNDSxSTEPS", help="instead of training to the end: time "
                   "each method against plain KD in alternating runs, e.g. 3x60 (rows 'timing|student|method')")
    p.add_argument("--quick", action="store_true", help="the one-epoch smoke-test teachers (tests)")
    p.add_argument("--rerun", action="store_true", help="train rows already in --out again")
    p.add_argument("--out", default="results/methods.json")
    p.add_argument("--render", default=None, help="write this Markdown report from --out")
    p.add_argument("--pilot", default=None, help="with --render: also show this weight pilot (validation rows)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    specs, students = [m for m in a.methods.split(",") if m], [s for s in a.students.split(",") if s]
    specs = [x for m in specs for x in (modes.MODES if m == "modes" else [m])]  # 'modes': every training mode
    unknown = [m for m in specs if m.partition("@")[0] not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    env = {"steps": a.steps, "split": a.eval_split, "quick": a.quick, "train_images": a.train_images,
           "eval_images": a.eval_images, "process": f"{platform.node()}:{os.getpid()}:{int(time.time())}"}
    start, ran = time.perf_counter(), 0
    seeds = [int(s) for s in a.seeds.split(",") if s != ""]
    if a.timing:  # one timing row per (student, method), keyed like a seed-0 row of the split 'timing'
        rounds, steps = (int(v) for v in a.timing.lower().split("x"))
        seeds, split = [0], "timing"
        specs = [m for m in specs if m not in ("kd", "reg_baseline")]
    else:
        rounds, steps, split = 0, a.steps, a.eval_split
    todo = [(st, m, s) for st in students for m in specs for s in seeds if st in METHODS[m.partition("@")[0]][0]]
    doc = load(a.out)
    todo = [t for t in todo if a.rerun or row_key(split, t[0], t[1], t[2], steps) not in doc["rows"]]
    info = machine_info()  # before training: the library as this process imported it
    if todo:
        env["data"] = splits(make_processor())
    for student, spec, seed in todo:
        key = row_key(split, student, spec, seed, steps)
        t0 = time.perf_counter()
        try:
            row = run_timing(spec, student, env, rounds, steps) if rounds else run_one(spec, student, seed, env)
        except Exception as e:  # a method hf_kd cannot run: recorded, the others go on
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}".strip()[:600], "process": env["process"]}
        row.update(method=spec, student=student, seed=seed, steps=steps, split=split,
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_seconds=time.perf_counter() - t0)
        merge(a.out, {key: row})
        ran += 1
        print(f"[methods] {key}: " + (row.get("error") or ", ".join(
            f"{k} {row[k]:.4f}" for k in ("accuracy", "mse", "r2", "step_seconds", "ratio")
            if isinstance(row.get(k), float)))
            + f" ({row['wall_seconds']:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    if ran:
        merge(a.out, meta={"machine": info, "runs": [{
            "command": "python scripts/methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rows": ran, "wall_seconds": round(time.perf_counter() - start, 1), "threads": a.threads,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "process": env["process"], "git_head": info["git_head"],
            "uncommitted_hf_kd": info["uncommitted_hf_kd"]}]})
    doc = load(a.out)
    if a.render:
        from methods_report import render
        os.makedirs(os.path.dirname(os.path.abspath(a.render)), exist_ok=True)
        with open(a.render, "w") as f:
            f.write(render(doc, a.out, load(a.pilot) if a.pilot else None, a.pilot))
    return doc


if __name__ == "__main__":
    main()
