"""Distil a masked LM or a sentence encoder: all-MiniLM-L6-v2 (packaged) -> a 3-layer DistilBERT-style student on
public-domain tales; then the same student trained without a teacher, and a report.

    python recipes/distill_mlm.py --config recipes/configs/mlm_minilm.yaml      # MLM student (KD on MLM logits)
    python recipes/distill_mlm.py --config recipes/configs/encoder_minilm.yaml  # sentence-encoder student
    hf-kd distill-mlm ...                                                       # runs this file's main()
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_mlm.py --config ...

``--mode mlm``: the packaged MiniLM is a plain BertModel without an MLM head, so the teacher is a BertForMaskedLM
built from it (decoder tied to the word embeddings) and fitted on the training tales once, then cached (see
``mlm_teacher.py``). Loss: KL on MLM logits + hidden cosine + MLM loss.
``--mode encoder``: distils the sentence encoder itself (hidden cosine only) and reports the cosine between
student and teacher sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from transformers import (AutoModel, AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling,
                          DataCollatorWithPadding, default_data_collator)

from hf_kd import DistillationTrainer, make_student
from hf_kd.data import masked_views
from hf_kd.teachers.cache import reusable_cache
from hf_kd.tools.assets import minilm_path
from hf_kd.modes.experiment import save_and_report, torch_threads, train
from hf_kd.tools.curves import HeldOutCurve
from hf_kd.tools.report import evaluate
from hf_kd_recipes.distill_clm import load_text
from hf_kd_recipes.arms import grad_norm_stats, grad_norms, run_baselines
from hf_kd_recipes.job_args import ComparedJobArguments, parse
from hf_kd_recipes.mlm_teacher import EMBEDDED, MINILM_ID, chunk_text, masked_batches, prepare_mlm_teacher

DEFAULTS = dict(  # chosen on the validation documents (scripts/mlm_pays.py, docs/mlm_pays.md): forward KL at T = 1 on
    # the masked tokens alone (no MLM loss, no hidden-state term) from the 800-step teacher; minutes on 2 CPU cores
    output_dir="outputs/mlm_student", max_steps=40, per_device_train_batch_size=16, learning_rate=5e-4,
    lr_scheduler_type="linear", warmup_steps=4, weight_decay=0.0, logging_steps=5, temperature=1.0,
    alpha_task=0.0, kd_weight=1.0, kd_loss="forward_kl", kd_positions="labels", hidden_weight=0.0,
    hidden_loss="cosine", save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
)
MLM_PROBABILITY = 0.15  # the student's masking, dynamic (a collator) or static (the teacher cache's views)
ENCODER_DEFAULTS = dict(DEFAULTS, output_dir="outputs/encoder_student", max_steps=60, learning_rate=3e-4,
                        temperature=2.0, kd_positions="all", alpha_task=0.0, kd_weight=0.0, hidden_weight=1.0)
QUICK = dict(output_dir="outputs/mlm_quick", max_steps=3, per_device_train_batch_size=4, logging_steps=1,
             warmup_steps=0, eval_chunks=16, eval_sentences=32, max_train_chunks=64)
ENCODER_QUICK = dict(QUICK, output_dir="outputs/encoder_quick")


@dataclasses.dataclass
class MaskedLMJob(ComparedJobArguments):
    mode: str = dataclasses.field(default="mlm", metadata={"help": "'mlm' (masked-LM student with KD on the MLM "
                                  "logits) or 'encoder' (sentence-encoder student, hidden-state loss only)."})
    teacher: str = dataclasses.field(default=EMBEDDED, metadata={"help": "'minilm' (packaged all-MiniLM-L6-v2; "
                                     "in mlm mode with an MLM head fitted by hf_kd), a local folder or a Hub id."})
    dataset: str = dataclasses.field(default="tales", metadata={"help": "'tales' or a datasets name/path."})
    text_column: str = dataclasses.field(default="text", metadata={"help": "Text column of the dataset."})
    max_length: int = dataclasses.field(default=64, metadata={"help": "Tokens per training chunk."})
    student_layers: int = dataclasses.field(default=3, metadata={"help": "Layers the student keeps."})
    layer_strategy: str = dataclasses.field(default="distilbert", metadata={"help": "make_student strategy."})
    max_train_chunks: int = dataclasses.field(default=0, metadata={"help": "Cap on training chunks (0 = all)."})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "Held-out documents evaluated: 'test' (the "
                                        "report's) or 'validation' (for choosing settings; tales: the held-out "
                                        "documents are split in two halves)."})
    eval_chunks: int = dataclasses.field(default=0, metadata={"help": "mlm: held-out chunks to evaluate (0 = all)."})
    eval_maskings: int = dataclasses.field(default=2, metadata={"help": "mlm: fixed maskings of each held-out chunk "
                                           "scored (more masked tokens, a smaller standard error)."})
    eval_sentences: int = dataclasses.field(default=512, metadata={"help": "encoder: held-out sentences."})
    prep_steps: int = dataclasses.field(default=0, metadata={"help": "Steps of the one-time MLM-head fit of the "
                                        "packaged teacher (0 = the built-in recipe; --quick: a tiny one)."})
    cache_teacher: bool = dataclasses.field(default=False, metadata={"help": "mlm: mask the training chunks "
                                            "mask_views times once and for all (static masking) and run the teacher "
                                            "once over them into a top-k cache (reused by later runs and seeds, its "
                                            "build time reported and counted once); the distilled student trains "
                                            "from it with no teacher forward. The baseline keeps dynamic masking."})
    mask_views: int = dataclasses.field(default=1, metadata={"help": "With cache_teacher: static maskings of each "
                                        "training chunk (different masks, read in turn over the epochs)."})
    cache_k: int = dataclasses.field(default=32, metadata={"help": "Top-k entries per token the teacher cache keeps."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch intra-op threads during the job (0 = "
                                     "torch's default; 1 is faster on a CPU shared with other busy processes)."})


def parse_job(argv=None):
    job, args = parse(MaskedLMJob, argv, DEFAULTS, QUICK)
    if job.mode == "encoder":  # same precedence, encoder defaults
        job, args = parse(MaskedLMJob, argv, ENCODER_DEFAULTS, ENCODER_QUICK)
    if job.mode not in ("mlm", "encoder"):
        raise ValueError(f"--mode must be 'mlm' or 'encoder', not {job.mode!r}")
    return job, args


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'’”])\s+")


def held_out_sentences(texts, n: int, min_words: int = 5, max_words: int = 100) -> list[str]:
    """Up to ``n`` distinct sentences of ``min_words``..``max_words`` words, in document order."""
    out = []
    for text in texts:
        for s in SENTENCE_END.split(text):
            if min_words <= len(s.split()) <= max_words and s not in out:
                out.append(s)
                if len(out) == n:
                    return out
    return out


def load_teacher(job: MaskedLMJob, args):
    """(teacher, tokenizer, task, notes): the packaged MiniLM with its fitted MLM head, a masked LM, or an encoder."""
    if job.mode == "mlm" and job.teacher == EMBEDDED:
        with args.main_process_first(desc="prepare the MLM teacher"):  # once, then every process reads the cache
            teacher, tok, info = prepare_mlm_teacher(quick=job.quick, steps=job.prep_steps)
        r = info["recipe"]
        return teacher, tok, "masked_lm", [
            f"the packaged MiniLM has no MLM head: hf_kd built BertForMaskedLM from it (decoder tied to the word "
            f"embeddings) and fitted it on the training tales (all layers trained, word embeddings = decoder frozen, "
            f"{r['mlm_probability']:.0%} masking, {r['steps']} steps of {r['batch_size']}x{r['max_length']} tokens, "
            f"{info['train']}, {info['seconds']:.0f} s, cached as {info['name']}); its held-out masked-token "
            f"accuracy {info['heldout_accuracy']:.3f} (before fitting: {info['accuracy_before']:.3f})"]
    path = minilm_path() if job.teacher == EMBEDDED else job.teacher
    task, auto = ("encoder", AutoModel) if job.mode == "encoder" else ("masked_lm", AutoModelForMaskedLM)
    return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path), task, []


def cached_teacher(job: MaskedLMJob, args, teacher, train_chunks, collator, tok, name: str):
    """(args, distillation rows, their collator, {teacher cost: seconds}). With --cache_teacher the training chunks are
    masked ``mask_views`` times with fixed seeds (the same masks for every run and seed: one cache serves them all)
    and the teacher's top-k at T = 1 on them is made once (hf_kd.teachers.reusable_cache); the trainer reads it from
    ``args.teacher_cache``. Without it (or in encoder mode): the chunks and ``collator``, no teacher cost up front."""
    if not job.cache_teacher or job.mode != "mlm":
        return args, train_chunks, collator, {}
    views = masked_views(train_chunks, tok, job.mask_views, mlm_probability=MLM_PROBABILITY, seed=0)
    folder, meta = reusable_cache(teacher, views, teacher_name=name, k=job.cache_k, temperature=1.0)
    return dataclasses.replace(args, teacher_cache=folder), None, default_data_collator, {
        "teacher_cache": meta["build_seconds"]}


def run(job: MaskedLMJob, args) -> dict:
    torch.manual_seed(args.seed)
    # 1. Teacher and data: token chunks; held-out documents are never in training
    train_text, held_text, data_name = load_text(job.dataset, job.eval_split)
    teacher, tok, task, notes = load_teacher(job, args)
    mlm = task == "masked_lm"
    collator = (DataCollatorForLanguageModeling(tok, mlm_probability=MLM_PROBABILITY) if mlm
                else DataCollatorWithPadding(tok))
    train_chunks = chunk_text(train_text, tok, job.max_length, job.text_column, max_chunks=job.max_train_chunks or None)

    # 2. Student: a DistilBERT-style spread of the teacher's layers
    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():  # the same initial student every call: the baseline starts where distillation starts
        model = type(student0)(student0.config)
        model.load_state_dict(initial)
        return model

    notes.insert(0, f"student keeps teacher layers {student0.config.hf_kd_teacher_layers} ({job.layer_strategy})")
    size = f"{len(train_chunks)} train chunks of <= {job.max_length} tokens"
    if mlm:  # fixed masking: every model is scored on the same masked tokens
        held = chunk_text(held_text, tok, job.max_length, job.text_column, max_chunks=job.eval_chunks or None)
        eval_batches = [b for m in range(job.eval_maskings) for b in masked_batches(held, tok, 32, seed=1234 + m)]
        n_masked = sum(int((b["labels"] != -100).sum()) for b in eval_batches)
        data = (f"{data_name}: {size}, {len(held)} {job.eval_split} chunks ({n_masked} masked tokens: "
                f"{job.eval_maskings} fixed maskings of each; held-out documents never seen in training)")
    else:  # sentence embeddings of held-out sentences
        sentences = held_out_sentences(held_text[job.text_column], job.eval_sentences)
        eval_batches = [dict(tok(sentences[i:i + 64], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")) for i in range(0, len(sentences), 64)]
        data = f"{data_name}: {size}; evaluation on {len(sentences)} sentences of held-out documents"
        notes.append("encoder mode has no task loss (the loss is hidden-state cosine only), so a no-teacher run has "
                     "nothing to train on: the 'baseline_no_teacher' row is the untrained layer-dropped copy (the "
                     "same model as student_before). It shows what dropping layers alone gives, not a trained "
                     "alternative")
        notes.append("embedding_cosine: mean cosine between student and teacher sentence embeddings (mean pooling "
                     "over the attention mask, L2-normalised, as all-MiniLM-L6-v2 in sentence-transformers); "
                     "nn_agreement: share of sentences whose nearest other sentence is the same for both")

    # 3. Distil (with --dry_run the Trainer must not create the Hub repo: the report dry-runs the push instead)
    push = args.push_to_hub
    if push and job.dry_run:
        args = dataclasses.replace(args, push_to_hub=False)
    name = MINILM_ID if job.teacher == EMBEDDED else job.teacher
    with args.main_process_first(desc="cache the teacher's top-k"):
        args, distil_rows, distil_collator, teacher_seconds = cached_teacher(job, args, teacher, train_chunks,
                                                                             collator, tok, name)
    if teacher_seconds:
        notes.append(f"distilled from a top-{job.cache_k} teacher cache of {job.mask_views} static masking(s) of the "
                     f"training chunks, made once in {teacher_seconds['teacher_cache']:.0f} s (counted in the "
                     "distilled run's seconds and curve); the baseline masks anew in every batch")
    student = new_student()
    metrics = {"teacher": evaluate(teacher, eval_batches, task, desc="eval teacher"),
               "student_before": evaluate(student, eval_batches, task, teacher, desc="eval student before")}
    every = job.curve_every or max(1, args.max_steps // 8)
    kd_curve = [HeldOutCurve(eval_batches, task, every=every, at_start=True,
                             offset_seconds=sum(teacher_seconds.values()))] if mlm else []  # a cache's build, once
    trainer = DistillationTrainer(model=student, teacher_model=None if args.teacher_cache else teacher, args=args,
                                  train_dataset=distil_rows, data_collator=distil_collator, processing_class=tok,
                                  callbacks=kd_curve)
    seconds = {**teacher_seconds, "distillation": train(trainer)}
    metrics["student_after"] = evaluate(student, eval_batches, task, teacher, desc="eval student after")
    histories = {"distillation": trainer.state.log_history}
    curves = {"distilled": kd_curve[0].points} if mlm else None

    # 4. Baselines: the same initial student and data, the task loss alone, the same steps (and with --equal_time,
    # the steps that fit the distilled run's seconds)
    if job.baseline and mlm:
        run_baselines(job, args, new_student, metrics, seconds, histories, curves, lambda row, model, batches: row,
                      dict(teacher=teacher, train_dataset=train_chunks, eval_batches=eval_batches, task=task,
                           data_collator=collator, processing_class=tok), every)
    elif job.baseline:  # encoder: the untrained copy (see the note above)
        metrics["baseline_no_teacher"] = dict(metrics["student_before"])
    notes.append(f"gradient norms before clipping (max_grad_norm {args.max_grad_norm}): " + grad_norms(histories))

    # 5. Save the student, time it against the teacher, write report.json/.md, learning curves and model card
    rows = 4 if job.quick else 8
    report = save_and_report(
        trainer, teacher=teacher, task=task, teacher_name=name,
        data=data, speed_inputs={k: eval_batches[0][k][:rows] for k in ("input_ids", "attention_mask")},
        metrics=metrics, seconds=seconds, histories=histories, notes=notes, processing_class=tok,
        keep_checkpoints=job.keep_checkpoints, push=push, dry_run=job.dry_run, curves=curves)
    return {**report, "grad_norm": {k: grad_norm_stats(h) for k, h in histories.items()}} if report else report


def main(argv: list[str] | None = None) -> dict:
    job, args = parse_job(argv)
    with torch_threads(job.threads):
        report = run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
