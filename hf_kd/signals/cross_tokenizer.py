"""Cross-tokenizer logit distillation: a teacher whose tokenizer differs from the student's (``cross_tokenizer``).

The signal runs the teacher itself, on the teacher's own tokenisation of the batch text (``teacher_input_ids``, made by
:class:`hf_kd.data.cross_tokenizer.CrossTokenizerCollator`): it asks nothing of the trainer's generic teacher pass (which
would feed the student's ids to the teacher). At the aligned positions (both tokenisations end a token at the same
character) it compares the two next-token distributions with :func:`hf_kd.losses.cross_tokenizer.shared_support_kl`
('exact': the shared tokens plus one 'other' bucket) or :func:`hf_kd.losses.cross_tokenizer.uld_loss` ('uld').
The sum over aligned positions is divided by the global count of the student's KD positions, so positions without
an aligned teacher prediction count as 0 (per student token, invariant to gradient accumulation).
"""

from __future__ import annotations

import logging

import torch

from ..flow import capture
from ..flow.capture import Needs
from ..data.cross_tokenizer import shared_vocab_map
from ..losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES, shared_mass, shared_support_kl, uld_loss
from ..flow.schedules import Schedule, from_args
from ..flow.tasks import CAUSAL_LM, task_of
from .base import Context, Signal
from .logits import TaskLoss

log = logging.getLogger("hf_kd")

# DistillationConfig fields of signals that compare the two models token by token on one tokenisation
_SAME_TOKENS = ("kd_weight", "hidden_weight", "relation_weight", "hint_weight", "at_weight", "attention_weight",
                "input_grad_weight", "feature_grad_weight", "great_weight")


