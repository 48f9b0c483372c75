"""The training modes of issue #10 as rows of scripts/methods.py (same data, seeds, students and steps as the
signals): several teachers, a teacher route, mutual learning, self-distillation, progressive stages, born-again
generations and a teacher-assistant chain in a capacity-gap setting.

Config-only modes are METHODS entries with a few extra inputs (teachers, a route, peer metrics) supplied here;
born-again and the chain train several models and have runners of their own. The chain uses its own student
("tiny": a one-layer ViT of width 16, 20x fewer parameters than the teacher) with its own no-teacher and
plain-KD rows at the chain's total steps (2 stages x --steps)."""

from __future__ import annotations

import shutil
import tempfile
import time

from hf_kd.modes.chain import born_again_from_labels, distill_chain, make_assistant
from hf_kd.tools.report import evaluate
from hf_kd_recipes.image_modes import prepare_resnet_teacher, prepare_teacher_route

BOTH, VIT, TINY = ("resnet", "vit"), ("vit",), ("tiny",)
NO_TEACHER = dict(alpha_task=1.0, kd_weight=0.0)
# name: (students, weight field, weights, fixed fields): the METHODS format of scripts/methods.py
MODES = {
    "multi_teacher": (BOTH, None, None, {}),  # the ViT and the ResNet teacher, equal weights
    "multi_confidence": (BOTH, None, None, dict(teacher_weights="confidence")),
    "kd_resnet_teacher": (BOTH, None, None, {}),  # plain KD from the ResNet teacher alone (reference)
    "route": (BOTH, None, None, {}),  # route-constrained optimisation over the ViT teacher's snapshots
    "mutual": (BOTH, None, None, dict(NO_TEACHER, mutual_weight=1.0, temperature=1.0)),  # DML, one peer
    "self_distill": (BOTH, None, None, dict(NO_TEACHER, self_distill_weight=1.0, self_distill_exits="1",
                                            temperature=3.0)),
    "progressive": (VIT, None, None, dict(hidden_weight=10.0, hidden_loss="cosine", use_projection=True,
                                          progressive=True)),
    "born_again": (BOTH, None, None, {}),  # generation 0 without a teacher, then 2 generations of KD
    "chain": (TINY, None, None, dict(hidden_weight=0.0)),  # teacher -> assistant -> tiny, steps per stage
}
TINY_ROWS = {"baseline", "kd"}  # the tiny student's references, trained for the chain's total steps


def teacher_model(name: str, teacher, env: dict):
    """The teacher_model argument of ``name``: the ViT teacher, the ResNet teacher, or both."""
    if name in ("multi_teacher", "multi_confidence"):
        return {"vit": teacher, "resnet": _resnet(env)}
    return _resnet(env) if name == "kd_resnet_teacher" else teacher


def _resnet(env: dict):
    if "resnet_teacher" not in env:
        env["resnet_teacher"] = prepare_resnet_teacher(env["quick"], env["data"])
    return env["resnet_teacher"][0]


def extra_fields(name: str, env: dict) -> dict:
    if name == "route":
        return {"teacher_checkpoints": ",".join(prepare_teacher_route(env["quick"], env["data"]))}
    return {}


def extra_metrics(name: str, trainer, student, batches: list) -> dict:
    """Mutual learning: the peer's accuracy and the best of the two (what the run would report)."""
    if name != "mutual":
        return {}
    signal = next(s for s in trainer.signals if s.name == "mutual")
    ranked = signal.ranked(student, lambda m: evaluate(m, batches, "classification")["accuracy"])
    return {"models": dict(ranked), "best_accuracy": ranked[0][1], "best_model": ranked[0][0]}


def run_staged(name: str, teacher, new_student, make_args, train_dataset, batches: list, clock) -> dict:
    """born_again / chain: (the final student, metrics of every stage). ``make_args(out, **fields)``."""
    out = tempfile.mkdtemp(prefix="hf_kd_modes_")
    score = lambda m: evaluate(m, batches, "classification")["accuracy"]  # noqa: E731
    kw = dict(train_dataset=train_dataset, callbacks=[clock])
    try:
        start = time.perf_counter()
        if name == "born_again":
            models = born_again_from_labels(teacher, new_student, 2, make_args(out), **kw)
            stages = {f"generation_{i}": score(m) for i, m in enumerate(models)}
            final = models[-1]
        else:
            final = new_student()
            size = sum(p.numel() for p in final.parameters())
            assistant = make_assistant(teacher, final)
            distill_chain(teacher, [assistant, final], make_args(out), **kw)
            stages = {"assistant": score(assistant), "assistant_parameters": sum(p.numel() for p in
                                                                                 assistant.parameters()),
                      "student_parameters": size, "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
        return final, {"stages": stages, "train_seconds": time.perf_counter() - start}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def tiny_student(teacher, build_student, job_cls):
    return build_student(job_cls(student="vit", student_hidden=16, student_layers=1), teacher)

