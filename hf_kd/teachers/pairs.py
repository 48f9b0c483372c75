"""A teacher and a student as a pair: loading the teacher, checking the two fit, the student's own task loss."""

from __future__ import annotations

import os
import warnings

import torch

from ..flow.schedules import peak_value
from ..flow.tasks import CAUSAL_LM, CLASSIFICATION, ENCODER, task_of


def load_teacher(path_or_id: str, task: str, dtype: torch.dtype | None = None):
    """Load a teacher for ``task`` from a local folder or a Hub id (in ``dtype``; None: as saved), with a clear
    error if it is not a model."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification)
    if os.path.isfile(path_or_id):
        raise ValueError(f"teacher path {path_or_id!r} is a file: pass the folder that holds config.json and the "
                         "weights (what save_pretrained wrote), or a Hub model id")
    if os.path.sep in str(path_or_id) and not os.path.isdir(path_or_id):
        raise FileNotFoundError(f"teacher path {path_or_id!r} does not exist: check the path, or pass a Hub model id")
    if os.path.isdir(path_or_id) and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        raise ValueError(f"teacher path {path_or_id!r} is a folder without config.json: not a saved model")
    auto = {CAUSAL_LM: AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}.get(task)
    if auto is None:
        from transformers import AutoConfig
        archs = getattr(AutoConfig.from_pretrained(path_or_id), "architectures", None) or []
        auto = AutoModelForImageClassification if any("Image" in a for a in archs) else AutoModelForSequenceClassification
    return auto.from_pretrained(path_or_id, **({} if dtype is None else {"dtype": dtype}))


PADDING_ROWS = 512  # most rows a head may add to its tokenizer's tokens as padding (or 1% of them)


def shared_vocab(student, teacher, tokenizer) -> int | None:
    """Vocabulary size to compare logits over, or None when both heads are the same size. Heads of different sizes
    are taken as one tokenizer plus padding rows only when ``tokenizer`` fits in both and neither head exceeds it by
    more than :data:`PADDING_ROWS` (or 1%); anything else is refused."""
    v_s, v_t = student.config.vocab_size, teacher.config.vocab_size
    if v_s == v_t:
        return None
    n_real = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    # padding rows round a vocabulary up (to a multiple of 64 or 128, a few hundred rows at most): a head far larger
    # than the tokenizer belongs to another tokenizer, whose ids mean other tokens
    if n_real is not None and n_real <= min(v_s, v_t) and max(v_s, v_t) - n_real <= max(PADDING_ROWS, n_real // 100):
        warnings.warn(f"teacher vocabulary {v_t} and student {v_s} differ only by padding rows (tokenizer has "
                      f"{n_real} tokens): comparing logits over the first {min(v_s, v_t)}")
        return min(v_s, v_t)
    raise ValueError(f"teacher vocabulary ({v_t}) and student vocabulary ({v_s}) differ: hf_kd compares logits "
                     "token by token, which needs one tokenizer. If they differ only by padding rows, pass the "
                     "tokenizer as processing_class; otherwise pick a teacher and student with the same tokenizer, "
                     "or set cross_tokenizer='uld' or 'exact' (causal LMs; pass both tokenizers).")


def check_pair(student, teacher, task: str, args) -> None:
    """Fail fast on a teacher/student pair that cannot be distilled as configured (weights read at their peak)."""
    t_task = task_of(teacher)
    if t_task != task:
        raise ValueError(f"teacher is a {t_task} model ({type(teacher).__name__}) but the student is a {task} "
                         f"model ({type(student).__name__}); use the same kind of head for both")
    kd_on = peak_value(args, "kd_weight") > 0
    if task == ENCODER and (kd_on or peak_value(args, "alpha_task") > 0):  # a head-less base model has no logits
        raise ValueError(f"{type(student).__name__} has no head (no logits, no task loss): distil it with hidden-state "
                         "losses only (kd_weight=0, alpha_task=0, hidden_weight > 0)")
    if task == CLASSIFICATION:
        s, t = student.config, teacher.config
        if s.num_labels != t.num_labels:
            raise ValueError(f"teacher has {t.num_labels} labels, student {s.num_labels}: build the student "
                             "with the teacher's num_labels and id2label")
        if s.id2label != t.id2label and not all(v.startswith("LABEL_") for v in s.id2label.values()):
            raise ValueError(f"teacher id2label {t.id2label} differs from student's {s.id2label}")
        if s.num_labels == 1 and kd_on and args.kd_loss != "mse":
            raise ValueError("a regression head (num_labels=1) has no distribution to match: use kd_loss='mse'")


NATIVE_BF16_ENV = "HF_KD_NATIVE_BF16"  # '1' / '0': take the hardware check as given (tests, and to force a choice)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CUDA with bf16; CPUs with AMX or AVX512-BF16); the
    environment variable HF_KD_NATIVE_BF16=1 / 0 overrides the check (what 'auto' would choose on another machine)."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch.cpu helpers: guard them
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def load_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The dtype to load a teacher in for DistillationConfig.teacher_dtype ``choice`` (None: as saved).

    'auto' = bfloat16 where ``device`` computes it natively, else as saved. Evidence (SmolLM2-135M on a 2-core Xeon
    with AMX, docs/performance.md): the teacher's forward is 4.2x faster, its distribution moves by a mean token
    KL of 3.6e-4 at T=2, and a student distilled for 25 steps ends within 0.02% (held-out KL) and 0.08%
    (perplexity) of the float32-teacher student while training 1.5x faster.
    """
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return None if choice == "model" else getattr(torch, choice)