class CrossTokenizerKD(Signal):
    """T^2-scaled distance between the teacher's and the student's next-token distributions at character-aligned
    positions, across different tokenizers: ``mode`` 'exact' (KL over the shared tokens + one 'other' bucket; needs
    ``tokenizers`` = (student's, teacher's)) or 'uld' (Universal Logit Distillation, Boizard et al. 2024)."""

    normalizer = "kd"

    def __init__(self, name: str = "cross_tokenizer", weight: float | Schedule = 1.0, *, mode: str = "uld",
                 temperature: float | Schedule = 1.0, tokenizers: tuple | None = None, teacher: str | None = None):
        super().__init__(name, weight, teacher)
        if mode not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(f"cross_tokenizer {mode!r} unknown; choose one of {list(CROSS_TOKENIZER_LOSSES)}")
        self.mode = mode
        self.temperature = temperature if isinstance(temperature, Schedule) else Schedule.constant(temperature)
        if not self.temperature.start > 0 or (self.temperature.end is not None and not self.temperature.end > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.coverage: dict | None = None
        self._mass = [0.0, 0]  # the teacher's probability on shared tokens, summed over aligned positions since the log
        self.register_buffer("student_ids", None, persistent=False)
        self.register_buffer("teacher_ids", None, persistent=False)
        if tokenizers is not None and mode == "exact":
            self.set_tokenizers(*tokenizers)

    def set_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """Build the shared-token map ('exact') and record its coverage of both vocabularies."""
        vocab = shared_vocab_map(student_tokenizer, teacher_tokenizer)
        self.student_ids, self.teacher_ids = vocab.student_ids, vocab.teacher_ids
        self.coverage = vocab.coverage
        log.info("cross_tokenizer='exact': %d shared tokens, %.1f%% of the teacher's vocabulary, %.1f%% of the "
                 "student's", self.coverage["shared_tokens"], 100 * self.coverage["of_teacher_vocab"],
                 100 * self.coverage["of_student_vocab"])

    def needs(self, side: str) -> Needs:
        return Needs(logits=True) if side == "student" else Needs()  # the teacher: run here, on its own ids

    def check(self, teacher, student) -> None:
        if task_of(student) != CAUSAL_LM or (teacher is not None and task_of(teacher) != CAUSAL_LM):
            raise ValueError("cross_tokenizer distils causal language models (next-token distributions aligned by "
                             "character offsets): teacher and student must both be causal LMs")
        if self.mode != "exact":
            return
        if self.student_ids is None:
            raise ValueError("cross_tokenizer='exact' maps the tokens both vocabularies share: pass both tokenizers "
                             "(processing_class and teacher_processing_class)")
        if len(self.student_ids) == 0:
            raise ValueError("cross_tokenizer='exact': the two vocabularies share no token: use cross_tokenizer='uld'")
        for who, model, ids in (("student", student, self.student_ids), ("teacher", teacher, self.teacher_ids)):
            size = model.get_output_embeddings().weight.shape[0] if model is not None else None
            if size is not None and int(ids.max()) >= size:
                raise ValueError(f"cross_tokenizer='exact': the {who}'s tokenizer has id {int(ids.max())} but its LM "
                                 f"head has {size} rows: pass the {who}'s own tokenizer")
            if size is not None and size <= len(ids):
                raise ValueError(f"cross_tokenizer='exact': every entry of the {who}'s vocabulary is shared, so the "
                                 "'other' bucket is empty on that side: use cross_tokenizer='uld'")

    def aligned(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(example, student position, teacher position) of the aligned positions the KD mask keeps."""
        cross = ctx.extra.get("cross") or {}
        if "align_student" not in cross:
            raise ValueError("cross_tokenizer: the batch has no teacher_input_ids / align_* columns: use "
                             "hf_kd.data.cross_tokenizer.CrossTokenizerCollator as data_collator, on raw text")
        a_s, a_t = cross["align_student"], cross["align_teacher"]
        valid = a_s >= 0
        rows = torch.arange(a_s.shape[0], device=a_s.device)[:, None].expand_as(a_s)[valid]
        s_pos, t_pos = a_s[valid], a_t[valid]
        kd = ctx.masks.get("kd")
        if kd is not None:  # kd_positions='labels': an aligned position whose next student token is unlabelled
            keep = kd[rows, s_pos]
            rows, s_pos, t_pos = rows[keep], s_pos[keep], t_pos[keep]
        return rows, s_pos, t_pos

    def teacher_logits(self, ctx: Context) -> torch.Tensor:
        """The teacher's logits [B, T_teacher, V_T] on its own ids (no grad, inference mode)."""
        cross = ctx.extra["cross"]
        teacher = ctx.extra["teacher_models"][self.teacher or ctx.default_teacher]
        inputs = {"input_ids": cross["teacher_input_ids"], "attention_mask": cross["teacher_attention_mask"]}
        return capture.run(teacher, inputs, Needs(logits=True), CAUSAL_LM, teacher=True).logits

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        rows, s_pos, t_pos = self.aligned(ctx)
        student = ctx.student.logits[rows, s_pos]
        if rows.numel() == 0:
            return student.sum() * 0.0  # connected to the graph
        teacher = self.teacher_logits(ctx)[rows, t_pos]
        temperature = self.temperature.value(ctx.step, ctx.total_steps)
        if self.mode == "uld":
            return uld_loss(student, teacher, temperature).sum()
        with torch.no_grad():
            mass = shared_mass(teacher, self.teacher_ids)
            self._mass[0] += float(mass.sum())
            self._mass[1] += mass.numel()
        return shared_support_kl(student, teacher, self.student_ids, self.teacher_ids, temperature).sum()

    def log_values(self) -> dict:
        """'exact': the teacher's mean probability on the shared tokens at the aligned positions since the last log."""
        total, n = self._mass
        self._mass = [0.0, 0]
        return {f"{self.name}_teacher_shared_mass": round(total / n, 6)} if n else {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, coverage={self.coverage}"


def cross_tokenizer_signals(args, task: str, tokenizers: tuple | None) -> list[Signal]:
    """The signals of a config with ``cross_tokenizer`` set: the student's task loss (alpha_task) and the
    cross-tokenizer term, weighted by cross_tokenizer_weight (default: kd_weight with its schedule). Signals that
    compare the two models token by token on one tokenisation are refused."""
    mode = args.cross_tokenizer
    if mode not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"cross_tokenizer {mode!r} unknown; choose one of {list(CROSS_TOKENIZER_LOSSES)}")
    if task != CAUSAL_LM:
        raise ValueError(f"cross_tokenizer distils causal language models; this student is a {task} model")
    if getattr(args, "data_mode", "supervised") != "supervised":
        raise ValueError(f"cross_tokenizer with data_mode={args.data_mode!r}: generated completions are the student's "
                         "token ids, which the teacher cannot read; use data_mode='supervised' (raw text rows)")
    weight = from_args(args, "kd_weight") if args.cross_tokenizer_weight is None else args.cross_tokenizer_weight
    others = [n for n in _SAME_TOKENS[1:] if getattr(args, n) > 0]
    if others:
        raise ValueError(f"cross_tokenizer: {', '.join(others)} compare the two models position by position on one "
                         "tokenisation, which two tokenizers do not share: set them to 0")
    signals = []
    alpha = from_args(args, "alpha_task")
    if alpha.peak > 0:
        signals.append(TaskLoss("task", alpha))
    if (weight.peak if isinstance(weight, Schedule) else weight) > 0:
        signals.append(CrossTokenizerKD("cross_tokenizer", weight, mode=mode,
                                        temperature=from_args(args, "temperature"), tokenizers=tokenizers))
    return signals
