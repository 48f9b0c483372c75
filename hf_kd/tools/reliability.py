"""Reliability: clear errors for bad input before any training step, non-finite loss reports, graceful
SIGINT/SIGTERM handling (atomic saves: hf_kd/tools/checkpoints.py). The trainer calls these; see docs/troubleshooting.md.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import random
import signal
import tempfile
import threading
from collections.abc import Mapping

import numpy as np
import torch
from transformers import TrainerCallback

from ..flow.tasks import CLASSIFICATION, base_model_of

logger = logging.getLogger(__name__)

# Models whose position ids start after the padding index (RoBERTa family): usable length is shorter.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                     "data2vec-text", "ibert", "mpnet"}


def require(package: str, pip_name: str | None = None, purpose: str = "this feature"):
    """Import an optional dependency, or raise an ImportError naming it and the pip command that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {package!r}, which is not installed "
                          f"({e}). Install it with: pip install {pip_name or package}") from e


# ---- bad input, checked before the first training step ----------------------------------------------
def check_tokenizers(student_tok, teacher_tok) -> None:
    """Refuse a teacher tokenizer whose vocabulary (token -> id) differs from the student's."""
    if teacher_tok is None:
        return
    if student_tok is None:
        raise ValueError("teacher_processing_class was given but processing_class (the student's tokenizer) was "
                         "not: pass both so hf_kd can check that they share one vocabulary")
    s, t = (getattr(x, "tokenizer", x) for x in (student_tok, teacher_tok))
    if not (hasattr(s, "get_vocab") and hasattr(t, "get_vocab")):
        return  # image processors: nothing to compare token by token
    vs, vt = s.get_vocab(), t.get_vocab()
    if vs == vt:
        return
    moved = sorted(k for k in set(vs) & set(vt) if vs[k] != vt[k])
    only_t, only_s = sorted(set(vt) - set(vs)), sorted(set(vs) - set(vt))
    examples = [(k, vt[k], vs[k]) for k in moved[:3]]
    diffs = [(moved, f"{len(moved)} shared tokens have different ids (e.g. {examples} as (token, teacher id, "
                     "student id))"),
             (only_t, f"{len(only_t)} only in the teacher (e.g. {only_t[:3]})"),
             (only_s, f"{len(only_s)} only in the student (e.g. {only_s[:3]})")]
    raise ValueError(f"the teacher's tokenizer ({len(vt)} tokens) and the student's ({len(vs)} tokens) differ: "
                     f"{', '.join(text for found, text in diffs if found)}. hf_kd compares logits id by id, so "
                     "mixing them would match unrelated tokens: use the teacher's tokenizer for the student (a "
                     "make_student student shares the teacher's vocabulary), pick a teacher of the same family, or "
                     "distil across tokenizers with cross_tokenizer='uld' or 'exact' (causal LMs, raw text).")


def check_output_dir(path: str) -> None:
    """Fail before training if checkpoints cannot be written to ``path`` (creates it, writes a probe file)."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".hf_kd-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise type(e)(f"output_dir {path!r} is not a writable folder ({e.strerror or e}): checkpoints and the "
                      "student are saved there, so training would fail at the first save. Pass an output_dir "
                      "you can write to, or fix its permissions / free the path.") from e


def max_positions(config) -> int | None:
    """Longest sequence a model can embed (None if it has no position limit)."""
    for name in ("max_position_embeddings", "n_positions", "max_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


@contextlib.contextmanager
def _rng_preserved():
    """Run a block (e.g. a random MLM collator) without advancing any global RNG training depends on."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state), np.random.set_state(numpy_state)


def _collate(trainer, dataset, rows_of, description: str):
    """Run the trainer's own column removal and collator on the rows ``rows_of(dataset)`` picks."""
    import datasets
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description=description)
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description=description)
    with _rng_preserved():
        return collator(rows_of(dataset))


def _longest_row(dataset) -> tuple[int, int] | None:
    """(row index, length) of the longest input_ids row of a datasets.Dataset, vectorised with pyarrow."""
    try:
        import pyarrow.compute as pc
        lengths = pc.list_value_length(dataset.data.table.column("input_ids"))
        if dataset._indices is not None:
            lengths = pc.take(lengths, dataset._indices.column(0))
        longest = pc.max(lengths).as_py()
        return (int(pc.index(lengths, longest).as_py()), int(longest)) if longest is not None else None
    except Exception:  # not a list column, unusual backend: the first batch is still checked
        return None