def cast_teacher(teacher, choice: str) -> None:
    """An explicit ``teacher_dtype`` ('float32', 'bfloat16', 'float16') casts a teacher of another dtype in place,
    with a warning: the object passed stays in that dtype after training. 'auto' and 'model' never cast a model
    object (hf_kd leaves the user's teacher as given; 'auto' chooses the dtype only when hf_kd loads the teacher)."""
    if choice in ("auto", "model"):
        return
    dtype = getattr(torch, choice)
    param = next((p for p in teacher.parameters() if p.is_floating_point()), None)
    if param is None:  # no weights of its own (e.g. peft_utils.SameBaseTeacher): its .to says whether it can
        teacher.to(dtype)
    elif param.dtype != dtype:
        warnings.warn(f"teacher_dtype={choice!r} casts the teacher object you passed from {param.dtype} to {dtype} "
                      "in place (it stays so after training); load it in that dtype, or keep teacher_dtype='auto', "
                      "to leave it unchanged", stacklevel=3)
        teacher.to(dtype)


def load_teachers(teacher_model, student, task: str, args, tokenizer) -> tuple[dict, int | None]:
    """``teacher_model``: a model, a folder / Hub id, or several of them (a list, or a name -> model mapping); each
    is loaded and checked against the student. Returns ({name: model}, the vocabulary rows the logit losses
    compare: the smallest real vocabulary shared with the student, None = all)."""
    if isinstance(teacher_model, dict):
        teachers = dict(teacher_model)
    elif isinstance(teacher_model, (list, tuple)):
        teachers = {f"teacher{i}": t for i, t in enumerate(teacher_model)}
    else:
        teachers = {"teacher": teacher_model}
    if not teachers:
        raise ValueError("teacher_model is an empty collection: pass at least one teacher")
    kd_vocab = None
    for name, t in teachers.items():
        if isinstance(t, (str, os.PathLike)):
            teachers[name] = t = load_teacher(str(t), task, load_dtype(args.teacher_dtype, args.device))
        check_pair(student, t, task, args)
        if task != CLASSIFICATION and not args.cross_tokenizer:
            vocab = shared_vocab(student, t, tokenizer)
            kd_vocab = vocab if kd_vocab is None or vocab is None else min(vocab, kd_vocab)
    return teachers, kd_vocab
