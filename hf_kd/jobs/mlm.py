"""Masked-LM / sentence-encoder main job: all-MiniLM-L6-v2 (packaged) -> a 3-layer DistilBERT-style student.

``--mode mlm``: the packaged MiniLM is a plain BertModel without an MLM head, so hf_kd builds a BertForMaskedLM
from it (decoder tied to the word embeddings) and fits it on the training tales once, caching the result (see
:mod:`hf_kd.jobs.mlm_teacher`). Loss: KL on MLM logits + hidden cosine + MLM loss.
``--mode encoder``: distils the sentence encoder itself (hidden cosine only) and reports the cosine between
student and teacher sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..signals import ENCODER, MASKED_LM
from ..student import make_student
from .clm import load_text
from .common import JobArguments, distill_and_report, parse, torch_threads
from .mlm_teacher import EMBEDDED, MINILM_ID, chunk_text, masked_batches, prepare_mlm_teacher

DEFAULTS = dict(  # sized for a few minutes on 2 shared CPU cores (measured figures in the README)
    output_dir="outputs/mlm_student", max_steps=40, per_device_train_batch_size=16, learning_rate=2e-4,
    lr_scheduler_type="linear", warmup_steps=4, weight_decay=0.0, logging_steps=5, temperature=2.0,
    alpha_task=1.0, kd_weight=1.0, kd_loss="forward_kl", kd_positions="all", hidden_weight=1.0,
    hidden_loss="cosine", save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
)
ENCODER_DEFAULTS = dict(DEFAULTS, output_dir="outputs/encoder_student", max_steps=60, learning_rate=3e-4,
                        alpha_task=0.0, kd_weight=0.0, hidden_weight=1.0)
QUICK = dict(output_dir="outputs/mlm_quick", max_steps=3, per_device_train_batch_size=4, logging_steps=1,
             warmup_steps=0, eval_chunks=16, eval_sentences=32, max_train_chunks=64)
ENCODER_QUICK = dict(QUICK, output_dir="outputs/encoder_quick")


@dataclasses.dataclass
class MaskedLMJob(JobArguments):
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
    eval_chunks: int = dataclasses.field(default=0, metadata={"help": "mlm: held-out chunks to evaluate (0 = all)."})
    eval_sentences: int = dataclasses.field(default=512, metadata={"help": "encoder: held-out sentences."})
    prep_steps: int = dataclasses.field(default=0, metadata={"help": "Steps of the one-time MLM-head fit of the "
                                        "packaged teacher (0 = the built-in recipe; --quick: a tiny one)."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch intra-op threads during the job (0 = "
                                     "torch's default; 1 is faster on a CPU shared with other busy processes)."})


def parse_job(argv=None):
    job, args = parse(MaskedLMJob, argv, DEFAULTS, QUICK)
    if job.mode == "encoder":  # same precedence, encoder defaults
        job, args = parse(MaskedLMJob, argv, ENCODER_DEFAULTS, ENCODER_QUICK)
    if job.mode not in ("mlm", "encoder"):
        raise ValueError(f"--mode must be 'mlm' or 'encoder', not {job.mode!r}")
    return job, args


def _student_factory(teacher, job):
    student0 = make_student(teacher, num_layers=job.student_layers, strategy=job.layer_strategy)
    state = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():
        model = type(student0)(student0.config)
        model.load_state_dict(state)
        return model
    return student0, new_student


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


def _load(job, cls_name: str):
    import transformers
    from transformers import AutoTokenizer
    from ..assets import minilm_path
    path = minilm_path() if job.teacher == EMBEDDED else job.teacher
    return getattr(transformers, cls_name).from_pretrained(path), AutoTokenizer.from_pretrained(path)


def run(job: MaskedLMJob, args) -> dict:
    with torch_threads(job.threads):
        return _run(job, args)


def _run(job: MaskedLMJob, args) -> dict:
    torch.manual_seed(args.seed)
    train_text, held_text, data_name = load_text(job)
    notes = []
    if job.mode == "encoder":
        teacher, tok = _load(job, "AutoModel")
        task, collator = ENCODER, __import__("transformers").DataCollatorWithPadding(tok)
    elif job.teacher == EMBEDDED:
        with args.main_process_first(desc="prepare the MLM teacher"):  # once, then every process reads the cache
            teacher, tok, info = prepare_mlm_teacher(quick=job.quick, steps=job.prep_steps)
        task = MASKED_LM
        r = info["recipe"]
        notes.append(f"the packaged MiniLM has no MLM head: hf_kd built BertForMaskedLM from it (decoder tied to the "
                     f"word embeddings) and fitted it on the training tales (all layers trained, word embeddings = "
                     f"decoder frozen, {r['mlm_probability']:.0%} masking, {r['steps']} steps of "
                     f"{r['batch_size']}x{r['max_length']} tokens, {info['train']}, "
                     f"{info['seconds']:.0f} s, cached as {info['name']}); its held-out masked-token accuracy "
                     f"{info['heldout_accuracy']:.3f} (before fitting: {info['accuracy_before']:.3f})")
    else:
        teacher, tok = _load(job, "AutoModelForMaskedLM")
        task = MASKED_LM
    if task == MASKED_LM:
        from transformers import DataCollatorForLanguageModeling
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    train = chunk_text(train_text, tok, job.max_length, job.text_column, max_chunks=job.max_train_chunks or None)
    student0, new_student = _student_factory(teacher, job)
    notes.insert(0, f"student keeps teacher layers {student0.config.hf_kd_teacher_layers} ({job.layer_strategy})")
    if task == MASKED_LM:
        held = chunk_text(held_text, tok, job.max_length, job.text_column, max_chunks=job.eval_chunks or None)
        eval_batches = masked_batches(held, tok, 32, seed=1234)
        n_masked = sum(int((b["labels"] != -100).sum()) for b in eval_batches)
        data = (f"{data_name}: {len(train)} train chunks of <= {job.max_length} tokens, {len(held)} held-out chunks "
                f"({n_masked} masked tokens, fixed masking; held-out documents never seen in training)")
        baseline = None
    else:
        sentences = held_out_sentences(held_text[job.text_column], job.eval_sentences)
        eval_batches = [dict(tok(sentences[i:i + 64], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")) for i in range(0, len(sentences), 64)]
        data = (f"{data_name}: {len(train)} train chunks of <= {job.max_length} tokens; evaluation on "
                f"{len(sentences)} sentences of held-out documents")
        from ..report import evaluate
        baseline = evaluate(new_student(), eval_batches, ENCODER, teacher) if job.baseline else None
        notes.append("encoder mode has no task loss (the loss is hidden-state cosine only), so a no-teacher run has "
                     "nothing to train on: the 'baseline_no_teacher' row is the untrained layer-dropped copy (the "
                     "same model as student_before). It shows what dropping layers alone gives, not a trained "
                     "alternative")
        notes.append("embedding_cosine: mean cosine between student and teacher sentence embeddings (mean pooling "
                     "over the attention mask, L2-normalised, as all-MiniLM-L6-v2 in sentence-transformers); "
                     "nn_agreement: share of sentences whose nearest other sentence is the same for both")
    first = eval_batches[0]
    rows = 4 if job.quick else 8
    speed = {"input_ids": first["input_ids"][:rows], "attention_mask": first["attention_mask"][:rows]}
    return distill_and_report(
        job, args, teacher=teacher, new_student=new_student, train_dataset=train, eval_batches=eval_batches,
        task=task, collator=collator, processing_class=tok, data=data,
        teacher_name=MINILM_ID if job.teacher == EMBEDDED else job.teacher, speed_inputs=speed, notes=notes,
        baseline_metrics=baseline)


def main(argv=None) -> dict:
    job, args = parse_job(argv)
    return run(job, args)