def check_training_data(trainer, dataset, description: str = "train_dataset") -> None:
    """Refuse, before any step, data the run would choke on: empty, untokenized, unlabelled when alpha_task > 0,
    longer than the models' positions, token ids or class labels out of range, images of the wrong shape."""
    import datasets
    if isinstance(dataset, Mapping):
        for name, part in dataset.items():
            check_training_data(trainer, part, f"{description}[{name!r}]")
    if not hasattr(dataset, "__len__") or isinstance(dataset, (Mapping, torch.utils.data.IterableDataset)):
        return  # streaming data cannot be peeked cheaply: compute_loss and the trainer's length guard check it
    if len(dataset) == 0:
        raise ValueError(f"{description} is empty (0 rows): check the split name and any filter/select/max_samples "
                         "step that produced it")
    tokenizes = getattr(trainer.args, "cross_tokenizer", None)  # its collator tokenises raw text with both tokenizers
    if isinstance(dataset, datasets.Dataset) and not tokenizes:
        cols = set(dataset.column_names)
        if not cols & {"input_ids", "inputs_embeds", "pixel_values"}:
            hint = (" It has a raw text column: tokenize first, e.g. dataset.map(lambda b: tokenizer(b['text'], "
                    "truncation=True), batched=True, remove_columns=['text'])." if cols & {"text", "sentence"} else "")
            raise ValueError(f"{description} has columns {sorted(cols)} but no input_ids or pixel_values the models "
                             f"can read.{hint}")
    bs = trainer.args.per_device_train_batch_size if description.startswith("train") else trainer.args.eval_batch_size
    try:
        batch = _collate(trainer, dataset, lambda d: [d[i] for i in range(min(bs, len(d)))], description)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"hf_kd: raised while collating the first batch of {description} to check it before training")
        raise
    check_batch(trainer, batch, f"the first batch of {description}", need_labels=description.startswith("train"))
    longest = _longest_row(dataset) if isinstance(dataset, datasets.Dataset) else None  # all rows, vectorised
    if longest is not None and longest[1] > (position_limit(trainer) or float("inf")):
        row = _collate(trainer, dataset, lambda d: [d[longest[0]]], description)  # the collator may truncate
        check_batch(trainer, row, f"row {longest[0]} of {description}", need_labels=False)


def _models(trainer) -> list:
    """The student and, unless training from a teacher cache, the teacher."""
    return [m for m in (trainer.model, getattr(trainer, "teacher", None)) if m is not None]


def position_limit(trainer) -> int | None:
    limits = [x for x in (max_positions(base_model_of(m).config) for m in _models(trainer)) if x]
    return min(limits) if limits else None


def check_batch(trainer, batch, where: str, need_labels: bool = True) -> None:
    """Check one collated batch against both models' configs (cheap: shapes and a couple of max())."""
    if not isinstance(batch, Mapping):
        return
    configs = [base_model_of(m).config for m in _models(trainer)]
    if getattr(trainer.args, "cross_tokenizer", None):  # input_ids are the student's; the teacher reads its own
        configs = configs[:1]
    ids, pixels, labels = batch.get("input_ids"), batch.get("pixel_values"), batch.get("labels")
    if ids is None and pixels is None and batch.get("inputs_embeds") is None:
        raise ValueError(f"{where} has keys {sorted(batch)} but no input_ids or pixel_values: tokenize the text "
                         "(or process the images) before training, and check remove_unused_columns/the collator")
    if need_labels and trainer.args.alpha_task > 0 and labels is None:
        raise ValueError(f"alpha_task > 0 but {where} has no 'labels' (keys: {sorted(batch)}): use a collator that "
                         "makes labels (e.g. DataCollatorForLanguageModeling), add a labels column, or set "
                         "alpha_task=0 for pure distillation")
    if torch.is_tensor(ids) and ids.numel():
        limit = position_limit(trainer)
        if limit is not None and ids.shape[-1] > limit:
            raise ValueError(f"{where} has sequences of {ids.shape[-1]} tokens but the models embed at most {limit} "
                             "positions (max_position_embeddings / n_positions): truncate when tokenizing, e.g. "
                             f"tokenizer(..., truncation=True, max_length={limit}), or group texts into blocks of "
                             f"<= {limit} tokens")
        vocab = min(getattr(c, "vocab_size", None) or 2**62 for c in configs)
        top = int(ids.max())
        if top >= vocab or int(ids.min()) < 0:
            raise ValueError(f"{where} contains token id {top if top >= vocab else int(ids.min())} but the models' "
                             f"vocabularies have {vocab} entries (ids 0..{vocab - 1}): the data was tokenized with "
                             "another tokenizer; re-tokenize it with the student's/teacher's tokenizer")
    if torch.is_tensor(pixels) and pixels.dim() == 4:
        for who, model in zip(("student", "teacher"), _models(trainer)):
            cfg = base_model_of(model).config
            channels, size = getattr(cfg, "num_channels", None), getattr(cfg, "image_size", None)
            if isinstance(channels, int) and pixels.shape[1] != channels:
                raise ValueError(f"{where} has images with {pixels.shape[1]} channels but the {who} expects "
                                 f"{channels} (pixel_values must be [batch, {channels}, H, W]): convert the images "
                                 "(e.g. image.convert('RGB')) or use the model's image processor")
            if size is not None:
                hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
                if tuple(pixels.shape[-2:]) != hw and _rejects(model, pixels[:1]):  # some models interpolate
                    raise ValueError(f"{where} has images of {tuple(pixels.shape[-2:])} pixels but the {who} was "
                                     f"built for {hw} (config.image_size): resize them with the model's image "
                                     f"processor (size={{'height': {hw[0]}, 'width': {hw[1]}}})")
    if trainer.task == CLASSIFICATION and torch.is_tensor(labels) and labels.dim() == 1 and labels.numel() \
            and not labels.is_floating_point() and configs[0].num_labels > 1:
        n = configs[0].num_labels  # the student's (check_pair made the teacher's equal)
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= n))]
        if bad.numel():
            raise ValueError(f"{where} has class label {int(bad[0])} but the models have {n} labels (0..{n - 1}): "
                             "build teacher and student with the data's num_labels or fix the label column")


