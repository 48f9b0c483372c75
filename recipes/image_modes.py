"""The training modes of the image recipe (``hf-kd distill-image``): a second teacher of another architecture
(several teachers), a route of teacher snapshots (route-constrained optimisation), teacher-assistant chains and
born-again generations. Mutual learning, self-distillation and progressive stages need nothing here: they are
DistillationConfig fields (``mutual_weight``, ``self_distill_weight``, ``progressive``).

Teachers are trained once on the teacher's 3,500 digits and cached like the ViT teacher (image_teacher.py).
"""

from __future__ import annotations

import os

from transformers import ResNetConfig, ResNetForImageClassification

from hf_kd.tools.assets import cached_folder, prepared_info
from hf_kd.modes.chain import born_again_from_labels, chain_vs_direct, make_assistant
from hf_kd.tools.report import evaluate
from hf_kd_recipes.image_teacher import LABELS, TEACHER, accuracy, train_teacher

# a CNN teacher: another architecture than the ViT, trained by the same schedule on the same digits
RESNET_TEACHER = dict(hidden_sizes=[32, 64, 128], depths=[1, 1, 1], epochs=15, batch_size=64, learning_rate=2e-3,
                      weight_decay=0.05, shift=0, seed=1)
ROUTE_EPOCHS = (2, 6)  # snapshots of the ViT teacher's own training (epochs), then its final weights


def resnet_teacher_model(recipe: dict):
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, num_labels=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        embedding_size=recipe["hidden_sizes"][0], hidden_sizes=recipe["hidden_sizes"], depths=recipe["depths"],
        layer_type="basic"))


def _quick(recipe: dict, quick: bool) -> dict:
    return dict(recipe, epochs=1) if quick else recipe


def prepare_resnet_teacher(quick: bool, data: dict):
    """(ResNet teacher, info), trained once and cached under cache_dir()/mnist-resnet-teacher[-quick]."""
    recipe = _quick(RESNET_TEACHER, quick)

    def build(folder: str) -> dict:
        model, seconds = train_teacher(recipe, data, build=resnet_teacher_model)
        model.save_pretrained(folder)
        return {"seconds": seconds, "validation_accuracy": accuracy(model, *data["validation"]),
                "parameters": sum(p.numel() for p in model.parameters())}

    folder = cached_folder("mnist-resnet-teacher" + ("-quick" if quick else ""), recipe, build)
    return ResNetForImageClassification.from_pretrained(folder).eval(), prepared_info(folder)


def prepare_teacher_route(quick: bool, data: dict) -> list[str]:
    """Folders of the ViT teacher recipe's snapshots after ROUTE_EPOCHS and at the end of its training (early ->
    final), for ``teacher_checkpoints``; trained once and cached under cache_dir()/mnist-vit-teacher-route."""
    recipe = dict(_quick(TEACHER, quick), route=ROUTE_EPOCHS if not quick else (1,))

    def build(folder: str) -> dict:
        def keep(epoch, model):
            if epoch in recipe["route"]:
                model.save_pretrained(os.path.join(folder, f"epoch_{epoch}"))
        model, seconds = train_teacher(recipe, data, on_epoch=keep)
        model.save_pretrained(os.path.join(folder, "final"))
        return {"seconds": seconds, "snapshots": [f"epoch_{e}" for e in recipe["route"]] + ["final"]}

    folder = cached_folder("mnist-vit-teacher-route" + ("-quick" if quick else ""), recipe, build)
    return [os.path.join(folder, name) for name in prepared_info(folder)["snapshots"]]


def teachers(names: str, vit_teacher, quick: bool, data: dict):
    """The teacher_model argument for ``--teachers vit`` (the ViT alone) or several, e.g. ``vit,resnet``."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in ("vit", "resnet")]
    if unknown or not chosen:
        raise ValueError(f"--teachers: comma-separated names from 'vit', 'resnet'; got {names!r}")
    made = {n: vit_teacher if n == "vit" else prepare_resnet_teacher(quick, data)[0] for n in chosen}
    return made[chosen[0]] if len(made) == 1 else made


def run_staged(mode: str, args, teacher, new_student, generations: int, train_digits, eval_batches) -> dict:
    """``chain``: teacher -> assistant (make_student of the teacher, sized by the geometric mean of teacher and
    student parameter counts) -> student, against the student distilled directly at equal total steps
    (chain_report.md). ``born_again``: generation 0, the student trained on its task loss alone, then
    ``generations`` students of the same architecture, each taught by the one before (born_again_report.md).
    Every stage is resumable. Returns the report."""
    def score(model):
        return {"accuracy": evaluate(model, eval_batches, "classification")["accuracy"]}
    if mode == "chain":
        return chain_vs_direct(teacher, [make_assistant(teacher, new_student())], new_student, args, score,
                               train_dataset=train_digits)
    if mode != "born_again":
        raise ValueError(f"--mode must be 'distill', 'chain' or 'born_again', not {mode!r}")
    models = born_again_from_labels(teacher, new_student, generations, args, train_dataset=train_digits)
    rows = [{"generation": i, **score(s)} for i, s in enumerate(models)]
    lines = ["# Born-again generations (0: no teacher)", "", "| generation | accuracy |", "|---|---|"]
    lines += [f"| {r['generation']} | {r['accuracy']:.4f} |" for r in rows]
    if args.should_save:
        with open(os.path.join(args.output_dir, "born_again_report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"generations": rows, "steps_per_generation": args.max_steps}