def _rejects(model, pixels) -> bool:
    """Whether ``model`` fails on these images (one no-grad eval forward; only run on a suspected mismatch)."""
    was_training, p = model.training, next(model.parameters())
    try:
        with torch.no_grad(), _rng_preserved():
            model.eval()(pixel_values=pixels.to(p.device, p.dtype))
        return False
    except Exception:
        return True
    finally:
        model.train(was_training)


# ---- numerical faults --------------------------------------------------------------------------------
def nonfinite_report(named: Mapping) -> list[str]:
    """'teacher logits (3 NaN, 1 inf of 480 values)' for every tensor (or sequence of tensors) that is not finite."""
    found = []
    for name, value in named.items():
        if torch.is_tensor(value) or value is None:
            tensors = [(name, value)]
        else:
            tensors = [(f"{name} {i}", v) for i, v in (value.items() if isinstance(value, Mapping) else
                                                       enumerate(value))]
        for label, t in tensors:
            if torch.is_tensor(t) and not bool(torch.isfinite(t).all()):
                found.append(f"{label} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf of "
                             f"{t.numel()} values)")
                break  # the first non-finite hidden state is enough
    return found


# ---- interrupts ----------------------------------------------------------------------------------------
class GracefulInterrupt(TrainerCallback):
    """On SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, stop training cleanly.

    The signal handler only sets a flag; ``on_step_end`` (all processes agree through an all-reduce) asks the
    Trainer to save and stop. A second Ctrl-C while waiting raises KeyboardInterrupt. The previous handlers are
    restored when training ends (DistillationTrainer.train also restores them if training raises).
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None  # the signal number once one arrived
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
                       signal.Signals(signum).name)

    def install(self) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _anyone_received(self, args) -> bool:
        flag = self.received is not None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_received(args):
            control.should_save = control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


def connected_zero(model) -> torch.Tensor:
    """A zero loss connected to every trainable parameter (zero gradients: backward and DDP still work)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum((p.reshape(-1)[:1].float() * 0.0).sum() for p in params)


def handle_nonfinite(trainer, model, loss, parts, student, teacher):
    """The loss is NaN/inf: name the step, micro-batch and culprit; raise (nan_policy='stop') or return a zero
    loss still connected to the graph so backward and DDP work (nan_policy='skip', training only)."""
    training, args = model.training, trainer.args
    if training:
        step, index = trainer._micro
        where = (f"global step {step + 1} ({step} completed, epoch {trainer.state.epoch or 0:.2f}), micro-batch "
                 f"{index} (of {args.gradient_accumulation_steps} per step)")
    else:
        where = f"evaluation batch {trainer._batches['eval']} (at global step {trainer.state.global_step})"
    found = nonfinite_report({"teacher logits": getattr(teacher, "logits", None),
                              "student logits": getattr(student, "logits", None)})
    found = found or nonfinite_report({
        "teacher hidden state": getattr(teacher, "hidden", None) or {},
        "student hidden state": getattr(student, "hidden", None) or {}})
    found += [f"{k} loss = {float(v.detach())}" for k, v in parts.items() if not torch.isfinite(v)]
    diverged = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    culprit = "; ".join(found) or "the weighted sum overflowed"
    message = f"non-finite loss ({float(loss.detach())}) at {where}: {culprit}."
    if any(f.startswith("teacher") for f in found):
        message += (" The teacher produced NaN/inf: check its weights and teacher_dtype (float16 overflows "
                    "easily; use bfloat16 or float32).")
    if diverged or any(f.startswith("student") for f in found):
        message += (f" The student's {'weights are' if diverged else 'outputs are'} not finite: lower "
                    "learning_rate, keep max_grad_norm > 0, prefer bf16 to fp16, or resume from an earlier "
                    "checkpoint.")
    if training and args.nan_policy == "skip" and not diverged:
        trainer._skipped += 1
        logger.warning(message + " Skipping this micro-batch (nan_policy='skip').")
        zero = connected_zero(model)  # zero grads, finite, connected (the signals' parts are in the model)
        return zero, {k: torch.zeros((), device=zero.device) for k in parts}
    if not training and args.nan_policy == "skip":
        logger.warning(message + " Kept in the evaluation loss so it shows (nan_policy='skip' "
                                   "drops training batches only).")
        return loss, parts
    message += (" nan_policy='skip' cannot recover from non-finite weights." if args.nan_policy == "skip" else
                " nan_policy='stop'; set nan_policy='skip' to drop such micro-batches and continue (they are "
                "counted as skipped_batches in the logs).")
    raise FloatingPointError(message)
